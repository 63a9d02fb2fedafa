"""LoRA training on the tiny presets: what trains, the loss, resume, Ctrl-C, data parallelism,
the run directory, and one clear ``error:`` line for each kind of bad input.

Runs that must be killed, interrupted, given several devices or a file-size limit go through
``python -m gemma_cse.train`` in a real subprocess; the rest call ``train()`` in-process. The
data is a small knowledge base (25 training examples, all under 64 tokens) written per module.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import keras
import numpy as np
import pytest

from gemma_cse.cli import run
from gemma_cse.config import Config, load_config
from gemma_cse.data import KB_DIR, encode_example, load_entries, make_splits, pack
from gemma_cse.export import export_gguf
from gemma_cse.models import load_causal_lm, resolve_preset
from gemma_cse.precision import cpu_has_bf16
from gemma_cse.tiny import FAMILIES
from gemma_cse.train import (
    AnswerOnlyLM,
    answer_token_loss,
    build_model,
    data_hash,
    encode_entries,
    main,
    make_batches,
    resolve_precision,
    vocabulary,
)

REPO = Path(__file__).resolve().parents[1]
TINY_CONFIG = REPO / "configs" / "tiny_test.yaml"
EPOCHS_TO_INTERRUPT = 20  # long enough that a run cannot finish before it is killed at epoch 1


def test_auto_precision_is_bf16_only_where_bf16_is_fast():
    auto = Config(precision="auto")
    # training: bf16 products pay off on a CPU with native bf16 (these tests run on CPU)
    assert resolve_precision(auto) == ("mixed_bfloat16" if cpu_has_bf16() else "float32")
    # decoding multiplies one token at a time, where bf16 is slower than float32 on a CPU
    assert resolve_precision(auto, training=False) == "float32"
    assert resolve_precision(Config(precision="mixed_bfloat16"), training=False) == (
        "mixed_bfloat16"
    )


# --- helpers ----------------------------------------------------------------------------------


def _short(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit].rsplit(" ", 1)[0].rstrip(",;:")


@pytest.fixture(scope="module")
def kb(tmp_path_factory) -> Path:
    """The first entry of 8 categories, shortened: 25 training and 8 validation examples."""
    rows = []
    for i, file in enumerate(sorted(KB_DIR.glob("*.jsonl"))[:8]):
        row = json.loads(file.read_text(encoding="utf-8").splitlines()[0])
        questions = sorted([row["question"], *row["variants"]], key=len)[: 6 if i == 0 else 5]
        rows.append(
            {
                "id": row["id"],
                "topic": row["topic"],
                "question": _short(questions[0], 50),
                "answer": _short(row["answer"], 40) + ".",
                "variants": [_short(q, 50) for q in questions[1:]],
            }
        )
    path = tmp_path_factory.mktemp("kb") / "kb.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), "utf-8")
    return path


def settings(preset, kb: Path, runs_dir: Path, *extra: str) -> list[str]:
    return [f"model={preset}", f"data={kb}", f"runs_dir={runs_dir}", *extra]


def tiny_config(preset, kb, runs_dir, *extra):
    return load_config(TINY_CONFIG, settings(preset, kb, runs_dir, *extra))


# Sets a file-size limit, then runs ``python -m gemma_cse.train`` (argv[1] is the limit).
# SIGXFSZ is ignored so a write past the limit fails with EFBIG instead of killing the process.
FILE_SIZE_LIMITED = """
import resource, runpy, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
limit = int(sys.argv.pop(1))
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
runpy.run_module("gemma_cse.train", run_name="__main__", alter_sys=True)
"""


class Run:
    """``python -m gemma_cse.train --config configs/tiny_test.yaml --set ...`` in the background.

    Output goes to files next to the runs dir (pipes could fill up while another run is
    waited for); ``finish()`` returns (returncode, stdout, stderr).
    """

    def __init__(
        self, sets: list[str], env: dict | None = None, file_size_limit: int = 0, nice: int = 0
    ):
        self.sets = sets
        self.run_dir = load_config(TINY_CONFIG, sets).run_dir
        args = ["--config", str(TINY_CONFIG)]
        for item in sets:
            args += ["--set", item]
        if file_size_limit:
            argv = [sys.executable, "-c", FILE_SIZE_LIMITED, str(file_size_limit), *args]
        else:
            argv = [sys.executable, "-m", "gemma_cse.train", *args]
        logs = self.run_dir.parent / f"{self.run_dir.name}.log"
        logs.parent.mkdir(parents=True, exist_ok=True)
        self.out, self.err = logs.with_suffix(".out"), logs.with_suffix(".err")
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        with open(self.out, "w") as out, open(self.err, "w") as err:
            self.proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=out, stderr=err)
        if nice:  # lower priority, so that runs on the critical path get the CPU first
            os.setpriority(os.PRIO_PROCESS, self.proc.pid, nice)
        self.result: tuple[int, str, str] | None = None

    def saved_epoch(self) -> int:
        """The epoch checkpoints/state.json says is saved (0: none yet)."""
        state = self.run_dir / "checkpoints" / "state.json"
        return json.loads(state.read_text())["epoch"] if state.exists() else 0

    def finish(self, timeout: float = 400) -> tuple[int, str, str]:
        if self.result is None:
            try:
                rc = self.proc.wait(timeout)
            finally:
                if self.proc.poll() is None:
                    self.proc.kill()
                    self.proc.wait()
            self.result = (rc, self.out.read_text(), self.err.read_text())
        return self.result


def one_error_line(rc: int, err: str) -> str:
    """The single ``error:`` line of a failed run; no traceback."""
    assert rc == 2, err
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, err
    return errors[0]


def cli_error(capsys, sets: list[str], config: Path = TINY_CONFIG) -> str:
    """Run the real command line in-process and return its one ``error:`` line."""
    argv = ["--config", str(config)]
    for item in sets:
        argv += ["--set", item]
    rc = run(main, argv)
    return one_error_line(rc, capsys.readouterr().err)


def weights(model) -> dict[str, np.ndarray]:
    return {v.path: keras.ops.convert_to_numpy(v.value).copy() for v in model.weights}


def logits(causal_lm, token_ids: np.ndarray) -> np.ndarray:
    x = {"token_ids": token_ids, "padding_mask": np.ones_like(token_ids, bool)}
    return keras.ops.convert_to_numpy(causal_lm(x))


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def weighted_cross_entropy(logits: np.ndarray, labels: np.ndarray, weights: np.ndarray):
    """Mean cross-entropy over the positions with weight (numpy, float64)."""
    lp = log_softmax(logits.astype("float64"))
    ce = -np.take_along_axis(lp, labels[..., None].astype("int64"), -1)[..., 0]
    return float((ce * weights).sum() / weights.sum())


def read_metrics(run_dir: Path) -> list[dict[str, float]]:
    lines = (run_dir / "metrics.csv").read_text().splitlines()
    header = lines[0].split(",")
    return [dict(zip(header, map(float, line.split(",")), strict=True)) for line in lines[1:]]


def iterations(state_npz: Path) -> int:
    with np.load(state_npz) as saved:
        (key,) = [k for k in saved.files if k.startswith("o:") and k.endswith("iteration")]
        return int(saved[key])


# --- in-process training runs, one per family, shared by several tests ---------------------

RUN_SETTINGS = {
    # gemma3: 2 epochs with a sample answer each epoch (the default tiny config)
    "gemma3": ["epochs=2"],
    # gpt2: the whole vocabulary and one validation batch, to check the loss end to end
    "gpt2": ["epochs=1", "vocab_subset=false", "batch_size=8", "sample_questions=0"],
    # llama: QLoRA (int8 base) with LoRA on attention and feed-forward layers
    "llama": ["epochs=1", "quantize=int8", "lora_targets=all", "sample_questions=0"],
}


@pytest.fixture(scope="module")
def trained(tiny_presets, kb, tmp_path_factory):
    """family → (config, run.json dict, trained CausalLM, weights before training)."""
    done = {}

    def get(family: str):
        if family not in done:
            runs = tmp_path_factory.mktemp(f"runs_{family}")
            config = tiny_config(tiny_presets[family], kb, runs, *RUN_SETTINGS[family])
            keras.utils.set_random_seed(config.seed)  # as train() does: same LoRA init
            before = weights(build_model(config).backbone)
            info, causal_lm = train_in_process(config)
            done[family] = (config, info, causal_lm, before)
        return done[family]

    return get


def train_in_process(config, **kwargs):
    from gemma_cse.train import train

    return train(config, return_model=True, **kwargs)


# --- what trains ------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_only_lora_weights_change(trained, family):
    config, info, causal_lm, before = trained(family)
    after = weights(causal_lm.backbone)
    assert after.keys() == before.keys()
    lora = [path for path in after if "lora_kernel" in path]
    assert lora and all(p.endswith(("lora_kernel_a", "lora_kernel_b")) for p in lora)
    assert len(lora) % 2 == 0
    changed = {p for p in after if not np.array_equal(after[p], before[p])}
    assert changed == set(lora), f"frozen weights changed: {sorted(changed - set(lora))[:5]}"
    assert {v.path for v in causal_lm.backbone.trainable_weights} == set(lora)
    if family == "llama":  # lora_targets=all reaches the feed-forward layers too
        assert any("feedforward" in p for p in lora)
    else:  # query_value: query and value only
        assert {p.split("/")[-2] for p in lora} == {"query", "value"}


# --- the loss ---------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_answer_only_lm_matches_the_full_causal_lm(tiny_presets, kb, tmp_path, family):
    config = tiny_config(tiny_presets[family], kb, tmp_path)
    causal_lm = load_causal_lm(config.model)
    tokenizer = causal_lm.preprocessor.tokenizer
    splits = make_splits(load_entries(kb), seed=config.seed)
    encoded = encode_entries(tokenizer, splits.train[:6] + splits.validation[:4], config)
    assert len({sum(w) for _, w in encoded}) > 1  # answers of different lengths

    # The full CausalLM: logits over the whole vocabulary at every position, answer weights.
    x, y, w = pack(encoded, config.sequence_length)
    full_loss = weighted_cross_entropy(keras.ops.convert_to_numpy(causal_lm(x)), y, w)

    # vocab_ids None: the same loss (train's loss function), also with weightless padding rows.
    model = AnswerOnlyLM(causal_lm.backbone, None)
    for batch_size in (len(encoded), len(encoded) + 3):
        [(bx, by, bw)] = make_batches(encoded, batch_size, None, config.seed, shuffle=False)
        assert len(by) == batch_size
        loss = float(answer_token_loss()(by, model(bx), sample_weight=bw))
        assert loss == pytest.approx(full_loss, rel=1e-5)

    # A vocabulary subset holding every token of the data: the logits at the scored positions
    # are the full model's, gathered at those positions and the subset's columns.
    vocab_ids, index = vocabulary([encoded], tokenizer)
    assert len(vocab_ids) < tokenizer.vocabulary_size()
    [(bx, by, bw)] = make_batches(encoded, len(encoded), index, config.seed, shuffle=False)
    subset = AnswerOnlyLM(causal_lm.backbone, vocab_ids)
    got = keras.ops.convert_to_numpy(subset(bx))
    everything = keras.ops.convert_to_numpy(
        causal_lm({"token_ids": bx["token_ids"], "padding_mask": bx["padding_mask"]})
    )
    gathered = np.take_along_axis(everything, bx["positions"][..., None], axis=1)[..., vocab_ids]
    scored = bw > 0
    assert got.shape == (len(encoded), bw.shape[1], len(vocab_ids))
    np.testing.assert_allclose(got[scored], gathered[scored], rtol=1e-5, atol=1e-5)
    # the labels are the same tokens, renumbered into the subset
    targets = np.concatenate([np.asarray(i)[1:][np.asarray(wt)[1:] > 0] for i, wt in encoded])
    assert sorted(vocab_ids[by[scored]]) == sorted(targets)
    # its loss: cross-entropy over the subset, a little below the full vocabulary's
    subset_loss = float(answer_token_loss()(by, got, sample_weight=bw))
    assert subset_loss == pytest.approx(weighted_cross_entropy(gathered, by, bw), rel=1e-5)
    assert subset_loss < full_loss


def test_reported_loss_is_answer_token_cross_entropy(trained, kb):
    """End to end: the best val_loss in metrics.csv is the trained model's own cross-entropy
    over the validation answers (full vocabulary, one validation batch)."""
    config, info, causal_lm, _ = trained("gpt2")
    splits = make_splits(load_entries(kb), seed=config.seed)
    assert len(splits.validation) <= config.batch_size  # one validation batch
    encoded = encode_entries(causal_lm.preprocessor.tokenizer, splits.validation, config)
    x, y, w = pack(encoded, config.sequence_length)
    expected = weighted_cross_entropy(keras.ops.convert_to_numpy(causal_lm(x)), y, w)
    best = min(row["val_loss"] for row in read_metrics(config.run_dir))
    assert best == pytest.approx(expected, rel=1e-4)


# --- the run directory ------------------------------------------------------------------------


def test_run_directory(trained, kb):
    config, info, causal_lm, _ = trained("gemma3")
    run_dir = config.run_dir
    for name in ("config.yaml", "metrics.csv", "adapter.lora.h5", "run.json", "samples.jsonl"):
        assert (run_dir / name).is_file(), name
    assert load_config(run_dir / "config.yaml") == config  # the resolved config, reloadable
    assert (run_dir / "training_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    rows = read_metrics(run_dir)
    assert [row["epoch"] for row in rows] == [0, 1]
    assert {"loss", "val_loss", "accuracy", "val_accuracy"} <= rows[0].keys()
    samples = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
    assert [s["epoch"] for s in samples] == [1, 2]

    saved = json.loads((run_dir / "run.json").read_text())
    assert saved == json.loads(json.dumps(info))
    assert saved["base_model"] == config.model
    assert saved["data_hash"] == data_hash(load_entries(kb))
    assert len(saved["data_hash"]) == 16 and int(saved["data_hash"], 16) >= 0
    assert saved["code_version"].startswith("0.1.0")
    assert saved["final_metrics"]["loss"] == pytest.approx(rows[-1]["loss"])
    assert saved["final_metrics"]["val_loss"] == pytest.approx(rows[-1]["val_loss"])
    assert (saved["epochs_run"], saved["resumed_from_epoch"]) == (2, 0)

    # preset/: a plain KerasHub preset with the LoRA update merged: the trained model's logits
    token_ids = np.arange(1, 41, dtype="int32")[None]
    trained_logits = logits(causal_lm, token_ids)
    merged = load_causal_lm(str(run_dir / "preset"))
    assert not any(getattr(layer, "lora_enabled", False) for layer in merged.backbone.layers)
    np.testing.assert_allclose(logits(merged, token_ids), trained_logits, rtol=1e-4, atol=1e-5)
    base = load_causal_lm(config.model)
    assert np.abs(logits(base, token_ids) - trained_logits).max() > 1e-4  # training did something
    # adapter.lora.h5 on a fresh base gives the same model
    fresh = build_model(config)
    fresh.backbone.load_lora_weights(str(run_dir / "adapter.lora.h5"))
    np.testing.assert_allclose(logits(fresh, token_ids), trained_logits, rtol=1e-5, atol=1e-6)


def test_rerunning_a_finished_run_changes_nothing(trained, capsys):
    from gemma_cse.train import train

    config, info, _, _ = trained("gemma3")
    files = sorted(p for p in config.run_dir.rglob("*") if p.is_file())
    before = {p: p.read_bytes() for p in files}
    assert train(config) == json.loads(json.dumps(info))
    assert f"{config.run_dir} already finished with this config" in capsys.readouterr().out
    assert sorted(p for p in config.run_dir.rglob("*") if p.is_file()) == files
    assert all(p.read_bytes() == before[p] for p in files)


def test_quantize_base_is_weight_only_and_keeps_the_embedding_float(tiny_presets):
    """QLoRA's base: every transformer kernel quantized, activations not, the (tied output)
    embedding left in float; logits move by rounding only, less for int8 than for int4."""
    from gemma_cse.models import load_causal_lm
    from gemma_cse.train import quantize_base

    token_ids = np.arange(1, 41, dtype="int32")[None]
    expected = logits(load_causal_lm(str(tiny_presets["gemma3"])), token_ids)
    errors = {}
    for mode in ("int8", "int4"):
        causal_lm = load_causal_lm(str(tiny_presets["gemma3"]))
        quantize_base(causal_lm.backbone, mode)
        dense = [
            layer for layer in causal_lm.backbone._flatten_layers() if hasattr(layer, "_kernel")
        ]
        assert dense and all(layer.quantization_mode == mode for layer in dense)
        assert all(layer.inputs_quantizer is None for layer in dense)
        assert causal_lm.backbone.token_embedding.embeddings.dtype == "float32"
        errors[mode] = (
            np.abs(logits(causal_lm, token_ids) - expected).max() / np.abs(expected).max()
        )
    assert 0 < errors["int8"] < 0.05 and errors["int8"] < errors["int4"] < 0.5


def test_qlora_merged_preset_is_the_float_base_plus_the_adapter(trained):
    """quantize=int8: the preset merges the LoRA update into the float base (not the int8 one)."""
    config, _, causal_lm, _ = trained("llama")
    assert config.quantize == "int8"
    assert any(v.dtype == "int8" for v in causal_lm.backbone.weights)
    token_ids = np.arange(1, 41, dtype="int32")[None]
    quantized = logits(causal_lm, token_ids)
    float_base = build_model(dataclasses.replace(config, quantize="none"))
    float_base.backbone.load_lora_weights(str(config.run_dir / "adapter.lora.h5"))
    expected = logits(float_base, token_ids)
    merged = logits(load_causal_lm(str(config.run_dir / "preset")), token_ids)
    np.testing.assert_allclose(merged, expected, rtol=1e-4, atol=1e-5)
    scale = np.abs(quantized).max()
    assert np.abs(merged - quantized).max() < 0.1 * scale  # only int8 rounding apart


# --- runs in a process of their own: resume after SIGKILL, Ctrl-C, two devices, disk full -------

FILE_SIZE_LIMIT = 16384  # bytes: above the logs and config, below state.npz and the adapter


@pytest.fixture(scope="module")
def subprocess_runs(trained, tiny_presets, kb, tmp_path_factory):
    """The runs that need a real process, started together: they mostly import and compile,
    so they overlap well even on two cores.

    kill: SIGKILL once epoch 1 is saved, then the same command again (resume);
    interrupt: SIGINT during epoch 3; none/data: one epoch on two host devices;
    full: the finished 2-epoch gemma3 run resumed for a third epoch under a file-size limit.
    """
    root = tmp_path_factory.mktemp("subprocess_runs")
    gemma3 = str(tiny_presets["gemma3"])
    finished = trained("gemma3")[0]
    shutil.copytree(finished.run_dir, root / "full" / finished.name)
    full_checkpoint = root / "full" / finished.name / "checkpoints"
    full_before = {p.name: p.read_bytes() for p in full_checkpoint.iterdir()}

    # Two devices on a converted GGUF: the path of the embedded default, converted here once.
    gguf = export_gguf(load_causal_lm(gemma3), root / "tiny.gguf")
    resolve_preset(str(gguf))

    runs: dict[str, Run] = {}
    try:
        yield start_and_stop_runs(runs, root, gemma3, str(gguf), kb) | {"full_before": full_before}
    finally:  # nothing left running if a test or this fixture failed
        for background in runs.values():
            if background.proc.poll() is None:
                background.proc.kill()
                background.proc.wait()


def start_and_stop_runs(runs: dict[str, Run], root: Path, gemma3: str, gguf: str, kb: Path) -> dict:
    """Start the runs into ``runs``, signal kill and interrupt, rerun the killed one."""
    long = [f"epochs={EPOCHS_TO_INTERRUPT}", "sample_questions=0"]
    two_devices = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    parallel = ["epochs=1"]  # the default sample answer each epoch: generate() on two devices
    runs |= {  # the killed run first: its rerun comes after it
        "kill": Run(settings(gemma3, kb, root / "kill", *long)),
        "interrupt": Run(settings(gemma3, kb, root / "interrupt", *long), nice=5),
        "none": Run(
            settings(gguf, kb, root / "parallel", "name=none", "distribution=none", *parallel),
            env=two_devices,
            nice=10,
        ),
        "data": Run(
            settings(gguf, kb, root / "parallel", "name=data", "distribution=data", *parallel),
            env=two_devices,
            nice=10,
        ),
        "full": Run(
            settings(gemma3, kb, root / "full", "epochs=3", "sample_questions=0"),
            file_size_limit=FILE_SIZE_LIMIT,
            nice=10,
        ),
    }
    at_kill = {}
    # SIGKILL as soon as epoch 1 is saved. SIGINT in the middle of epoch 3, timed from when
    # epochs 1 and 2 were saved: amid its train steps, where a plain KeyboardInterrupt would
    # find the weights donated to the running step.
    stops = {"kill": signal.SIGKILL, "interrupt": signal.SIGINT}
    seen: dict[tuple[str, int], float] = {}
    deadline = time.monotonic() + 400
    while stops:
        assert time.monotonic() < deadline, f"no epoch was saved in time by {sorted(stops)}"
        for name in list(stops):
            if runs[name].proc.poll() is not None:
                rc, out, err = runs[name].finish()
                pytest.fail(f"run {name} ended (rc {rc}) before it could be stopped:\n{out}{err}")
            epoch, now = runs[name].saved_epoch(), time.monotonic()
            for e in range(1, epoch + 1):
                seen.setdefault((name, e), now)
            if name == "kill" and epoch >= 1:
                runs[name].proc.send_signal(stops.pop(name))
            elif name == "interrupt" and epoch >= 2:
                first, second = seen[name, 1], seen[name, 2]
                if epoch > 2 or now >= second + max(second - first, 0.1) / 2:
                    runs[name].proc.send_signal(stops.pop(name))
        if "kill" not in stops and not at_kill:
            killed = runs["kill"]
            killed.finish()
            state = killed.run_dir / "checkpoints" / "state.npz"
            with np.load(state) as saved:
                at_kill["epoch"] = int(saved["epoch"])
            at_kill["json_epoch"] = killed.saved_epoch()
            at_kill["iterations"] = iterations(state)
            at_kill["finished"] = (killed.run_dir / "run.json").exists()
            runs["resume"] = Run(killed.sets)  # the same command again
        time.sleep(0.02)
    return {"runs": runs, "at_kill": at_kill}


def test_rerunning_a_killed_run_resumes_it(subprocess_runs):
    killed, resumed = subprocess_runs["runs"]["kill"], subprocess_runs["runs"]["resume"]
    at_kill = subprocess_runs["at_kill"]
    assert killed.finish()[0] == -signal.SIGKILL
    assert not at_kill["finished"]
    saved_epoch = at_kill["epoch"]
    assert 1 <= saved_epoch < EPOCHS_TO_INTERRUPT
    # state.json is written after state.npz: killed in between, it is one epoch behind
    assert at_kill["json_epoch"] in (saved_epoch, saved_epoch - 1)

    rc, out, err = resumed.finish()
    assert rc == 0, out + err
    run_dir = resumed.run_dir
    assert f"resuming {run_dir} after epoch {saved_epoch}" in out
    steps = int(out.split(" batches/epoch")[0].rsplit(" ", 1)[1])
    assert at_kill["iterations"] == saved_epoch * steps

    epochs = [int(row["epoch"]) for row in read_metrics(run_dir)]
    assert epochs == list(range(EPOCHS_TO_INTERRUPT))  # each epoch once, in order
    info = json.loads((run_dir / "run.json").read_text())
    assert info["resumed_from_epoch"] == saved_epoch >= 1
    assert info["epochs_run"] == EPOCHS_TO_INTERRUPT - saved_epoch
    # the optimizer went on counting from the saved state, not from zero
    assert iterations(run_dir / "checkpoints" / "state.npz") == EPOCHS_TO_INTERRUPT * steps
    state = json.loads((run_dir / "checkpoints" / "state.json").read_text())
    assert state["epoch"] == EPOCHS_TO_INTERRUPT


def test_ctrl_c_saves_the_adapter_and_exits_without_traceback(subprocess_runs, tiny_presets, kb):
    interrupted = subprocess_runs["runs"]["interrupt"]
    rc, out, err = interrupted.finish()
    assert rc == 130, out + err
    assert "Traceback" not in err, err
    assert err.rstrip().splitlines()[-1] == "interrupted"
    assert "interrupted: adapter saved in" in out
    run_dir = interrupted.run_dir
    assert not (run_dir / "run.json").exists()
    assert not list(run_dir.glob(".tmp*"))
    adapter = run_dir / "interrupted.lora.h5"
    assert adapter.is_file()
    fresh = build_model(tiny_config(tiny_presets["gemma3"], kb, run_dir.parent))
    untrained = weights(fresh.backbone)
    fresh.backbone.load_lora_weights(str(adapter))
    loaded = weights(fresh.backbone)
    lora_b = [p for p in loaded if p.endswith("lora_kernel_b")]
    assert lora_b and all(np.any(loaded[p] != untrained[p]) for p in lora_b)  # trained values


def test_data_parallel_gives_the_same_loss_as_one_device(subprocess_runs):
    """Two host devices; 25 examples in batches of 4, so the last batch is short (padded)."""
    runs = subprocess_runs["runs"]
    results = {mode: runs[mode].finish() for mode in ("none", "data")}
    for rc, out, err in results.values():
        assert rc == 0, out + err
    assert "data parallel over 2 devices" in results["data"][1]
    assert "data parallel" not in results["none"][1]
    single, parallel = (read_metrics(runs[mode].run_dir)[0] for mode in ("none", "data"))
    for key in ("loss", "val_loss", "accuracy", "val_accuracy"):
        assert parallel[key] == pytest.approx(single[key], rel=1e-4, abs=1e-6), key
    assert (runs["data"].run_dir / "preset" / "config.json").is_file()
    assert (runs["data"].run_dir / "samples.jsonl").read_text().strip()


def test_disk_full_while_checkpointing_keeps_the_previous_checkpoint(subprocess_runs):
    """A file-size limit (RLIMIT_FSIZE, SIGXFSZ ignored) makes the next checkpoint fail."""
    full = subprocess_runs["runs"]["full"]
    before = subprocess_runs["full_before"]
    assert len(before["state.npz"]) > FILE_SIZE_LIMIT  # cannot be written under the limit
    rc, out, err = full.finish()
    assert "resuming" in out
    checkpoint = full.run_dir / "checkpoints"
    assert one_error_line(rc, err) == (
        f"error: could not save {checkpoint / 'state.npz'} (File too large); "
        "the previous copy is kept"
    )
    assert {p.name: p.read_bytes() for p in checkpoint.iterdir()} == before  # no temp files
    with np.load(checkpoint / "state.npz") as saved:
        assert int(saved["epoch"]) == 2


# --- bad input: one error line each ----------------------------------------------------------


def test_config_typo(capsys, tiny_presets, kb, tmp_path):
    line = cli_error(capsys, settings(tiny_presets["gemma3"], kb, tmp_path, "epoch=3"))
    assert line == "error: --set epoch: unknown config key 'epoch' (did you mean epochs?)"
    typo = tmp_path / "typo.yaml"
    typo.write_text("epochs: 1\nbatch_sise: 2\n")
    line = cli_error(capsys, [], config=typo)
    assert line.startswith(f"error: {typo}: unknown config key 'batch_sise'")
    assert not list(tmp_path.rglob("config.yaml"))  # nothing was started


def test_missing_data_path(capsys, tiny_presets, tmp_path):
    missing = tmp_path / "no_such_kb.jsonl"
    line = cli_error(capsys, settings(tiny_presets["gemma3"], missing, tmp_path))
    assert line == f"error: {missing}: no such file or folder"


def test_model_needing_a_download_while_offline(capsys, monkeypatch, kb, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    spec = "hf://datificate/gpt2-small-spanish"
    line = cli_error(capsys, settings(spec, kb, tmp_path))
    assert line.startswith(f"error: {spec} needs a download and HF_HUB_OFFLINE is set")


def test_sequence_length_too_short(capsys, tiny_presets, kb, tmp_path):
    preset = tiny_presets["gpt2"]
    tokenizer = load_causal_lm(str(preset)).preprocessor.tokenizer
    splits = make_splits(load_entries(kb))
    lengths = sorted(
        len(encode_example(tokenizer, e.question, e.entry.answer)[0]) for e in splits.train
    )
    seq = lengths[len(lengths) // 2]
    cut = sum(n > seq + 1 for n in lengths)
    assert 0 < cut < len(lengths)
    line = cli_error(capsys, settings(preset, kb, tmp_path, f"sequence_length={seq}"))
    assert f"{cut} of {len(lengths)} examples would be cut at sequence_length={seq}" in line
    assert f"longest needs {lengths[-1] - 1}" in line and "allow_truncation=true" in line

    config = tiny_config(
        preset,
        kb,
        tmp_path,
        f"sequence_length={seq}",
        "allow_truncation=true",
        "epochs=1",
        "max_steps_per_epoch=2",
        "sample_questions=0",
    )
    info, _ = train_in_process(config)
    assert info["epochs_run"] == 1 and np.isfinite(info["final_metrics"]["loss"])
