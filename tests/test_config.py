"""The training config: YAML file + ``--set`` overrides, type-checked, with one-line errors."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from gemma_cse.cli import UserError
from gemma_cse.config import CONFIG_DIR, Config, load_config, save_config

SHIPPED = sorted(CONFIG_DIR.glob("*.yaml"))


def write(tmp_path: Path, text: str, name: str = "run.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def config_error(*args, **kwargs) -> str:
    """The message of the ``UserError`` that ``load_config(*args)`` raises: one line."""
    with pytest.raises(UserError) as info:
        load_config(*args, **kwargs)
    message = str(info.value)
    assert message and "\n" not in message, message
    return message


# --- YAML -------------------------------------------------------------------------------------


def test_yaml_values_are_typed_and_the_name_is_the_file_stem(tmp_path):
    path = write(
        tmp_path,
        "model: hf://org/model\nlora_rank: 16\nlora_alpha: 32\nlearning_rate: 3e-4\n"
        "allow_truncation: yes\nvocab_subset: false\nquantize: int8\n",
        name="my_run.yaml",
    )
    config = load_config(path)
    assert config.name == "my_run"
    assert config.model == "hf://org/model"
    assert config.lora_rank == 16 and type(config.lora_rank) is int
    # an int given for a float, and YAML 1.1's "3e-4" (a string to PyYAML) are floats
    assert config.lora_alpha == 32.0 and type(config.lora_alpha) is float
    assert config.learning_rate == pytest.approx(3e-4) and type(config.learning_rate) is float
    assert config.allow_truncation is True and config.vocab_subset is False
    assert config.quantize == "int8"
    assert config.epochs == Config().epochs  # keys left out keep their defaults


def test_an_explicit_name_and_an_empty_file(tmp_path):
    assert load_config(write(tmp_path, "name: other\n")).name == "other"
    empty = load_config(write(tmp_path, "", name="empty.yaml"))
    assert empty == dataclasses.replace(Config(), name="empty")


def test_no_file_gives_the_defaults():
    assert load_config(None) == Config()


def test_config_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        Config().epochs = 5  # type: ignore[misc]


def test_save_then_load_round_trips(tmp_path):
    config = load_config(None, ["name=x", "learning_rate=1e-5", "allow_truncation=true"])
    save_config(config, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == config


# --- --set overrides --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("item", "key", "expected"),
    [
        ("epochs=5", "epochs", 5),
        ("learning_rate=3e-4", "learning_rate", 3e-4),
        ("learning_rate=0.001", "learning_rate", 0.001),
        ("learning_rate=1", "learning_rate", 1.0),
        ("lora_alpha=8", "lora_alpha", 8.0),
        ("allow_truncation=true", "allow_truncation", True),
        ("allow_truncation=True", "allow_truncation", True),
        ("vocab_subset=false", "vocab_subset", False),
        ("vocab_subset=0", "vocab_subset", False),
        ("model=/tmp/some preset", "model", "/tmp/some preset"),
        ("model=hf://datificate/gpt2-small-spanish", "model", "hf://datificate/gpt2-small-spanish"),
        ("data=a=b.jsonl", "data", "a=b.jsonl"),  # only the first "=" splits
        (" epochs = 4", "epochs", 4),
    ],
)
def test_set_overrides_are_typed(item, key, expected):
    value = getattr(load_config(None, [item]), key)
    assert value == expected
    assert type(value) is type(expected)


def test_set_overrides_the_file_and_later_sets_win(tmp_path):
    path = write(tmp_path, "epochs: 3\nbatch_size: 2\n")
    config = load_config(path, ["epochs=9", "batch_size=4", "batch_size=6"])
    assert (config.epochs, config.batch_size) == (9, 6)
    assert config.name == "run"  # the file's stem still names it


@pytest.mark.parametrize(
    ("item", "fragment"),
    [
        ("epochs=three", "epochs must be int, got 'three'"),
        ("epochs=2.5", "epochs must be int, got 2.5"),
        ("epochs=true", "epochs must be int, got True"),
        ("epochs=", "epochs must be int"),
        ("learning_rate=fast", "learning_rate must be float, got 'fast'"),
        ("learning_rate=true", "learning_rate must be float, got True"),
        ("allow_truncation=maybe", "allow_truncation must be bool, got 'maybe'"),
        ("allow_truncation=2", "allow_truncation must be bool, got 2"),
        ("name=[a, b]", "name must be str"),
    ],
)
def test_set_type_errors_name_the_key_and_value(item, fragment):
    message = config_error(None, [item])
    assert message.startswith(f"--set {item.split('=')[0]}: "), message
    assert fragment in message


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("epochs: 2.5\n", "epochs must be int, got 2.5"),
        ("epochs: ~\n", "epochs must be int, got None"),
        ("learning_rate: [1, 2]\n", "learning_rate must be float"),
        ("vocab_subset: sometimes\n", "vocab_subset must be bool, got 'sometimes'"),
        ("model: 7\n", "model must be str, got 7"),
    ],
)
def test_yaml_type_errors_name_the_file_and_key(tmp_path, text, fragment):
    path = write(tmp_path, text)
    message = config_error(path)
    assert message.startswith(f"{path}: "), message
    assert fragment in message


def test_set_without_equals_sign():
    assert "expected key=value" in config_error(None, ["epochs"])


# --- unknown keys, bad choices ------------------------------------------------------------------


def test_unknown_key_in_file_names_file_and_key(tmp_path):
    path = write(tmp_path, "epochs: 2\nlearning_rte: 0.1\n")
    message = config_error(path)
    assert message.startswith(f"{path}: unknown config key 'learning_rte'"), message
    assert "learning_rate" in message  # the suggestion


def test_unknown_key_in_set_names_the_key():
    message = config_error(None, ["lora_rnk=4"])
    assert message.startswith("--set lora_rnk: unknown config key 'lora_rnk'"), message
    assert "lora_rank" in message
    assert "did you mean" not in config_error(None, ["zzz=1"])


def test_non_string_key_in_file(tmp_path):
    message = config_error(write(tmp_path, "1: 2\n"))
    assert "unknown config key 1" in message


@pytest.mark.parametrize(
    ("item", "key"),
    [
        ("lora_targets=everything", "lora_targets"),
        ("quantize=int3", "quantize"),
        ("precision=float16", "precision"),
        ("distribution=pipeline", "distribution"),
    ],
)
def test_bad_choices_list_the_allowed_values(item, key):
    message = config_error(None, [item])
    bad = item.split("=")[1]
    assert message.startswith(f"config {key}={bad!r}: expected one of "), message
    for allowed in {
        "lora_targets": ("query_value", "attention", "all"),
        "quantize": ("none", "int8", "int4"),
        "precision": ("auto", "float32", "mixed_bfloat16", "bfloat16"),
        "distribution": ("auto", "none", "data", "model"),
    }[key]:
        assert allowed in message


@pytest.mark.parametrize("key", ["lora_rank", "epochs", "batch_size", "sequence_length"])
def test_sizes_must_be_positive(key):
    assert f"{key} must be ≥ 1, got 0" in config_error(None, [f"{key}=0"])


# --- files that cannot be read ----------------------------------------------------------------


def test_missing_file(tmp_path):
    path = tmp_path / "nope.yaml"
    assert config_error(path) == f"{path}: no such config file"
    assert config_error(tmp_path) == f"{tmp_path}: no such config file"  # a folder


@pytest.mark.parametrize(
    "text", ["epochs: [1, 2\n", "epochs: 1\n  batch_size: 2\n", "a: b: c\n", "\tepochs: 1\n"]
)
def test_invalid_yaml_is_one_line(tmp_path, text):
    path = write(tmp_path, text)
    message = config_error(path)
    assert message.startswith(f"{path}: invalid YAML ("), message


@pytest.mark.parametrize("text", ["- epochs: 1\n", "just a string\n", "42\n"])
def test_yaml_that_is_not_a_mapping(tmp_path, text):
    path = write(tmp_path, text)
    assert config_error(path) == f"{path}: expected a mapping of config keys"


def test_file_that_is_not_utf8(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("name: año\n".encode("latin-1"))
    message = config_error(path)
    assert message.startswith(f"{path}: "), message
    assert "UTF-8" in message


# --- the shipped configs ----------------------------------------------------------------------


def test_the_shipped_configs_are_there():
    names = {p.name for p in SHIPPED}
    assert {
        "cse_gemma3_270m.yaml",
        "cse_gemma3_instruct_1b.yaml",
        "cse_gpt2_spanish.yaml",
        "cse_llama_qlora.yaml",
        "tiny_test.yaml",
    } <= names


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    config = load_config(path)
    assert config.name == path.stem
    assert config.epochs >= 1 and config.batch_size >= 1
    assert Path(config.data).exists() or Path(CONFIG_DIR.parent, config.data).exists()


def test_the_model_specs_of_the_shipped_configs():
    import keras_hub

    models = {p.stem: load_config(p) for p in SHIPPED}
    assert models["cse_gemma3_instruct_1b"].model == "gemma3_instruct_1b"
    assert models["cse_gemma3_instruct_1b"].lora_rank == 4
    assert models["cse_gemma3_instruct_1b"].epochs == 7
    assert models["cse_gpt2_spanish"].model == "hf://datificate/gpt2-small-spanish"
    qlora = models["cse_llama_qlora"]
    assert (qlora.quantize, qlora.lora_targets) == ("int8", "attention")
    for name in ("cse_gemma3_instruct_1b", "cse_llama_qlora"):  # real KerasHub preset names
        assert models[name].model in keras_hub.models.CausalLM.presets
    # the data.py chat format for Llama is Llama 2's "[INST]": a Llama 2 preset, not Llama 3
    assert keras_hub.models.CausalLM.presets[qlora.model]["kaggle_handle"].startswith(
        "kaggle://keras/llama2/"
    )
    tiny = models["tiny_test"]
    assert (tiny.sample_questions, tiny.sample_max_new_tokens) == (1, 8)
    assert tiny.epochs <= 3 and tiny.sequence_length <= 128
