"""Model loading: tiny presets of each family through ``load_causal_lm``, and its errors."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from gemma_cse.cli import UserError, run
from gemma_cse.models import EMBEDDED, load_causal_lm
from gemma_cse.tiny import FAMILIES, build_tiny_causal_lm, kb_texts

CLASSES = {"gemma3": "Gemma3CausalLM", "gpt2": "GPT2CausalLM", "llama": "LlamaCausalLM"}
PROMPT = "¿Dónde se publica la convocatoria de ingreso?"


def online(host: str) -> bool:
    """Whether ``host`` answers on 443 (tests that need an offline machine skip if so)."""
    try:
        socket.create_connection((host, 443), timeout=2).close()
        return True
    except OSError:
        return False


def user_error(spec: str, match: str) -> str:
    """The one-line ``UserError`` message ``load_causal_lm(spec)`` gives."""
    with pytest.raises(UserError, match=match) as info:
        load_causal_lm(spec)
    message = str(info.value)
    assert "\n" not in message
    return message


# --- the tiny presets -------------------------------------------------------------------------


def test_tiny_presets_are_small_keras_presets(tiny_presets):
    assert set(tiny_presets) == set(FAMILIES)
    for family, path in tiny_presets.items():
        config = json.loads((path / "config.json").read_text())
        assert config["class_name"].lower().startswith(family), config["class_name"]
        assert config["config"]["num_layers"] == 2
        size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
        assert size < 3_000_000, f"{family} preset is {size} bytes"


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_preset_loads_and_generates(tiny_presets, family):
    lm = load_causal_lm(str(tiny_presets[family]))
    assert type(lm).__name__ == CLASSES[family]
    assert lm.backbone.vocabulary_size == lm.preprocessor.tokenizer.vocabulary_size() == 512
    lm.compile(sampler="greedy")
    out = lm.generate(PROMPT, max_length=32)
    assert isinstance(out, str)
    assert out.startswith(PROMPT) and len(out) > len(PROMPT)
    assert lm.generate(PROMPT, max_length=32) == out  # greedy: same text again
    if family == "gemma3":  # a batch gives one string per prompt
        batch = lm.generate([PROMPT, "Hola"], max_length=32)
        assert isinstance(batch, list) and len(batch) == 2
        assert all(isinstance(text, str) for text in batch) and batch[1].startswith("Hola")


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_tokenizer_is_trained_on_the_spanish_kb(tiny_presets, family):
    tokenizer = load_causal_lm(str(tiny_presets[family])).preprocessor.tokenizer
    text = kb_texts()[1]  # the first answer
    ids = np.asarray(tokenizer(text))
    assert tokenizer.detokenize(ids) == text
    assert len(ids) < len(text.encode()) / 2  # learned merges, not just bytes
    if family == "gemma3":
        assert [tokenizer.pad_token_id, tokenizer.end_token_id, tokenizer.start_token_id] == [
            0,
            1,
            2,
        ]
        assert tokenizer.token_to_id("<unk>") == 3
        turn = np.asarray(tokenizer("<start_of_turn>user\nHola<end_of_turn>\n")).tolist()
        assert turn[0] == tokenizer.token_to_id("<start_of_turn>")
        assert tokenizer.token_to_id("<end_of_turn>") in turn
    elif family == "llama":
        assert [tokenizer.token_to_id(t) for t in ("<unk>", "<s>", "</s>")] == [0, 1, 2]
    else:
        assert tokenizer.end_token_id == tokenizer.token_to_id("<|endoftext|>") == 511


def test_tiny_models_are_seeded():
    texts = kb_texts()[:200]
    first, again, other = (build_tiny_causal_lm("llama", texts, seed) for seed in (0, 0, 1))
    for a, b in zip(first.weights, again.weights, strict=True):
        np.testing.assert_array_equal(np.asarray(a.value), np.asarray(b.value))
    embeddings = [np.asarray(m.backbone.token_embedding.embeddings.value) for m in (first, other)]
    assert not np.allclose(*embeddings)


def test_unknown_family():
    with pytest.raises(UserError, match="unknown tiny model family"):
        build_tiny_causal_lm("bert", ["hola"])


# --- the Hugging Face checkpoint --------------------------------------------------------------


def test_hf_checkpoint_gives_the_keras_models_logits(tiny_presets, tiny_hf_checkpoint):
    config = json.loads((tiny_hf_checkpoint / "config.json").read_text())
    assert config["model_type"] == "gemma3_text" and "registered_name" not in config
    for name in ("model.safetensors", "tokenizer.model", "tokenizer_config.json"):
        assert (tiny_hf_checkpoint / name).is_file(), name
    keras_lm = load_causal_lm(str(tiny_presets["gemma3"]))
    hf_lm = load_causal_lm(str(tiny_hf_checkpoint))
    assert type(hf_lm).__name__ == "Gemma3CausalLM"
    ids = np.asarray(keras_lm.preprocessor.tokenizer(PROMPT)).tolist()
    assert np.asarray(hf_lm.preprocessor.tokenizer(PROMPT)).tolist() == ids
    inputs = {"token_ids": np.array([[2, *ids]]), "padding_mask": np.ones((1, len(ids) + 1))}
    expected = np.asarray(keras_lm(inputs))
    assert expected.shape == (1, len(ids) + 1, 512) and expected.std() > 0.01
    np.testing.assert_allclose(np.asarray(hf_lm(inputs)), expected, rtol=1e-4, atol=1e-5)


def test_hf_spec_offline_uses_the_cached_snapshot(tiny_hf_checkpoint, tmp_path, monkeypatch):
    from huggingface_hub import constants

    repo = tmp_path / "models--gemma-cse--tiny"
    commit = "0" * 40
    shutil.copytree(tiny_hf_checkpoint, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert type(load_causal_lm("hf://gemma-cse/tiny")).__name__ == "Gemma3CausalLM"


# --- errors -----------------------------------------------------------------------------------


def test_unknown_spec():
    user_error("no-such-model", "unknown model spec 'no-such-model'")
    user_error("embedded:llama-70b", "unknown embedded model")


def test_directory_without_config(tmp_path):
    user_error(str(tmp_path), "no config.json")


def test_missing_gguf(tmp_path):
    user_error(str(tmp_path / "model.gguf"), "no such GGUF file")


def test_bad_hf_handle():
    user_error("hf://a/b/c", "expected hf://org/name")


def test_hf_download_with_hf_hub_offline_fails_fast(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    message = user_error("hf://gemma-cse/no-such-model", "needs a download")
    assert EMBEDDED in message and "HF_HUB_OFFLINE" in message
    assert time.perf_counter() - start < 5


@pytest.mark.skipif(online("huggingface.co"), reason="needs a machine without internet")
def test_hf_download_without_internet_fails_fast(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    start = time.perf_counter()
    assert EMBEDDED in user_error("hf://google/gemma-3-270m", "needs a download")
    assert time.perf_counter() - start < 10  # huggingface_hub alone retries for ~25 s


@pytest.mark.skipif(online("api.kaggle.com"), reason="needs a machine without internet")
def test_kaggle_preset_without_internet_fails_fast(tmp_path, monkeypatch):
    monkeypatch.setenv("KAGGLEHUB_CACHE", str(tmp_path))
    start = time.perf_counter()
    assert EMBEDDED in user_error("gemma3_instruct_1b", "needs a download")
    assert time.perf_counter() - start < 30


def test_unwritable_cache(tmp_path, monkeypatch):
    # Tests run as root, which chmod does not stop: put the cache below a regular file.
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    monkeypatch.setenv("GEMMA_CSE_CACHE", str(blocker / "cache"))
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    for spec in (EMBEDDED, str(gguf)):
        message = user_error(spec, "is not writable")
        assert str(blocker / "cache") in message and "GEMMA_CSE_CACHE" in message


# --- the command-line error path --------------------------------------------------------------


def test_run_shows_user_error_as_one_line(capsys, monkeypatch):
    monkeypatch.delenv("GEMMA_CSE_DEBUG", raising=False)

    def main(argv):
        assert argv == ["--x"]
        raise UserError("bad input")

    assert run(main, ["--x"]) == 2
    assert capsys.readouterr().err == "error: bad input\n"
    assert run(lambda argv: None, []) == 0
    monkeypatch.setenv("GEMMA_CSE_DEBUG", "1")
    with pytest.raises(UserError):
        run(main, ["--x"])


def test_cli_process_prints_error_without_traceback(tmp_path):
    missing = tmp_path / "missing.gguf"
    code = (
        "import sys\n"
        "from gemma_cse.cli import run\n"
        "from gemma_cse.models import load_causal_lm\n"
        "sys.exit(run(lambda argv: load_causal_lm(argv[0]), sys.argv[1:]))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "GEMMA_CSE_DEBUG"}
    done = subprocess.run(
        [sys.executable, "-c", code, str(missing)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1] == f"error: {missing}: no such GGUF file"
