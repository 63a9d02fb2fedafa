"""Decode speed of the embedded Gemma 3 270M: plain KerasHub generate vs our Generator.

Prints new tokens/s (prefill included, compile excluded) for a knowledge-base question:
(a) KerasHub ``generate`` as is (262k-token output layer, max_length 256), (b) our Generator
with length buckets, (c) plus the output layer restricted to the knowledge base's tokens,
(d) plus the attention projections read in place (``prepare_for_decoding``, what the engine
uses); and whether a second request recompiled (JAX jit cache size). llama.cpp on the same GGUF
runs at 62–70 tokens/s on these 2 cores. Usage: python benchmarks/bench_decode.py [--runs 3]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from gemma_cse.data import load_entries, stop_token_id
from gemma_cse.generation import (
    LENGTH_BUCKET,
    DecodingConfig,
    Generator,
    chat_prompt,
    count_compilations,
    prepare_for_decoding,
    restrict_vocabulary,
    vocabulary_for,
)
from gemma_cse.models import load_causal_lm

QUESTION = "¿Cómo solicito una constancia de estudios con calificaciones?"


def timed(fn, runs: int) -> tuple[float, int]:
    fn()  # compile
    rates = []
    for _ in range(runs):
        start = time.perf_counter()
        tokens = fn()
        rates.append(tokens / (time.perf_counter() - start))
    return float(np.median(rates)), tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    causal_lm = load_causal_lm()
    tokenizer = causal_lm.preprocessor.tokenizer
    prompt = chat_prompt(tokenizer, [], QUESTION)
    prompt_len = len(np.asarray(tokenizer.tokenize(prompt))) + 1
    # Every variant decodes exactly up to one length bucket, with no stop token: same count.
    args.new_tokens = LENGTH_BUCKET - prompt_len
    # Force a fixed number of new tokens: no stop token, so every variant decodes the same count.
    causal_lm.compile(sampler="greedy")

    def plain():
        causal_lm.preprocessor.sequence_length = prompt_len + args.new_tokens
        causal_lm.generate(prompt, stop_token_ids=None)
        return args.new_tokens

    rate_plain, _ = timed(plain, args.runs)
    generator = Generator(causal_lm, DecodingConfig(max_new_tokens=args.new_tokens))
    generator.stop_ids = None  # same fixed count as above

    def ours():
        return generator.generate(prompt).new_tokens

    rate_bucketed, _ = timed(ours, args.runs)
    entries = load_entries()
    texts = [t for e in entries for t in (*e.questions, e.answer, e.source)]
    vocab = vocabulary_for(tokenizer, texts)
    restrict_vocabulary(causal_lm, vocab)
    generator = Generator(causal_lm, DecodingConfig(max_new_tokens=args.new_tokens))
    generator.stop_ids = None
    rate_subset, _ = timed(ours, args.runs)
    prepare_for_decoding(causal_lm, vocab)
    generator = Generator(causal_lm, DecodingConfig(max_new_tokens=args.new_tokens))
    generator.stop_ids = None
    rate_prepared, _ = timed(ours, args.runs)
    compilations = count_compilations()
    generator.generate(chat_prompt(tokenizer, [], "¿Cuándo es la reinscripción?"))
    recompiled = bool(compilations)

    print(f"decode, embedded Gemma 3 270M, prompt {prompt_len} tokens, {args.new_tokens} new:")
    print(f"  a) KerasHub generate, full vocab      {rate_plain:6.1f} tokens/s")
    print(f"  b) Generator, length buckets          {rate_bucketed:6.1f} tokens/s")
    print(f"  c) + KB vocabulary ({len(vocab):,} tokens)  {rate_subset:6.1f} tokens/s")
    print(f"  d) + heads projections in place     {rate_prepared:6.1f} tokens/s")
    print(f"  second request of another length recompiled: {recompiled}")
    print(f"  stop token id: {stop_token_id(tokenizer)}")


if __name__ == "__main__":
    main()
