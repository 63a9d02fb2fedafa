"""Decode speed of the embedded Gemma 3 270M: plain KerasHub generate, our decoding, llama.cpp.

Part 1, a fixed count of new tokens (no stop token) after a short question, base model:
(a) KerasHub ``generate`` as is (262k-token output layer), (b) the output layer restricted
to the knowledge base's tokens, (c) plus LoRA merged and the attention projections read in
place (``prepare_for_decoding``), (d) plus prompt-lookup decoding (what the engine runs),
(e) llama.cpp (llama-cpp-python, if installed) on the same GGUF and prompt. Rates are new
tokens/s with prefill included and compilation excluded.

Part 2, the engine's default (``rag_lora``: the committed adapter, grounded prompts) on the
first ``--questions`` test questions: greedy decoding without and with prompt lookup, the
same prepared model. Prints tokens/s, tokens per forward pass, how many answers are
identical (the quality cost of prompt lookup: it should be none), and that answering the
same prompts again compiles nothing. Usage: python benchmarks/bench_decode.py [--runs 3]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from gemma_cse.data import load_entries, make_splits
from gemma_cse.engine import DEFAULT_ADAPTER, SOURCES_IN_PROMPT, load_generator
from gemma_cse.generation import (
    LENGTH_BUCKET,
    DecodingConfig,
    Generator,
    chat_prompt,
    count_compilations,
    grounded_message,
    prepare_for_decoding,
    restrict_vocabulary,
    vocabulary_for,
)
from gemma_cse.models import load_causal_lm
from gemma_cse.retrieval import Retriever

QUESTION = "¿Cómo solicito una constancia de estudios con calificaciones?"


def timed(fn, runs: int) -> float:
    """Median new tokens/s of ``fn`` (which returns its token count), after one warm-up."""
    fn()
    rates = []
    for _ in range(runs):
        start = time.perf_counter()
        tokens = fn()
        rates.append(tokens / (time.perf_counter() - start))
    return float(np.median(rates))


def llama_cpp_decoder():
    """``decode(prompt, count)``: llama.cpp greedy on the embedded GGUF, or None if absent."""
    try:
        import llama_cpp
    except ImportError:
        return None
    from gemma_cse.models import embedded_gguf

    llm = llama_cpp.Llama(str(embedded_gguf()), n_ctx=1024, n_threads=2, verbose=False)

    def decode(prompt: str, count: int) -> int:
        ids = [llm.token_bos(), *llm.tokenize(prompt.encode(), add_bos=False, special=True)]
        for made, _ in enumerate(llm.generate(ids, top_k=1, temp=0.0, reset=True), 1):
            if made == count:
                return made

    return decode


def fixed_count(args) -> None:
    causal_lm = load_causal_lm()
    tokenizer = causal_lm.preprocessor.tokenizer
    prompt = chat_prompt(tokenizer, [], QUESTION)
    prompt_len = len(np.asarray(tokenizer.tokenize(prompt))) + 1
    new_tokens = LENGTH_BUCKET - prompt_len  # exactly one length bucket, no stop token
    causal_lm.compile(sampler="greedy")

    def plain():
        causal_lm.generate(prompt, max_length=prompt_len + new_tokens, stop_token_ids=None)
        return new_tokens

    def ours(lookup: bool):
        generator = Generator(causal_lm, DecodingConfig(max_new_tokens=new_tokens), lookup)
        generator.stop_ids = ()  # the same fixed count as above
        return lambda: generator.generate(prompt).new_tokens

    rates = {"a) KerasHub generate, full vocabulary": timed(plain, args.runs)}
    entries = load_entries()
    vocab = vocabulary_for(tokenizer, [t for e in entries for t in (*e.questions, e.answer)])
    restrict_vocabulary(causal_lm, vocab)
    rates[f"b) + KB vocabulary ({len(vocab):,} tokens)"] = timed(ours(False), args.runs)
    prepare_for_decoding(causal_lm, vocab)
    rates["c) + attention projections in place"] = timed(ours(False), args.runs)
    rates["d) + prompt lookup (the engine)"] = timed(ours(True), args.runs)
    llama = llama_cpp_decoder()
    rates["e) llama.cpp, same GGUF, 2 threads"] = (
        timed(lambda: llama(prompt, new_tokens), args.runs) if llama else None
    )
    print(f"part 1: base model, prompt {prompt_len} tokens, {new_tokens} new tokens, no stop")
    for name, rate in rates.items():
        print(f"  {name:42s} {'not installed' if rate is None else f'{rate:6.1f} tokens/s'}")


def grounded(args) -> None:
    entries = load_entries()
    splits = make_splits(entries)
    retriever = Retriever(entries)
    generator = load_generator("embedded:gemma3-270m", DEFAULT_ADAPTER, entries, DecodingConfig())
    tokenizer = generator.tokenizer
    prompts = []
    for example in splits.test[: args.questions]:
        hits = retriever.search(example.question, k=SOURCES_IN_PROMPT)
        message = grounded_message(example.question, [h.entry for h in hits])
        prompts.append(chat_prompt(tokenizer, [], message))
    results, compiled = {}, {}
    for lookup in (False, True):
        generator.lookup = lookup
        for prompt in prompts:  # compile every length bucket first: rates without compiling
            generator.generate(prompt)
        compilations = count_compilations()
        results[lookup] = [generator.generate(p) for p in prompts]
        compiled[lookup] = len(compilations)
    print(f"part 2: rag_lora ({DEFAULT_ADAPTER.name}), {len(prompts)} grounded test prompts")
    for lookup, gens in results.items():
        tokens = sum(g.new_tokens for g in gens)
        seconds = sum(g.seconds for g in gens)
        passes = sum(g.forward_passes for g in gens)
        name = "prompt lookup" if lookup else "greedy, one token a step"
        print(
            f"  {name:26s} {tokens / seconds:6.1f} tokens/s (prefill included), "
            f"{tokens / max(passes, 1):.2f} tokens per forward pass, {tokens} tokens"
        )
    llama = llama_cpp_decoder()
    if llama:  # the same prompts, each for as many tokens as our answer: the same work
        start = time.perf_counter()
        counts = [max(g.new_tokens, 1) for g in results[True]]
        tokens = sum(llama(p, n) for p, n in zip(prompts, counts, strict=True))
        rate = tokens / (time.perf_counter() - start)
        print(f"  {'llama.cpp, base GGUF':26s} {rate:6.1f} tokens/s (prefill included)")
    pairs = zip(results[False], results[True], strict=True)
    same = sum(a.token_ids == b.token_ids for a, b in pairs)
    print(f"  identical answers: {same}/{len(prompts)}")
    print(f"  programs compiled while answering them again: {compiled}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--questions", type=int, default=20)
    args = parser.parse_args()
    fixed_count(args)
    grounded(args)


if __name__ == "__main__":
    main()
