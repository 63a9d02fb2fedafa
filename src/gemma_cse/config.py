"""One frozen, typed training config: YAML file + ``--set key=value`` overrides, checked."""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass
from pathlib import Path

import yaml

from gemma_cse.cli import UserError
from gemma_cse.models import EMBEDDED

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"


@dataclass(frozen=True)
class Config:
    """Everything a training run needs; written into the run directory as resolved."""

    name: str = "cse_gemma3_270m"
    model: str = EMBEDDED
    data: str = "data/cse/kb"
    runs_dir: str = "runs"
    seed: int = 13
    # LoRA / QLoRA
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_targets: str = "query_value"  # query_value | attention | all
    quantize: str = "none"  # none | int8 | int4: the frozen base, weight-only (QLoRA)
    # optimisation
    epochs: int = 3
    batch_size: int = 4
    prompt: str = (
        "question"  # question (closed book) | grounded (sources in the prompt, as rag_lora)
    )
    sequence_length: int = 192
    allow_truncation: bool = False
    learning_rate: float = 2e-4
    warmup_fraction: float = 0.1
    weight_decay: float = 0.0
    early_stopping_patience: int = 2
    max_steps_per_epoch: int = 0  # 0: the whole training split each epoch
    # speed
    # auto: mixed_bfloat16 on a GPU or a CPU with native bf16 (AVX512-BF16/AMX), else float32
    precision: str = "auto"  # auto | float32 | mixed_bfloat16 | bfloat16
    vocab_subset: bool = True  # output layer over the tokens the data uses only
    distribution: str = "auto"  # auto | none | data | model
    # monitoring
    sample_questions: int = 2  # validation questions answered and logged at each epoch end
    sample_max_new_tokens: int = 48

    def __post_init__(self):
        choices = {
            "lora_targets": ("query_value", "attention", "all"),
            "prompt": ("question", "grounded"),
            "quantize": ("none", "int8", "int4"),
            "precision": ("auto", "float32", "mixed_bfloat16", "bfloat16"),
            "distribution": ("auto", "none", "data", "model"),
        }
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise UserError(
                    f"config {key}={getattr(self, key)!r}: expected one of {', '.join(allowed)}"
                )
        for key in ("lora_rank", "epochs", "batch_size", "sequence_length"):
            if getattr(self, key) < 1:
                raise UserError(f"config {key} must be ≥ 1, got {getattr(self, key)}")

    @property
    def run_dir(self) -> Path:
        return Path(self.runs_dir) / self.name

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _field_types() -> dict[str, type]:
    hints = typing.get_type_hints(Config)
    return {f.name: hints[f.name] for f in dataclasses.fields(Config)}


def _coerce(key: str, value, kind: type, where: str):
    if isinstance(kind, types.UnionType):
        kind = next(t for t in typing.get_args(kind) if t is not type(None))
    if kind is bool:
        if isinstance(value, bool):
            return value
        if str(value).lower() in ("true", "1", "yes"):
            return True
        if str(value).lower() in ("false", "0", "no"):
            return False
    elif kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    elif isinstance(value, kind) and not isinstance(value, bool):  # int or str as declared
        return value
    elif isinstance(value, str) and kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    raise UserError(f"{where}: {key} must be {kind.__name__}, got {value!r}")


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """Read a YAML config (all keys optional), apply ``key=value`` overrides, validate."""
    fields = _field_types()
    values: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise UserError(f"{path}: no such config file")
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as err:
            raise UserError(f"{path}: invalid YAML ({err})".replace("\n", " ")) from None
        except UnicodeDecodeError as err:
            raise UserError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
        if not isinstance(loaded, dict):
            raise UserError(f"{path}: expected a mapping of config keys")
        for key, value in loaded.items():
            values[key] = (value, str(path))
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise UserError(f"--set {item!r}: expected key=value")
        values[key.strip()] = (yaml.safe_load(value) if value else "", f"--set {key.strip()}")
    resolved = {}
    for key, (value, where) in values.items():
        if key not in fields:
            near = difflib.get_close_matches(str(key), fields, n=3, cutoff=0.75) or [
                f for f in fields if f.split("_")[0] == str(key).split("_")[0]
            ]
            hint = f" (did you mean {', '.join(near)}?)" if near else ""
            raise UserError(f"{where}: unknown config key {key!r}{hint}")
        resolved[key] = _coerce(key, value, fields[key], where)
    if path is not None and "name" not in resolved:
        resolved["name"] = Path(path).stem
    return Config(**resolved)


def save_config(config: Config, path: Path) -> None:
    path.write_text(
        yaml.safe_dump(config.to_dict(), sort_keys=False, allow_unicode=True), encoding="utf-8"
    )
