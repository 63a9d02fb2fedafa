"""Shared fixtures: tiny random models written once per session, and a session model cache."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import gemma_cse  # noqa: F401  (sets KERAS_BACKEND=jax before anything imports Keras)


def pytest_configure(config):
    """Keep JAX's compiled programs in pytest's cache dir (.pytest_cache) between sessions.

    On CPU, XLA takes ~0.5 s per weight shape just to compile the random initialisers, and
    seconds per ``generate``; reusing them roughly halves a rerun. A cache dir the user set
    is kept; ``-p no:cacheprovider`` turns this off.
    """
    cache = getattr(config, "cache", None)
    if cache is not None and "JAX_COMPILATION_CACHE_DIR" not in os.environ:
        os.environ["JAX_COMPILATION_CACHE_DIR"] = str(cache.mkdir("jax"))
        os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
        os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")


@pytest.fixture(scope="session", autouse=True)
def gemma_cse_cache(tmp_path_factory):
    """``GEMMA_CSE_CACHE`` for the session: a fresh temp dir unless the user set one.

    Tests convert models into the cache, so by default they must not write into the user's
    ~/.cache/gemma_cse. But a GEMMA_CSE_CACHE the user set is kept as it is: tests marked
    ``embedded`` use the real model already converted there, and pointing them at an empty
    dir would reconvert it every session. For the same reason an embedded model found in the
    default cache is linked (read-only use) into the temp dir.
    """
    if os.environ.get("GEMMA_CSE_CACHE"):
        yield Path(os.environ["GEMMA_CSE_CACHE"])
        return
    cache = tmp_path_factory.mktemp("gemma_cse_cache")
    default = Path("~/.cache/gemma_cse").expanduser()
    found = [*default.glob("gguf/*.gguf"), *default.glob("presets/gemma3-270m/config.json")]
    for target in (p.parent if p.name == "config.json" else p for p in found):
        link = cache / target.relative_to(default)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(target)
    os.environ["GEMMA_CSE_CACHE"] = str(cache)
    yield cache
    os.environ.pop("GEMMA_CSE_CACHE", None)


@pytest.fixture(scope="session")
def tiny_presets(tmp_path_factory) -> dict[str, Path]:
    """family ("gemma3", "gpt2", "llama") -> a tiny random KerasHub preset directory."""
    from gemma_cse.tiny import FAMILIES, kb_texts, write_tiny_preset

    root = tmp_path_factory.mktemp("tiny_presets")
    texts = kb_texts()
    return {family: write_tiny_preset(family, root / family, texts) for family in FAMILIES}


@pytest.fixture(scope="session")
def tiny_hf_checkpoint(tmp_path_factory, tiny_presets) -> Path:
    """The tiny Gemma 3 preset exported in Hugging Face format (config.json + safetensors)."""
    from gemma_cse.tiny import write_tiny_hf_checkpoint

    path = tmp_path_factory.mktemp("tiny_hf") / "gemma3"
    return write_tiny_hf_checkpoint(path, source=tiny_presets["gemma3"])
