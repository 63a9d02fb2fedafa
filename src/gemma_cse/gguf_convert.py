"""GGUF → KerasHub Gemma3: how the embedded model (and any Gemma 3 GGUF) becomes a preset.

The weights are dequantized with gguf's own code, renamed to Hugging Face names with gguf's
own tensor-name map, and handed to KerasHub's Hugging Face converter, so the layout logic
(head reshapes, transposes) is KerasHub's and not ours. What is ours are the llama.cpp quirks
listed in ``shared/EMBEDDED_MODEL_FACTS.md``: RMSNorm weights stored as 1 + w, and a
SentencePiece vocabulary whose chat and whitespace tokens need repairing.
"""

from __future__ import annotations

import functools
from pathlib import Path

import gguf
import numpy as np
from gguf import GGUFValueType
from tqdm.auto import tqdm

from gemma_cse.cli import UserError

# SentencePiece piece types (GGUF uses the same numbering).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
# Control pieces that must match inside text, or chat prompts never tokenize to them.
TEXT_CONTROL_PIECES = {"<start_of_turn>", "<end_of_turn>", "<mask>"}


class TruncatedGGUF(ValueError):
    """The file ends before the data its header describes."""


@functools.cache
def _itemsize(dtype) -> int:
    return np.dtype(dtype).itemsize


class BulkGGUFReader(gguf.GGUFReader):
    """``gguf.GGUFReader`` with the same fields and tensors, read ~10x faster.

    The stock reader slices its ``np.memmap`` several times per metadata array item, and
    memmap slicing runs Python code each time: for Gemma's 262,144-token vocabulary (tokens,
    scores, types) that is ~3 million slices and ~10 s of CPU. This subclass slices a plain
    ndarray view of the same map, reads numeric arrays with one view, and reports a file that
    ends too early as ``TruncatedGGUF`` instead of a stray IndexError.
    """

    @functools.cached_property
    def _bytes(self) -> np.ndarray:
        return self.data.view(np.ndarray)  # same memory as the memmap, without its overhead

    def _get(self, offset, dtype, count=1, override_order=None):
        end = offset + _itemsize(dtype) * int(count)
        if end > self._bytes.size:
            raise TruncatedGGUF(
                f"the file ends at byte {self._bytes.size:,}; its contents go on "
                f"to at least byte {end:,}"
            )
        array = self._bytes[offset:end].view(dtype)
        order = override_order or self.byte_order
        return array if order == "I" else array.view(array.dtype.newbyteorder(order))

    def _get_field_parts(self, orig_offs, raw_type):
        if raw_type != GGUFValueType.ARRAY:
            return super()._get_field_parts(orig_offs, raw_type)
        raw_item_type, length = self._get(orig_offs, np.uint32), self._get(orig_offs + 4, np.uint64)
        item_type, count, offs = GGUFValueType(raw_item_type[0]), int(length[0]), orig_offs + 12
        # Same layout as the stock reader: [item type, length, one part per item (two for a
        # string: its length and its bytes)], and data holds the indexes of the item values.
        parts = [raw_item_type, length]
        numpy_type = self.gguf_scalar_to_np.get(item_type)
        if item_type == GGUFValueType.STRING:
            for _ in range(count):
                size = self._get(offs, np.uint64)
                parts += [size, self._get(offs + 8, np.uint8, size[0])]
                offs += 8 + int(size[0])
            data = list(range(3, len(parts), 2))
        elif numpy_type is not None:
            values = self._get(offs, numpy_type, count)
            parts += list(values.reshape(count, 1))
            offs += values.nbytes
            data = list(range(2, len(parts)))
        else:  # arrays of arrays: rare, left to the stock code
            return super()._get_field_parts(orig_offs, raw_type)
        types = [GGUFValueType.ARRAY, item_type] if count else [GGUFValueType.ARRAY]
        return offs - orig_offs, parts, data, types


