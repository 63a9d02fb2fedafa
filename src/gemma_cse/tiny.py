"""Tiny randomly initialised models, so the whole pipeline can be tested in seconds.

Each tiny model is a real KerasHub ``CausalLM`` (2 layers, hidden 64, vocabulary 512) with a
real tokenizer trained on the project's Spanish knowledge base, saved as an ordinary preset
directory. Tests load it through ``models.load_causal_lm`` exactly like a real model, so the
loading, prompting, fine-tuning and generation code runs unchanged, only without the cost of
the real weights. ``write_tiny_hf_checkpoint`` exports one with KerasHub's own Hugging Face
exporter, to test the Transformers-format loader the same way. Everything is seeded, so the
same call writes the same model.
"""

from __future__ import annotations

import io
import json
import os
import re
import zlib
from collections import Counter, defaultdict
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from gemma_cse.cli import UserError

FAMILIES = ("gemma3", "gpt2", "llama")
KB_DIR = Path(__file__).resolve().parents[2] / "data" / "cse" / "kb"
VOCAB_SIZE = 512
SEQUENCE_LENGTH = 256
SIZES = {"num_layers": 2, "hidden_dim": 64, "intermediate_dim": 128}


def kb_texts(kb_dir: str | Path = KB_DIR) -> list[str]:
    """Every question, answer and variant in the knowledge base (``*.jsonl``), in file order."""
    texts = []
    for file in sorted(Path(kb_dir).glob("*.jsonl")):
        for line in file.read_text(encoding="utf-8").splitlines():
            if line.strip():
                record = json.loads(line)
                texts += [record["question"], record["answer"], *record.get("variants", [])]
    if not texts:
        raise UserError(f"{kb_dir}: no knowledge base (*.jsonl) to train a tiny tokenizer on")
    return texts


def sentencepiece_proto(texts: Iterable[str], family: str, seed: int = 0) -> bytes:
    """A byte-fallback BPE SentencePiece model, trained in memory, with the family's tokens."""
    import sentencepiece as spm

    if family == "gemma3":  # Gemma's ids and its whitespace-preserving normalisation.
        special = dict(pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece="<pad>")
        special.update(eos_piece="<eos>", bos_piece="<bos>", unk_piece="<unk>")
        special.update(user_defined_symbols=["<start_of_turn>", "<end_of_turn>"])
        special.update(add_dummy_prefix=False, allow_whitespace_only_pieces=True)
    else:  # Llama 2: <unk>=0, <s>=1, </s>=2, no padding piece.
        special = dict(unk_id=0, bos_id=1, eos_id=2, pad_id=-1)
        special.update(unk_piece="<unk>", bos_piece="<s>", eos_piece="</s>")
    spm.set_random_generator_seed(seed)
    model = io.BytesIO()
    with open(os.devnull, "w") as quiet:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(list(texts)),
            model_writer=model,
            logstream=quiet,
            model_type="bpe",
            vocab_size=VOCAB_SIZE,
            byte_fallback=True,
            character_coverage=0.9995,
            split_digits=True,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            num_threads=1,
            **special,
        )
    return model.getvalue()


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte → printable character map (the alphabet of its byte-level BPE)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    printable += range(ord("®"), ord("ÿ") + 1)
    others = [b for b in range(256) if b not in printable]
    return {b: chr(b) for b in printable} | {b: chr(256 + i) for i, b in enumerate(others)}


def byte_level_bpe(texts: Iterable[str], num_merges: int) -> tuple[dict[str, int], list[str]]:
    """GPT-2-style vocabulary and merges learned on ``texts`` (ties broken by the pair itself)."""
    alphabet = bytes_to_unicode()
    counts = Counter()
    for text in texts:
        for word in re.findall(r" ?[^\W\d_]+| ?\d+| ?[^\s\w]+|\s+", text):
            counts[tuple(alphabet[b] for b in word.encode("utf-8"))] += 1
    words = [list(word) for word in counts]
    freq = list(counts.values())
    pairs, where = Counter(), defaultdict(set)
    for i, word in enumerate(words):
        for pair in zip(word, word[1:], strict=False):
            pairs[pair] += freq[i]
            where[pair].add(i)
    merges = []
    while pairs and len(merges) < num_merges:
        best = max(pairs, key=lambda pair: (pairs[pair], pair))
        merges.append(best)
        for i in where.pop(best):
            word, out, j = words[i], [], 0
            for pair in zip(word, word[1:], strict=False):
                pairs[pair] -= freq[i]
            while j < len(word):
                if tuple(word[j : j + 2]) == best:
                    out.append(best[0] + best[1])
                    j += 2
                else:
                    out.append(word[j])
                    j += 1
            for pair in zip(out, out[1:], strict=False):
                pairs[pair] += freq[i]
                where[pair].add(i)
            words[i] = out
        pairs = +pairs  # drop pairs no word has any more
    tokens = [*alphabet.values(), *(a + b for a, b in merges), "<|endoftext|>"]
    vocabulary = {}
    for token in tokens:
        vocabulary.setdefault(token, len(vocabulary))
    return vocabulary, [f"{a} {b}" for a, b in merges]


