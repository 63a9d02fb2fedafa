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

import numpy as np
from tqdm.auto import tqdm

from gemma_cse.cli import UserError

# SentencePiece piece types (GGUF uses the same numbering).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
# Control pieces that must match inside text, or chat prompts never tokenize to them.
TEXT_CONTROL_PIECES = {"<start_of_turn>", "<end_of_turn>", "<mask>"}


def read_gguf(path: str | Path):
    """Open a GGUF file, turning any parse failure into one clear error."""
    import gguf

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such GGUF file")
    try:
        reader = gguf.GGUFReader(str(path))
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
        import gguf

        self.tensors = {t.name: t for t in reader.tensors}
        self.names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GEMMA3, num_layers)
        self.progress = progress

    @functools.lru_cache(maxsize=1)  # KerasHub probes the embedding once before porting it
    def get_tensor(self, hf_key: str) -> np.ndarray:
        import gguf

        name = self.names.get_name(hf_key, try_suffixes=(".weight",))
        if name not in self.tensors:
            raise KeyError(f"{hf_key} ({name}) is not in the GGUF file")
        tensor = self.tensors[name]
        array = gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32)
        array = array.reshape(tuple(reversed([int(d) for d in tensor.shape])))
        if name.endswith("norm.weight"):
            array = array - 1.0  # llama.cpp stores Gemma RMSNorm weights as (1 + w).
        return array

    def port_weight(self, keras_variable, hf_weight_key, hook_fn=None):
        tensor = self.get_tensor(hf_weight_key)
        if hook_fn:
            tensor = hook_fn(tensor, list(keras_variable.shape))
        keras_variable.assign(tensor)
        if self.progress is not None:
            self.progress.update(1)


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
    backbone = keras_hub.models.Gemma3Backbone(
        **convert_gemma3.convert_backbone_config(config), dtype="float32"
    )
    with tqdm(total=len(reader.tensors), desc="converting GGUF", unit="tensor") as bar:
        loader = GGUFTensorLoader(reader, config["num_hidden_layers"], bar)
        convert_gemma3.convert_weights(backbone, loader, config)
    preprocessor = keras_hub.models.Gemma3CausalLMPreprocessor(tokenizer=tokenizer)
    return keras_hub.models.Gemma3CausalLM(backbone=backbone, preprocessor=preprocessor)
