"""bfloat16 matrix products that are actually fast on a CPU.

XLA on CPU computes a bf16 × bf16 → bf16 product by converting both operands to float32, so
Keras' ``mixed_bfloat16`` policy trains no faster than float32 there. The same product asked
for with a float32 result (``preferred_element_type``) runs in XNNPACK's bfloat16 kernels
(AVX512-BF16 / AMX): 1.8× float32's speed on this project's 2-core CPU
(``benchmarks/bench_train_step.py``). ``bf16_products()`` makes Keras' JAX ``einsum`` and
``matmul`` ask for that float32 result and round it to bfloat16, in the forward pass and in
both products of the backward pass (a custom VJP: JAX's own transpose would multiply the
float32 cotangent in float32). A bf16 activation times a weight-only int8 kernel (QLoRA's
frozen base, see ``train.quantize_base``) takes the same path: int8 values are exact in bf16.
Everything else, float32 and int8 × int8 products included, is left as Keras computes it.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from pathlib import Path

import jax
import jax.numpy as jnp
from keras.src.backend.jax import numpy as keras_jax_numpy

CPU_FLAGS = Path("/proc/cpuinfo")
BF16_FLAGS = (" avx512_bf16", " amx_bf16")


def cpu_has_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 natively (what makes bf16 products pay off)."""
    try:
        flags = CPU_FLAGS.read_text()
    except OSError:
        return False
    return any(flag in flags for flag in BF16_FLAGS)


def _operands(equation: str) -> tuple[str, str, str] | None:
    """(lhs, rhs, out) of a two-operand einsum whose gradients are einsums of the same kind:
    explicit output, no ellipsis, no index repeated within an operand or summed over one
    operand alone. None for any other equation."""
    equation = equation.replace(" ", "")
    if "..." in equation or "->" not in equation:
        return None
    inputs, out = equation.split("->")
    parts = inputs.split(",")
    if len(parts) != 2:
        return None
    lhs, rhs = parts
    for one, other in ((lhs, rhs), (rhs, lhs)):
        if len(set(one)) != len(one) or any(c not in out and c not in other for c in one):
            return None
    return lhs, rhs, out


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def bf16_einsum(equation: str, x: jax.Array, y: jax.Array) -> jax.Array:
    """``einsum(equation, x, y)`` of bfloat16 operands, accumulated and returned in float32
    by the kernel, then rounded to bfloat16."""
    return jnp.einsum(equation, x, y, preferred_element_type=jnp.float32).astype(jnp.bfloat16)


def _forward(equation, x, y):
    return bf16_einsum(equation, x, y), (x, y)


def _backward(equation, saved, grad):
    x, y = saved
    lhs, rhs, out = _operands(equation)
    grad = grad.astype(jnp.bfloat16)
    dx = jnp.einsum(f"{out},{rhs}->{lhs}", grad, y, preferred_element_type=jnp.float32)
    dy = jnp.einsum(f"{lhs},{out}->{rhs}", x, grad, preferred_element_type=jnp.float32)
    return dx.astype(x.dtype), dy.astype(y.dtype)


bf16_einsum.defvjp(_forward, _backward)


def _as_bf16_pair(x: jax.Array, y: jax.Array) -> tuple[jax.Array, jax.Array] | None:
    """Both operands in bf16 when one is bf16 and the other bf16 or int8 (exact in bf16)."""
    dtypes = {str(x.dtype), str(y.dtype)}
    if "bfloat16" not in dtypes or not dtypes <= {"bfloat16", "int8"}:
        return None
    return x.astype(jnp.bfloat16), y.astype(jnp.bfloat16)


@contextlib.contextmanager
def bf16_products(enabled: bool = True) -> Iterator[None]:
    """While active (and ``enabled``), Keras' JAX ``einsum``/``matmul`` of two bfloat16
    operands go through ``bf16_einsum``. Programs traced inside keep it after it ends."""
    if not enabled:
        yield
        return
    einsum, matmul = keras_jax_numpy.einsum, keras_jax_numpy.matmul

    def fast_einsum(subscripts, *operands, **kwargs):
        operands = [keras_jax_numpy.convert_to_tensor(o) for o in operands]
        pair = _as_bf16_pair(*operands) if len(operands) == 2 and not kwargs else None
        if pair and _operands(subscripts):
            return bf16_einsum(subscripts.replace(" ", ""), *pair)
        return einsum(subscripts, *operands, **kwargs)

    def fast_matmul(x1, x2):
        x1, x2 = keras_jax_numpy.convert_to_tensor(x1), keras_jax_numpy.convert_to_tensor(x2)
        pair = _as_bf16_pair(x1, x2)
        if pair and x1.ndim >= 2 and x2.ndim == 2:
            batch = "abcdefgh"[: x1.ndim - 1]
            return bf16_einsum(f"{batch}y,yz->{batch}z", *pair)
        return matmul(x1, x2)

    keras_jax_numpy.einsum, keras_jax_numpy.matmul = fast_einsum, fast_matmul
    try:
        yield
    finally:
        keras_jax_numpy.einsum, keras_jax_numpy.matmul = einsum, matmul
