"""LoRA training step speed on the embedded Gemma 3 270M: KerasHub's plain step vs ours.

Prints seconds per step and tokens/s at batch 4 × 128 for (a) the standard CausalLM step
(logits for every position over the 262k vocabulary), (b) logits only at the answer
positions, (c) answer positions over the vocabulary the data uses, (d) = (c) with
``mixed_bfloat16`` as Keras computes it, (e) = (d) with ``precision.bf16_products`` (what
``train`` runs on a CPU with native bf16), (f)/(g) = (e) on a QLoRA base (``quantize`` int8 /
int4, ``train.quantize_base``); then the weight memory of each base and an epoch estimate
with length bucketing.
Usage: python benchmarks/bench_train_step.py [--steps 3]
"""

from __future__ import annotations

import argparse
import time

from gemma_cse.config import Config
from gemma_cse.data import load_entries, make_splits, pack
from gemma_cse.precision import bf16_products
from gemma_cse.train import (
    AnswerOnlyLM,
    answer_token_loss,
    build_model,
    encode_entries,
    make_batches,
    vocabulary,
)

BATCH, SEQ = 4, 128


def timed_steps(model, x, y, w, steps: int) -> float:
    model.train_on_batch(x, y, sample_weight=w)  # compile
    start = time.perf_counter()
    for _ in range(steps):
        model.train_on_batch(x, y, sample_weight=w)
    return (time.perf_counter() - start) / steps


def compile_model(model) -> None:
    import keras  # after gemma_cse, which selects the JAX backend

    model.compile(
        optimizer=keras.optimizers.AdamW(1e-4),
        loss=answer_token_loss(),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    config = Config(sequence_length=SEQ, allow_truncation=True, batch_size=BATCH)
    causal_lm = build_model(config)
    tokenizer = causal_lm.preprocessor.tokenizer
    splits = make_splits(load_entries())
    encoded = encode_entries(tokenizer, splits.train, config)
    rows = sorted(encoded, key=lambda e: len(e[0]))[len(encoded) // 2 :][:BATCH]  # longer half
    results = {}

    x, y, w = pack(rows, SEQ)
    causal_lm.preprocessor = None
    compile_model(causal_lm)
    results["a) full logits, 262k vocab"] = timed_steps(causal_lm, x, y, w, args.steps)

    for label, subset in (
        ("b) answer positions, 262k vocab", False),
        ("c) answer positions, data vocab", True),
    ):
        vocab_ids, index = vocabulary([encoded], tokenizer) if subset else (None, None)
        batch = make_batches(rows, BATCH, index, seed=0, shuffle=False)[0]
        model = AnswerOnlyLM(causal_lm.backbone, vocab_ids)
        compile_model(model)
        bx, by, bw = batch
        bx = {**bx, "token_ids": x["token_ids"], "padding_mask": x["padding_mask"]}  # same 4×128
        results[label] = timed_steps(model, bx, by, bw, args.steps)

    # the same step in mixed precision: a second model, loaded with the mixed policy
    vocab_ids, index = vocabulary([encoded], tokenizer)
    batch = make_batches(rows, BATCH, index, seed=0, shuffle=False)[0]
    bx, by, bw = batch
    bx = {**bx, "token_ids": x["token_ids"], "padding_mask": x["padding_mask"]}
    mixed = build_model(Config(precision="mixed_bfloat16", sequence_length=SEQ))
    bases = {"e) (d) with bf16_products": mixed.backbone}
    for label, fast in (
        ("d) (c) in mixed_bfloat16, Keras", False),
        ("e) (d) with bf16_products", True),
    ):
        with bf16_products(enabled=fast):
            model = AnswerOnlyLM(mixed.backbone, vocab_ids)
            compile_model(model)
            results[label] = timed_steps(model, bx, by, bw, args.steps)
    del mixed, model
    for label, mode in (("f) (e), QLoRA int8 base", "int8"), ("g) (e), QLoRA int4 base", "int4")):
        quantized = build_model(Config(precision="mixed_bfloat16", quantize=mode))
        bases[label] = quantized.backbone
        with bf16_products():
            model = AnswerOnlyLM(quantized.backbone, vocab_ids)
            compile_model(model)
            results[label] = timed_steps(model, bx, by, bw, args.steps)

    base = results["a) full logits, 262k vocab"]
    print(
        f"LoRA step, embedded Gemma 3 270M, batch {BATCH} × {SEQ} tokens, {args.steps} timed steps:"
    )
    for label, seconds in results.items():
        rate = BATCH * SEQ / seconds
        print(f"  {label:36s} {seconds:6.2f} s/step  {rate:7.1f} tokens/s  ×{base / seconds:.2f}")
    for label, backbone in bases.items():
        frozen = sum(v.numpy().nbytes for v in backbone.non_trainable_weights)
        embedding = sum(v.numpy().nbytes for v in backbone.token_embedding.weights)
        layers = (frozen - embedding) / 2**20
        print(
            f"  frozen weights, {label[:2]} {frozen / 2**20:6.0f} MiB "
            f"(embedding {embedding / 2**20:.0f} MiB, transformer layers {layers:.0f} MiB)"
        )
    real_tokens = sum(len(ids) for ids, _ in encoded)
    best = min(results.values())
    print(
        f"epoch estimate ({len(encoded)} train examples, {real_tokens} real tokens, bucketed): "
        f"{real_tokens / (BATCH * SEQ / best) / 60:.1f} min at the fastest rate"
    )


if __name__ == "__main__":
    main()