def randomize(model, seed: int, stddev: float = 0.02) -> None:
    """Seeded normal weights, independent of Keras' global RNG; constant ones (norms) kept."""
    for variable in model.weights:
        value = np.asarray(variable.value)
        if value.size and np.all(value == value.flat[0]):
            continue
        rng = np.random.default_rng([seed, zlib.crc32(variable.path.encode())])
        variable.assign(rng.normal(0.0, stddev, value.shape).astype(value.dtype))


def build_tiny_causal_lm(family: str, texts: Iterable[str] | None = None, seed: int = 0):
    """A tiny random ``CausalLM`` of ``family`` with a tokenizer trained on ``texts``."""
    import keras_hub

    if family not in FAMILIES:
        raise UserError(f"unknown tiny model family {family!r}; expected one of {FAMILIES}")
    texts = kb_texts() if texts is None else list(texts)
    models = keras_hub.models
    if family == "gemma3":
        proto = sentencepiece_proto(texts, family, seed)
        tokenizer = models.Gemma3Tokenizer(proto=proto, has_vision_tokens=False)
        backbone = models.Gemma3Backbone(
            vocabulary_size=tokenizer.vocabulary_size(),
            image_size=None,
            num_query_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            use_post_ffw_norm=True,
            use_post_attention_norm=True,
            use_sliding_window_attention=True,
            sliding_window_size=512,
            dtype="float32",
            **SIZES,
        )
        preprocessor = models.Gemma3CausalLMPreprocessor(tokenizer, sequence_length=SEQUENCE_LENGTH)
        causal_lm = models.Gemma3CausalLM(backbone=backbone, preprocessor=preprocessor)
    elif family == "gpt2":
        vocabulary, merges = byte_level_bpe(texts, VOCAB_SIZE - 257)
        tokenizer = models.GPT2Tokenizer(vocabulary=vocabulary, merges=merges)
        backbone = models.GPT2Backbone(
            vocabulary_size=tokenizer.vocabulary_size(),
            num_heads=4,
            max_sequence_length=2 * SEQUENCE_LENGTH,
            dtype="float32",
            **SIZES,
        )
        preprocessor = models.GPT2CausalLMPreprocessor(tokenizer, sequence_length=SEQUENCE_LENGTH)
        causal_lm = models.GPT2CausalLM(backbone=backbone, preprocessor=preprocessor)
    else:
        tokenizer = models.LlamaTokenizer(proto=sentencepiece_proto(texts, family, seed))
        backbone = models.LlamaBackbone(
            vocabulary_size=tokenizer.vocabulary_size(),
            num_query_heads=4,
            num_key_value_heads=2,
            dtype="float32",
            **SIZES,
        )
        preprocessor = models.LlamaCausalLMPreprocessor(tokenizer, sequence_length=SEQUENCE_LENGTH)
        causal_lm = models.LlamaCausalLM(backbone=backbone, preprocessor=preprocessor)
    randomize(causal_lm, seed)
    return causal_lm


def write_tiny_preset(
    family: str, path: str | Path, texts: Iterable[str] | None = None, seed: int = 0
) -> Path:
    """Write a tiny ``family`` model ("gemma3", "gpt2", "llama") as a KerasHub preset dir."""
    path = Path(path)
    build_tiny_causal_lm(family, texts, seed).save_to_preset(str(path))
    return path


def write_tiny_hf_checkpoint(
    path: str | Path, source: str | Path | None = None, texts: Iterable[str] | None = None
) -> Path:
    """Export a tiny Gemma 3 (``source`` preset, or a fresh one) in Hugging Face format.

    KerasHub's own exporter writes config.json, model.safetensors and the tokenizer files, so
    loading the folder goes through KerasHub's Transformers loader.
    """
    import keras_hub

    if source is None:
        causal_lm = build_tiny_causal_lm("gemma3", texts)
    else:
        causal_lm = keras_hub.models.CausalLM.from_preset(str(source))
    path = Path(path)
    causal_lm.export_to_transformers(str(path))
    return path