def read_gguf(path: str | Path):
    """Open a GGUF file, turning any parse failure into one clear error."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such GGUF file")
    try:
        reader = BulkGGUFReader(path)
    except TruncatedGGUF as err:
        raise UserError(
            f"{path}: truncated or corrupt GGUF file ({err}); copy or download it again"
        ) from None
    except Exception as err:  # gguf raises ValueError, struct.error, IndexError...
        raise UserError(f"{path}: not a valid GGUF file ({type(err).__name__}: {err})") from None
    arch = field(reader, "general.architecture")
    if arch != "gemma3":
        raise UserError(f"{path}: architecture {arch!r} is not supported (only gemma3)")
    return reader


def field(reader, key: str, default=None):
    """A GGUF metadata value (scalars, strings and arrays)."""
    f = reader.fields.get(key)
    if f is None:
        if default is None:
            raise UserError(f"GGUF metadata has no {key!r}: the file is incomplete")
        return default
    return f.contents()


def hf_config(reader) -> dict:
    """The GGUF metadata as a Hugging Face ``gemma3_text`` config dict."""
    a = "gemma3."
    heads = field(reader, a + "attention.head_count")
    config = {
        "model_type": "gemma3_text",
        "vocab_size": len(reader.fields["tokenizer.ggml.tokens"].data),
        "num_hidden_layers": field(reader, a + "block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": field(reader, a + "attention.head_count_kv", heads),
        "hidden_size": field(reader, a + "embedding_length"),
        "intermediate_size": field(reader, a + "feed_forward_length"),
        "head_dim": field(reader, a + "attention.key_length"),
        "query_pre_attn_scalar": field(reader, a + "attention.key_length"),
        "sliding_window": field(reader, a + "attention.sliding_window"),
        "rms_norm_eps": float(field(reader, a + "attention.layer_norm_rms_epsilon")),
    }
    rope_base = field(reader, a + "rope.freq_base", 1_000_000.0)
    if rope_base != 1_000_000.0:  # Gemma3Backbone hard-codes 10k local / 1M global.
        raise UserError(f"unsupported global rope base {rope_base} (Gemma3Backbone uses 1e6)")
    return config


class GGUFTensorLoader:
    """KerasHub's ``SafetensorLoader`` interface over a GGUF file, keyed by Hugging Face names."""

    def __init__(self, reader, num_layers: int, progress: tqdm | None = None):
        self.tensors = {t.name: t for t in reader.tensors}
        self.names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GEMMA3, num_layers)
        self.progress = progress
        self.ported: set[str] = set()  # paths of the Keras variables given a value
        self.last: tuple[str, np.ndarray] | None = None

    def get_tensor(self, hf_key: str) -> np.ndarray:
        if self.last is not None and self.last[0] == hf_key:
            return self.last[1]  # KerasHub probes the embedding once before porting it
        name = self.names.get_name(hf_key, try_suffixes=(".weight",))
        if name not in self.tensors:
            raise KeyError(f"{hf_key} ({name}) is not in the GGUF file")
        tensor = self.tensors[name]
        array = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        array = array.astype(np.float32, copy=False).reshape(tuple(reversed(tensor.shape.tolist())))
        if name.endswith("norm.weight"):
            array = array - 1.0  # llama.cpp stores Gemma RMSNorm weights as (1 + w).
        self.last = (hf_key, array)
        return array

    def port_weight(self, keras_variable, hf_weight_key, hook_fn=None):
        tensor = self.get_tensor(hf_weight_key)
        if hook_fn:
            tensor = hook_fn(tensor, list(keras_variable.shape))
        keras_variable.assign(tensor)
        self.ported.add(keras_variable.path)
        if self.progress is not None:
            self.progress.update(1)


def build_then_assign(build, assign):
    """``obj = build()``, then ``assign(obj)`` its weights, without random initialization first.

    Keras fills each new variable with random numbers as it is created: for Gemma 3 270M that
    is 268 million draws of JAX's threefry, ~9 s of CPU on 2 cores, all overwritten at once by
    the converted or saved weights. Created inside ``StatelessScope(initialize_variables=False)``
    the variables only record their initializer until ``assign`` gives them values; any
    variable it leaves unset is then initialized as usual.
    """
    import keras
    from keras.src.backend.common import global_state  # Keras's list of deferred variables

    with keras.StatelessScope(initialize_variables=False):
        obj = build()
    # Keras initializes the deferred variables when the next top-level stateless scope ends,
    # and fails on any already assigned: leave it only those still unset (none on failure,
    # since ``obj`` is then thrown away).
    deferred = global_state.get_global_attribute("uninitialized_variables") or []
    try:
        assign(obj)
    except BaseException:
        global_state.set_global_attribute("uninitialized_variables", [])
        raise
    unset = [v for v in deferred if v._value is None]
    global_state.set_global_attribute("uninitialized_variables", unset)
    with keras.StatelessScope():
        pass  # leaving it initializes the unset ones now
    return obj


