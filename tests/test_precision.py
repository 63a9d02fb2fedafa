"""Tests of ``gemma_cse.precision``: bfloat16 products through real Keras layers give the
float32 result within bfloat16 rounding, forward and backward, and compile to products with a
float32 result (the fast kernels); everything else is left to Keras."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import keras
import numpy as np
import pytest
from keras.src.backend.jax import numpy as keras_jax_numpy

from gemma_cse.precision import _operands, bf16_products


@pytest.mark.parametrize(
    ("equation", "expected"),
    [
        ("btd,dnh->btnh", ("btd", "dnh", "btnh")),
        ("btnh, bsnh -> bnts", ("btnh", "bsnh", "bnts")),
        ("...d,dh->...h", None),  # ellipsis
        ("ab,bc", None),  # implicit output
        ("ab,bc,cd->ad", None),  # three operands
        ("aab,bc->ac", None),  # index repeated in one operand
        ("ab,cd->ad", None),  # b and c summed over one operand alone
    ],
)
def test_operands(equation, expected):
    assert _operands(equation) == expected


def _layers():
    """A Dense (matmul) and an EinsumDense (einsum) layer, as Gemma's attention uses them."""
    keras.utils.set_random_seed(0)
    dense = keras.layers.Dense(48, use_bias=False, dtype="mixed_bfloat16")
    heads = keras.layers.EinsumDense("btd,dnh->btnh", (None, 4, 16), dtype="mixed_bfloat16")
    dense.build((None, 5, 32))
    heads.build((None, 5, 48))
    return dense, heads


def _loss(dense, heads, kernels, x):
    for layer, kernel in zip((dense, heads), kernels, strict=True):
        layer.kernel.assign(kernel)
    return jnp.sum(jnp.square(heads(dense(x)).astype(jnp.float32)))


def test_bf16_products_match_float32_forward_and_backward():
    dense, heads = _layers()
    x = np.random.default_rng(0).normal(size=(2, 5, 32)).astype("float32")
    kernels = [np.asarray(dense.kernel.value), np.asarray(heads.kernel.value)]

    def reference(kernels, x):  # the same products in float32
        hidden = jnp.einsum("btd,de->bte", x, kernels[0])
        return jnp.sum(jnp.square(jnp.einsum("btd,dnh->btnh", hidden, kernels[1])))

    def traced(kernels, x):
        return _loss(dense, heads, kernels, x)

    def products(program: str) -> list[str]:
        """Operand and result types of each product in a lowered program."""
        return re.findall(r"stablehlo\.dot_general .*: \((.*)\) -> (.*)", program)

    gradient = jax.jit(jax.value_and_grad(traced, argnums=(0, 1)))
    expected = jax.value_and_grad(reference, argnums=(0, 1))(kernels, x)
    with bf16_products():
        program = gradient.lower(kernels, x).as_text()
        got = gradient(kernels, x)
    plain = jax.jit(jax.value_and_grad(traced, argnums=(0, 1))).lower(kernels, x).as_text()
    # forward 2 products and backward 4, every one bf16 × bf16 with a float32 result
    fast = [(a, r) for a, r in products(program) if a.count("bf16") == 2 and "f32" in r]
    assert len(products(program)) == len(fast) == 6
    assert not [r for _, r in products(plain) if "f32" in r]  # Keras alone: bf16 results
    np.testing.assert_allclose(got[0], expected[0], rtol=3e-2)
    for ours, theirs in zip(jax.tree.leaves(got[1]), jax.tree.leaves(expected[1]), strict=True):
        scale = np.abs(theirs).max()
        np.testing.assert_allclose(np.asarray(ours, "float32") / scale, theirs / scale, atol=3e-2)


def test_other_products_and_the_originals_are_left_alone():
    einsum, matmul = keras_jax_numpy.einsum, keras_jax_numpy.matmul
    x = jnp.ones((3, 4), jnp.float32)

    def products(a):
        return keras.ops.matmul(a, a.T) + keras.ops.einsum("ab,cb->ac", a, a)

    plain = str(jax.make_jaxpr(products)(x))
    with bf16_products():
        assert keras_jax_numpy.einsum is not einsum
        assert str(jax.make_jaxpr(products)(x)) == plain  # float32 products as they were
        ints = jnp.ones((3, 4), jnp.int8)
        assert keras.ops.einsum("ab,cb->ac", ints, ints).dtype == jnp.int32  # Keras' int8 path
    assert (keras_jax_numpy.einsum, keras_jax_numpy.matmul) == (einsum, matmul)
    with bf16_products(enabled=False):
        assert keras_jax_numpy.einsum is einsum


def test_bf16_activation_times_weight_only_int8_kernel_is_a_fast_product():
    """QLoRA's frozen base (``train.quantize_base``): int8 kernel, bf16 activations. The
    product is bf16 × bf16 with a float32 result, and equals the dequantized kernel's."""
    keras.utils.set_random_seed(0)
    dense = keras.layers.Dense(48, use_bias=False, dtype="mixed_bfloat16")
    dense.build((None, 5, 32))
    float_kernel = np.asarray(dense.kernel.value)
    dense.quantize(
        "int8", config=keras.quantizers.Int8QuantizationConfig(activation_quantizer=None)
    )
    assert str(dense._kernel.dtype) == "int8" and dense.inputs_quantizer is None
    x = np.random.default_rng(0).normal(size=(2, 5, 32)).astype("float32")
    forward = jax.jit(lambda x: dense(x))
    with bf16_products():
        program = forward.lower(x).as_text()
        got = np.asarray(forward(x), "float32")
    (product,) = re.findall(r"stablehlo\.dot_general .*: \((.*)\) -> (.*)", program)
    assert product[0].count("bf16") == 2 and "f32" in product[1]
    expected = x @ float_kernel
    assert np.abs(got - expected).max() < 3e-2 * np.abs(expected).max()
