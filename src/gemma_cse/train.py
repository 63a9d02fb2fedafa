"""``python -m gemma_cse.train --config configs/<run>.yaml``: LoRA/QLoRA fine-tuning with Keras fit.

Reads top to bottom: config → model (quantize, LoRA) → data (encode, bucket) → fit with
callbacks → run directory (adapter, merged preset, metrics, curve, run.json). Re-running
the same command resumes from the last completed epoch with the optimizer state.

Speed on CPU comes from not computing what the loss ignores: the output layer runs only at
positions that carry loss (the answer and its stop token), over the tokens the data uses
(``vocab_subset``), and batches are bucketed by length so little padding is computed.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import jax
import keras
import numpy as np
from keras import ops

from gemma_cse.cli import UserError, run
from gemma_cse.config import Config, load_config, save_config
from gemma_cse.data import Entry, encode_example, load_entries, make_splits
from gemma_cse.precision import bf16_products, cpu_has_bf16

LORA_TARGETS = {
    "query_value": ["query_dense", "value_dense", "query", "value"],
    "attention": ["query_dense", "key_dense", "value_dense", "output_dense"]
    + ["query", "key", "value", "attention_output"],
}
LORA_TARGETS["all"] = LORA_TARGETS["attention"] + [
    "gating_ffw",
    "gating_ffw_2",
    "ffw_linear",  # Gemma
    "feedforward_gate_dense",
    "feedforward_intermediate_dense",
    "feedforward_output_dense",
]
BUCKET = 32  # sequence and answer lengths are padded to multiples of this (few compiled shapes)


# ---------------------------------------------------------------- model


def resolve_precision(config: Config, training: bool = True) -> str:
    """``auto``: mixed_bfloat16 on a GPU, and for training on a CPU that multiplies bfloat16
    natively (with ``bf16_products``, 1.8× float32's speed there); float32 otherwise: decoding
    on a CPU multiplies one token at a time, where bf16 is ~10× slower than float32
    (``benchmarks/bench_matmul_dtypes.py``)."""
    if config.precision != "auto":
        return config.precision
    backend = jax.default_backend()
    fast = backend == "gpu" or (training and backend == "cpu" and cpu_has_bf16())
    return "mixed_bfloat16" if fast else "float32"


def setup_distribution(config: Config) -> None:
    """Data parallelism over all local devices (or a model-parallel layout for big models)."""
    devices = keras.distribution.list_devices()
    if config.distribution == "none" or (config.distribution == "auto" and len(devices) < 2):
        return
    if config.distribution in ("auto", "data"):
        if config.batch_size % len(devices):
            raise UserError(
                f"batch_size={config.batch_size} must be a multiple of the {len(devices)} devices "
                "for data parallelism; change batch_size or set distribution=none"
            )
        print(f"distribution: data parallel over {len(devices)} devices")
        keras.distribution.set_distribution(keras.distribution.DataParallel(devices=devices))
        return
    import keras_hub

    mesh = keras.distribution.DeviceMesh((1, len(devices)), ("batch", "model"), devices=devices)
    layout = keras_hub.models.GemmaBackbone.get_layout_map(mesh)  # same layer names in Gemma3
    keras.distribution.set_distribution(keras.distribution.ModelParallel(layout_map=layout))


def build_model(config: Config, training: bool = True):
    """The base CausalLM, optionally quantized, with LoRA on the chosen layers (in the precision
    for ``training``, or for decoding)."""
    from gemma_cse.models import load_causal_lm

    causal_lm = load_causal_lm(config.model, dtype=resolve_precision(config, training))
    backbone = causal_lm.backbone
    if config.quantize != "none":
        quantize_base(backbone, config.quantize)
    backbone.enable_lora(config.lora_rank, target_layer_names=LORA_TARGETS[config.lora_targets])
    lora_layers = [
        layer for layer in backbone._flatten_layers() if getattr(layer, "lora_enabled", False)
    ]
    if not lora_layers:
        raise UserError(
            f"no layer of {type(backbone).__name__} matches lora_targets={config.lora_targets}"
        )
    for layer in lora_layers:
        layer.lora_alpha = config.lora_alpha  # KerasHub enables LoRA with alpha = rank
    for variable in backbone.trainable_weights:  # enable_lora leaves biases (GPT-2's) trainable
        if not variable.path.endswith(("lora_kernel_a", "lora_kernel_b")):
            variable.trainable = False
    return causal_lm


def quantize_base(backbone, mode: str) -> None:
    """QLoRA's frozen base: the transformer's Dense/EinsumDense kernels quantized weight-only
    (int8 per output channel, or int4 in blocks of 64 inputs as QLoRA's NF4), activations kept
    in the compute dtype; the embedding (also the tied output layer) stays in float, as
    QLoRA leaves embeddings and the LM head unquantized. Keras' default int8 mode would also
    quantize activations, an int8 × int8 product that XLA on CPU runs ~10× slower than float."""
    from keras.quantizers import Int4QuantizationConfig, Int8QuantizationConfig

    quantization = {
        "int8": lambda: Int8QuantizationConfig(activation_quantizer=None),
        "int4": lambda: Int4QuantizationConfig(block_size=64),
    }[mode]()
    dense = (keras.layers.Dense, keras.layers.EinsumDense)
    backbone.quantize(config=quantization, filters=lambda layer: isinstance(layer, dense))


def answer_token_loss():
    """Cross-entropy averaged over the weighted (answer) tokens, so padding does not dilute it."""
    return keras.losses.SparseCategoricalCrossentropy(
        from_logits=True, reduction="mean_with_sample_weight"
    )


class AnswerOnlyLM(keras.Model):
    """The backbone plus an output layer that scores only the positions that carry loss.

    Inputs: token_ids, padding_mask and ``positions`` (B, K) of the tokens to predict.
    Output: logits (B, K, V') over ``vocab_ids`` (V' ≤ V). With ``answer_token_loss`` the loss
    equals the full CausalLM's when ``vocab_ids`` is None (the whole vocabulary).
    """

    def __init__(self, backbone, vocab_ids: np.ndarray | None, **kwargs):
        super().__init__(name="answer_only_lm", **kwargs)
        self.backbone = backbone
        self.vocab_ids = None if vocab_ids is None else np.asarray(vocab_ids, "int32")

    def call(self, inputs):
        hidden = self.backbone(
            {"token_ids": inputs["token_ids"], "padding_mask": inputs["padding_mask"]}
        )
        picked = ops.take_along_axis(hidden, inputs["positions"][..., None], axis=1)
        embedding = self.backbone.token_embedding
        tied_float = (
            getattr(embedding, "tie_weights", False) and embedding.embeddings.dtype != "int8"
        )
        if self.vocab_ids is None or not tied_float:
            logits = embedding(picked, reverse=True)
            return logits if self.vocab_ids is None else ops.take(logits, self.vocab_ids, axis=-1)
        rows = ops.take(embedding.embeddings, self.vocab_ids, axis=0)
        logits = ops.einsum("bkh,vh->bkv", picked, ops.cast(rows, picked.dtype))
        if embedding.logit_soft_cap is not None:
            logits = ops.tanh(logits / embedding.logit_soft_cap) * embedding.logit_soft_cap
        return logits


# ---------------------------------------------------------------- data


def _round_up(n: int, multiple: int = BUCKET) -> int:
    return max(multiple, -(-n // multiple) * multiple)


def training_prompt(example, entries: list[Entry], config: Config) -> str:
    """The user turn of one example: the question alone, or the question with its entry as the
    source, as the engine prompts the model (``engine.SOURCES_IN_PROMPT`` = 1)."""
    if config.prompt == "question":
        return example.question
    from gemma_cse.generation import grounded_message

    return grounded_message(example.question, [example.entry])


def encode_entries(
    tokenizer, examples, config: Config, entries: list[Entry] = ()
) -> list[tuple[list[int], list[int]]]:
    encoded = [
        encode_example(tokenizer, training_prompt(ex, list(entries), config), ex.entry.answer)
        for ex in examples
    ]
    too_long = [len(ids) for ids, _ in encoded if len(ids) > config.sequence_length + 1]
    if too_long and not config.allow_truncation:
        raise UserError(
            f"{len(too_long)} of {len(encoded)} examples would be cut at sequence_length="
            f"{config.sequence_length} (longest needs {max(too_long) - 1}); raise sequence_length "
            "or set allow_truncation=true"
        )
    return [
        (ids[: config.sequence_length + 1], w[: config.sequence_length + 1]) for ids, w in encoded
    ]


def make_batches(
    encoded, batch_size: int, vocab_index: np.ndarray | None, seed: int, shuffle: bool
):
    """Length-bucketed batches of (x, y, sample_weight) scoring only loss-carrying positions."""
    order = np.argsort([len(ids) for ids, _ in encoded], kind="stable")
    groups = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    batches = []
    for group in groups:
        rows = [encoded[i] for i in group]
        seq = _round_up(max(len(ids) for ids, _ in rows) - 1)
        k = _round_up(max(sum(w[1:]) for _, w in rows))
        x_ids = np.zeros((batch_size, seq), "int32")
        mask = np.zeros((batch_size, seq), bool)
        positions = np.zeros((batch_size, k), "int32")
        labels = np.zeros((batch_size, k), "int32")
        weights = np.zeros((batch_size, k), "float32")
        for r, (ids, w) in enumerate(rows):
            x_ids[r, : len(ids) - 1] = ids[:-1]
            mask[r, : len(ids) - 1] = True
            scored = np.flatnonzero(np.asarray(w[1:]) > 0)  # predict ids[p + 1] from position p
            positions[r, : len(scored)] = scored
            target = np.asarray(ids)[scored + 1]
            labels[r, : len(scored)] = target if vocab_index is None else vocab_index[target]
            weights[r, : len(scored)] = 1.0
        for r in range(len(rows), batch_size):  # a short last batch: weightless copies of row 0,
            # so every batch splits evenly over data-parallel devices (and shares one shape)
            x_ids[r], mask[r], positions[r], labels[r] = x_ids[0], mask[0], positions[0], labels[0]
        batches.append(
            ({"token_ids": x_ids, "padding_mask": mask, "positions": positions}, labels, weights)
        )
    if shuffle:
        np.random.default_rng(seed).shuffle(batches)
    return batches


def batch_dataset(batches):
    class Batches(keras.utils.PyDataset):
        def __len__(self):
            return len(batches)

        def __getitem__(self, i):
            return batches[i]

    return Batches()


def vocabulary(encoded_sets, tokenizer) -> tuple[np.ndarray, np.ndarray]:
    """Token ids the data uses plus special tokens, and the id → column index map."""
    used = {int(t) for encoded in encoded_sets for ids, _ in encoded for t in ids}
    special = [tokenizer.start_token_id, tokenizer.end_token_id, tokenizer.pad_token_id]
    used |= {int(t) for t in special if t is not None}
    vocab_ids = np.array(sorted(used), "int32")
    index = np.zeros(tokenizer.vocabulary_size(), "int32")
    index[vocab_ids] = np.arange(len(vocab_ids))
    return vocab_ids, index


# ---------------------------------------------------------------- checkpoints and callbacks


def _atomic_write(path: Path, write) -> None:
    """Write through a temporary file and rename: a crash or full disk keeps the old file."""
    tmp = path.with_name(f".tmp{os.getpid()}.{path.name}")  # keeps the suffix Keras checks
    try:
        write(tmp)
        os.replace(tmp, path)
    except OSError as err:
        raise UserError(
            f"could not save {path} ({err.strerror or err}); the previous copy is kept"
        ) from None
    finally:
        tmp.unlink(missing_ok=True)


def training_state(model) -> dict[str, np.ndarray]:
    state = {f"w:{v.path}": np.asarray(v) for v in model.trainable_variables}
    state |= {f"o:{v.path}": np.asarray(v) for v in model.optimizer.variables}
    return state


def restore_state(model, path: Path) -> None:
    model.optimizer.build(model.trainable_variables)
    with np.load(path) as saved:
        for prefix, variables in (
            ("w:", model.trainable_variables),
            ("o:", model.optimizer.variables),
        ):
            for v in variables:
                key = prefix + v.path
                if key not in saved:
                    raise UserError(f"{path} does not match this config (no {v.path}); use --fresh")
                v.assign(saved[key])


def make_callbacks(
    config: Config, run_dir: Path, causal_lm, samples, stop_id: int, start_epoch: int
):
    ckpt = run_dir / "checkpoints"

    class EpochCheckpoint(keras.callbacks.Callback):
        """LoRA weights + optimizer state after every epoch, written atomically for resume."""

        def on_epoch_end(self, epoch, logs=None):
            state = training_state(self.model) | {"epoch": np.asarray(epoch + 1)}  # one file
            _atomic_write(ckpt / "state.npz", lambda p: np.savez(p, **state))
            info = {"epoch": epoch + 1, "logs": {k: float(v) for k, v in (logs or {}).items()}}
            _atomic_write(ckpt / "state.json", lambda p: p.write_text(json.dumps(info)))
            _atomic_write(ckpt / "adapter.lora.h5", lambda p: _save_adapter(causal_lm.backbone, p))

    class SampleAnswers(keras.callbacks.Callback):
        """Answers a few validation questions at each epoch end, so a person sees progress."""

        def on_epoch_end(self, epoch, logs=None):
            with open(run_dir / "samples.jsonl", "a", encoding="utf-8") as out:
                for question, expected in samples:
                    answer = answer_question(
                        causal_lm, question, config.sample_max_new_tokens, stop_id
                    )
                    shown = question.rsplit("Pregunta del estudiante: ", 1)[-1]
                    print(f"\n  [epoch {epoch + 1}] {shown}\n    → {answer}")
                    row = {
                        "epoch": epoch + 1,
                        "question": question,
                        "answer": answer,
                        "expected": expected,
                    }
                    out.write(json.dumps(row, ensure_ascii=False) + "\n")

    callbacks = [
        keras.callbacks.CSVLogger(str(run_dir / "metrics.csv"), append=start_epoch > 0),
        keras.callbacks.EarlyStopping(
            monitor="val_loss", patience=config.early_stopping_patience, restore_best_weights=True
        ),
        keras.callbacks.TensorBoard(log_dir=str(run_dir / "tensorboard")),
    ]
    if samples:
        callbacks.append(SampleAnswers())
    # Last, so an epoch counts as done (for resume) only once everything it logs is written.
    return [*callbacks, EpochCheckpoint()]


def drop_epochs_from(metrics_csv: Path, epoch: int) -> None:
    """Drop logged rows of epochs ≥ ``epoch``: a resumed run trains (and logs) them again."""
    if metrics_csv.exists():
        lines = metrics_csv.read_text(encoding="utf-8").splitlines(keepends=True)
        kept = lines[:1] + [row for row in lines[1:] if int(row.split(",", 1)[0]) < epoch]
        metrics_csv.write_text("".join(kept), encoding="utf-8")


class StopOnCtrlC(keras.callbacks.Callback):
    """Ctrl-C in fit stops after the current step, with the weights in place; twice: at once.

    A KeyboardInterrupt raised inside Keras' JAX loop can land after a step took (donated and
    deleted) the weights but before they were put back, or be swallowed; so the signal only
    sets a flag, and this callback raises at a step's end, after syncing the weights.
    """

    requested = False

    @contextlib.contextmanager
    def handling_sigint(self):
        if threading.current_thread() is not threading.main_thread():
            yield  # signal handlers can only be set from the main thread
            return

        def handler(signum, frame):
            if self.requested:
                raise KeyboardInterrupt
            self.requested = True
            print("\nstopping after this step (Ctrl-C again to stop at once)", flush=True)

        previous = signal.signal(signal.SIGINT, handler)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)

    def _stop_if_requested(self):
        if self.requested:
            self.model.jax_state_sync()  # the weights of the step that just finished
            raise KeyboardInterrupt

    def on_train_batch_end(self, batch, logs=None):
        self._stop_if_requested()

    def on_epoch_end(self, epoch, logs=None):
        self._stop_if_requested()


def save_interrupted(model, causal_lm, run_dir: Path) -> str:
    """Save the adapter after a Ctrl-C in fit: the last finished step's, or else the last epoch's.

    After a second Ctrl-C the weights may be gone (JAX donates them to each step); then the
    newest copy is the last epoch's checkpoint.
    """
    out = run_dir / "interrupted.lora.h5"
    try:
        _atomic_write(out, lambda p: _save_adapter(causal_lm.backbone, p))
        return f"adapter saved in {out}"
    except Exception:  # "Array has been deleted", or a variable left without a value
        last = run_dir / "checkpoints" / "adapter.lora.h5"
        if not last.exists():
            return "no epoch finished, nothing saved"
        _atomic_write(out, lambda p: p.write_bytes(last.read_bytes()))
        return f"adapter of the last finished epoch saved in {out}"


def _save_adapter(backbone, path: Path) -> None:
    backbone.save_lora_weights(str(path))


def answer_question(causal_lm, question: str, max_new_tokens: int, stop_id: int) -> str:
    """Greedy answer to one user turn, in the chat format the run trains on."""
    from gemma_cse.data import CHAT_FORMATS, chat_family

    tokenizer = causal_lm.preprocessor.tokenizer
    prompt = CHAT_FORMATS[chat_family(tokenizer)].prompt.format(user=question)
    prompt_len = len(np.asarray(tokenizer.tokenize(prompt))) + 1
    causal_lm.preprocessor.sequence_length = _round_up(prompt_len + max_new_tokens, 64)
    # Under a distribution the batch is split over the devices: give each device a copy.
    copies = len(keras.distribution.list_devices()) if keras.distribution.distribution() else 1
    out = causal_lm.generate([prompt] * copies, stop_token_ids=[stop_id])[0]
    return out[len(prompt) :].strip() if out.startswith(prompt) else out.strip()


# ---------------------------------------------------------------- run directory


def data_hash(entries: list[Entry]) -> str:
    text = json.dumps([e.__dict__ for e in entries], ensure_ascii=False, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def code_version() -> str:
    from gemma_cse import __version__

    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            cwd=Path(__file__).parent,
        ).stdout.strip()
        return f"{__version__}+{commit}"
    except (OSError, subprocess.CalledProcessError):
        return __version__


def plot_curves(metrics_csv: Path, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    frame = pd.read_csv(metrics_csv)
    fig, ax = plt.subplots(figsize=(6, 4))
    for column in ("loss", "val_loss"):
        if column in frame:
            ax.plot(frame["epoch"] + 1, frame[column], marker="o", label=column)
    ax.set_xlabel("epoch")
    ax.set_ylabel("cross-entropy (answer tokens)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def save_merged_preset(config: Config, causal_lm, out: Path) -> None:
    """A servable KerasHub preset: the base model with the LoRA update merged into its kernels."""
    from gemma_cse.models import load_causal_lm

    merged = load_causal_lm(config.model, dtype="float32")
    trained = {
        layer.path: layer
        for layer in causal_lm.backbone._flatten_layers()
        if getattr(layer, "lora_enabled", False)
    }
    for layer in merged.backbone._flatten_layers():
        if layer.path in trained:  # float base + LoRA update (a quantized base's kernel is int8)
            lora = trained[layer.path]
            delta = ops.matmul(lora.lora_kernel_a, lora.lora_kernel_b) * (
                lora.lora_alpha / lora.lora_rank
            )
            layer.kernel.assign(layer.kernel + np.asarray(delta, "float32"))
    partial = out.with_name(f".{out.name}.tmp")  # written aside, then renamed into place
    shutil.rmtree(partial, ignore_errors=True)
    merged.save_to_preset(str(partial))
    shutil.rmtree(out, ignore_errors=True)
    os.replace(partial, out)


# ---------------------------------------------------------------- main


def train(config: Config, fresh: bool = False, return_model: bool = False):
    """Run (or resume) ``config``; returns run.json's dict, and the trained CausalLM if asked."""
    keras.utils.set_random_seed(config.seed)
    run_dir = config.run_dir
    ckpt = run_dir / "checkpoints"
    if fresh and run_dir.exists():
        shutil.rmtree(run_dir)
    finished = run_dir / "run.json"
    if finished.exists():  # the same command again after it finished: nothing to redo
        info = json.loads(finished.read_text(encoding="utf-8"))
        if info.get("config") == json.loads(json.dumps(config.to_dict())):
            print(f"{run_dir} already finished with this config; --fresh trains it again")
            if not return_model:
                return info
            from gemma_cse.models import load_causal_lm

            return info, load_causal_lm(str(run_dir / "preset"))
    ckpt.mkdir(parents=True, exist_ok=True)
    start_epoch = 0
    if (ckpt / "state.npz").exists():  # the epoch saved with the weights, not a separate file
        with np.load(ckpt / "state.npz") as saved:
            start_epoch = int(saved["epoch"]) if "epoch" in saved else None
        if start_epoch is None:  # saved by an older version, which kept it in state.json only
            start_epoch = json.loads((ckpt / "state.json").read_text())["epoch"]
        print(f"resuming {run_dir} after epoch {start_epoch}")
        drop_epochs_from(run_dir / "metrics.csv", start_epoch)
    save_config(config, run_dir / "config.yaml")

    entries = load_entries(config.data)
    splits = make_splits(entries, seed=config.seed)
    setup_distribution(config)
    causal_lm = build_model(config)
    tokenizer = causal_lm.preprocessor.tokenizer
    from gemma_cse.data import stop_token_id

    stop_id = stop_token_id(tokenizer)
    train_enc = encode_entries(tokenizer, splits.train, config, entries)
    val_enc = encode_entries(tokenizer, splits.validation or splits.train[:8], config, entries)
    vocab_ids, vocab_index = (
        vocabulary([train_enc, val_enc], tokenizer) if config.vocab_subset else (None, None)
    )
    train_batches = make_batches(
        train_enc, config.batch_size, vocab_index, config.seed, shuffle=True
    )
    if config.max_steps_per_epoch:
        train_batches = train_batches[: config.max_steps_per_epoch]
    val_batches = make_batches(val_enc, config.batch_size, vocab_index, config.seed, shuffle=False)

    model = AnswerOnlyLM(causal_lm.backbone, vocab_ids)
    steps = len(train_batches) * config.epochs
    schedule = keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=0.0,
        warmup_target=config.learning_rate,
        warmup_steps=max(1, int(steps * config.warmup_fraction)),
        decay_steps=max(1, steps - int(steps * config.warmup_fraction)),
    )
    model.compile(
        optimizer=keras.optimizers.AdamW(learning_rate=schedule, weight_decay=config.weight_decay),
        loss=answer_token_loss(),
        weighted_metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
    )
    model(train_batches[0][0])  # build
    if start_epoch:
        restore_state(model, ckpt / "state.npz")
    samples = [
        (training_prompt(ex, entries, config), ex.entry.answer)
        for ex in splits.validation[: config.sample_questions]
    ]
    stop = StopOnCtrlC()
    callbacks = [*make_callbacks(config, run_dir, causal_lm, samples, stop_id, start_epoch), stop]
    print(
        f"training {config.name}: {len(train_enc)} examples, {len(train_batches)} batches/epoch, "
        f"vocab {len(vocab_ids) if vocab_ids is not None else tokenizer.vocabulary_size()}, "
        f"trainable {sum(int(np.prod(v.shape)) for v in model.trainable_variables):,} weights"
    )
    started = time.perf_counter()
    cpu_bf16 = jax.default_backend() == "cpu" and "bfloat16" in resolve_precision(config)
    try:
        with stop.handling_sigint(), bf16_products(enabled=cpu_bf16):
            history = model.fit(
                batch_dataset(train_batches),
                validation_data=batch_dataset(val_batches),
                epochs=config.epochs,
                initial_epoch=start_epoch,
                callbacks=callbacks,
                verbose=1 if sys.stdout.isatty() else 2,
            )
    except KeyboardInterrupt:
        saved = save_interrupted(model, causal_lm, run_dir)
        print(f"\ninterrupted: {saved}; run the same command to resume")
        raise
    seconds = time.perf_counter() - started

    _atomic_write(run_dir / "adapter.lora.h5", lambda p: _save_adapter(causal_lm.backbone, p))
    plot_curves(run_dir / "metrics.csv", run_dir / "training_curve.png")
    save_merged_preset(config, causal_lm, run_dir / "preset")
    final = {k: float(v[-1]) for k, v in history.history.items()} if history.history else {}
    epochs_run = len(history.epoch)  # epochs run by this call (after a resume: the rest)
    real = [b[0]["padding_mask"][b[2].any(axis=1)] for b in train_batches]  # not padding rows
    tokens = sum(int(mask.sum()) for mask in real) * max(1, epochs_run)
    info = {
        "name": config.name,
        "base_model": config.model,
        "data": config.data,
        "data_hash": data_hash(entries),
        "code_version": code_version(),
        "epochs_run": epochs_run,
        "resumed_from_epoch": start_epoch,
        "train_seconds": round(seconds, 1),
        "train_tokens_per_second_wall": round(tokens / seconds, 1) if seconds else None,
        "final_metrics": final,
        "splits": splits.counts(),
        "config": config.to_dict(),  # what it finished: the same command again does nothing
    }
    (run_dir / "run.json").write_text(
        json.dumps(info, indent=2, ensure_ascii=False), encoding="utf-8"
    )
    return (info, causal_lm) if return_model else info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m gemma_cse.train",
        description="Fine-tune a KerasHub causal LM with LoRA/QLoRA on the CSE knowledge base. "
        "Running the same command again resumes an interrupted run and leaves a finished one "
        "as it is.",
    )
    parser.add_argument(
        "--config",
        default="configs/cse_gemma3_270m.yaml",
        help="YAML config (default: %(default)s)",
    )
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key"
    )
    parser.add_argument(
        "--fresh", action="store_true", help="discard an existing run directory and start over"
    )
    args = parser.parse_args(argv)
    config = load_config(args.config, args.set)
    info = train(config, fresh=args.fresh)
    print(json.dumps(info, indent=2, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
