"""Why decoding and training stay in float32 on this CPU: XLA's matrix products by dtype.

One decode step of Gemma 3 270M multiplies one token's activations by every layer's
projection matrices (18 × q/k/v/o + gate/up/down, 100M weights). This times exactly those
matrix-vector products, jitted as one program, with the weights stored as float32, bfloat16
(product accumulated in float32) and int8 (per-column scales, activations quantized as Keras
int8 layers do), and prints ms per step and the weight bytes read per second. Fewer bytes
only help if XLA's kernel for that dtype runs near memory speed.
Usage: python benchmarks/bench_matmul_dtypes.py [--runs 30]
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

LAYERS = 18
SHAPES = [(640, 1024), (640, 256), (640, 256), (1024, 640), (640, 2048), (640, 2048), (2048, 640)]


def timed(name: str, weights, product, runs: int) -> None:
    @jax.jit
    def step(x, weights):
        pairs = zip(SHAPES * LAYERS, weights, strict=True)
        return sum(product(x[:, :dim], w).sum() for (dim, _), w in pairs)

    x = jnp.asarray(np.random.default_rng(1).normal(size=(1, 2048)), "float32")
    step(x, weights).block_until_ready()
    start = time.perf_counter()
    for _ in range(runs):
        step(x, weights).block_until_ready()
    seconds = (time.perf_counter() - start) / runs
    size = sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(weights))
    rate = size / seconds / 1e9
    print(f"  {name:32s} {seconds * 1e3:7.2f} ms  {size / 1e6:5.0f} MB  {rate:5.1f} GB/s")


def int8_product(x, weight):
    kernel, scale = weight
    x_scale = jnp.abs(x).max() / 127
    quantized = jnp.round(x / x_scale).astype(jnp.int8)
    product = jnp.dot(quantized, kernel, preferred_element_type=jnp.int32)
    return product.astype(jnp.float32) * scale * x_scale


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=30)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    weights = [rng.normal(scale=0.02, size=s).astype("float32") for s in SHAPES * LAYERS]
    print(f"matrix-vector products of one decode step ({jax.devices()[0].device_kind}):")
    timed("float32", [jnp.asarray(w) for w in weights], jnp.dot, args.runs)
    bf16 = [jnp.asarray(w, jnp.bfloat16) for w in weights]
    timed(
        "bfloat16, float32 accumulation",
        bf16,
        lambda x, w: jnp.dot(x.astype(w.dtype), w, preferred_element_type=jnp.float32),
        args.runs,
    )
    scales = [np.abs(w).max(axis=0) / 127 for w in weights]
    int8 = [
        (jnp.asarray(np.round(w / s).astype("int8")), jnp.asarray(s))
        for w, s in zip(weights, scales, strict=True)
    ]
    timed("int8 × int8 → int32 (Keras int8)", int8, int8_product, args.runs)


if __name__ == "__main__":
    main()