def load_preset(preset: str | Path, dtype: str | None = None):
    """``CausalLM.from_preset`` for a local KerasHub preset, minus the random initialization.

    Same task, preprocessor and weights as ``from_preset`` gives; used for the presets
    converted from GGUF files, where initialization was most of the load time. Under a
    ``keras.distribution`` it is ``from_preset`` itself: deferred variables would miss the
    distribution's layouts.
    """
    import keras
    import keras_hub

    preset = str(preset)
    if keras.distribution.distribution() is not None:
        return keras_hub.models.CausalLM.from_preset(preset, dtype=dtype)
    backbone = build_then_assign(
        lambda: keras_hub.models.Backbone.from_preset(preset, dtype=dtype, load_weights=False),
        lambda backbone: backbone.load_weights(Path(preset) / "model.weights.h5"),
    )
    return keras_hub.models.CausalLM.from_preset(
        preset, backbone=backbone, dtype=dtype, load_weights=False
    )


def sentencepiece_proto(reader) -> bytes:
    """Rebuild the SentencePiece model proto from the GGUF vocabulary, repaired for text use."""
    from sentencepiece import sentencepiece_model_pb2 as sp

    tokens_field = reader.fields["tokenizer.ggml.tokens"]
    pieces = [bytes(tokens_field.parts[i]).decode("utf-8") for i in tokens_field.data]
    scores = field(reader, "tokenizer.ggml.scores")
    types = field(reader, "tokenizer.ggml.token_type")
    unk_id = field(reader, "tokenizer.ggml.unknown_token_id")

    proto = sp.ModelProto()
    trainer = proto.trainer_spec
    trainer.model_type = sp.TrainerSpec.BPE
    trainer.vocab_size = len(pieces)
    trainer.byte_fallback = True
    trainer.unk_id = unk_id
    trainer.bos_id = field(reader, "tokenizer.ggml.bos_token_id")
    trainer.eos_id = field(reader, "tokenizer.ggml.eos_token_id")
    trainer.pad_id = field(reader, "tokenizer.ggml.padding_token_id")
    for spec in (proto.normalizer_spec, proto.denormalizer_spec):
        spec.name = "identity"
        spec.add_dummy_prefix = False
        spec.escape_whitespaces = True
        spec.remove_extra_whitespaces = False

    for i, (text, score, kind) in enumerate(zip(pieces, scores, types, strict=True)):
        if i == unk_id:
            kind = UNKNOWN  # stored as control; SentencePiece needs exactly one unknown piece
        elif kind == CONTROL and text in TEXT_CONTROL_PIECES:
            kind = USER_DEFINED
        if kind == USER_DEFINED:
            text = text.replace(" ", "\u2581")  # user pieces match after space escaping
        piece = proto.pieces.add()
        piece.piece, piece.score, piece.type = text, float(score), int(kind)
    return proto.SerializeToString()


def gguf_to_causal_lm(path: str | Path):
    """Build a float32 ``Gemma3CausalLM`` (backbone, tokenizer, preprocessor) from a GGUF."""
    import keras_hub
    from keras_hub.src.utils.transformers import convert_gemma3

    reader = read_gguf(path)
    config = hf_config(reader)
    tokenizer = keras_hub.models.Gemma3Tokenizer(
        proto=sentencepiece_proto(reader), has_vision_tokens=False
    )
    with tqdm(total=len(reader.tensors), desc="converting GGUF", unit="tensor") as bar:
        loader = GGUFTensorLoader(reader, config["num_hidden_layers"], bar)
        backbone = build_then_assign(
            lambda: keras_hub.models.Gemma3Backbone(
                **convert_gemma3.convert_backbone_config(config), dtype="float32"
            ),
            lambda backbone: convert_gemma3.convert_weights(backbone, loader, config),
        )
    missing = [w.path for w in backbone.weights if w.path not in loader.ported]
    if missing:
        raise UserError(f"{path}: the GGUF gave no value for {len(missing)} weights: {missing[:3]}")
    preprocessor = keras_hub.models.Gemma3CausalLMPreprocessor(tokenizer=tokenizer)
    return keras_hub.models.Gemma3CausalLM(backbone=backbone, preprocessor=preprocessor)
