"""``python -m gemma_cse.export --run runs/<name> --format hf|gguf``: serve a run elsewhere.

``hf`` writes Hugging Face safetensors with KerasHub's own exporter (for vLLM, transformers);
``gguf`` writes a llama.cpp file for Gemma 3 models: KerasHub's Hugging Face weight map, renamed
with gguf's tensor-name map, norms stored as 1 + w, and the tokenizer repairs of
``gguf_convert`` undone, so the file reads back exactly as the embedded GGUF does.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

import numpy as np

from gemma_cse.cli import UserError, run
from gemma_cse.gguf_convert import CONTROL, TEXT_CONTROL_PIECES, UNKNOWN, USER_DEFINED


def export_hf(causal_lm, out: Path) -> Path:
    """Hugging Face checkpoint (config.json, model.safetensors, tokenizer) via KerasHub."""
    partial = out.with_name(f".{out.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    try:
        causal_lm.export_to_transformers(str(partial))
    except (ValueError, NotImplementedError) as err:
        raise UserError(f"KerasHub cannot export {type(causal_lm).__name__} to HF: {err}") from None
    shutil.rmtree(out, ignore_errors=True)
    os.replace(partial, out)
    return out


def _gguf_vocabulary(tokenizer) -> tuple[list[str], list[float], list[int]]:
    """The SentencePiece vocabulary as llama.cpp stores it (inverse of the import repairs)."""
    from sentencepiece import sentencepiece_model_pb2 as sp

    proto = sp.ModelProto()
    proto.ParseFromString(tokenizer.proto)
    pieces, scores, types = [], [], []
    for piece in proto.pieces:
        text, kind = piece.piece, piece.type
        if kind == UNKNOWN or kind == USER_DEFINED and text in TEXT_CONTROL_PIECES:
            kind = CONTROL
        elif kind == USER_DEFINED:
            text = text.replace("\u2581", " ")
        pieces.append(text)
        scores.append(piece.score)
        types.append(int(kind))
    return pieces, scores, types


def export_gguf(causal_lm, out: Path, name: str = "gemma_cse") -> Path:
    """A float16/float32 GGUF of a Gemma 3 CausalLM that llama.cpp loads."""
    import gguf
    import keras_hub
    from keras_hub.src.utils.transformers.export.gemma3 import get_gemma3_weights_map

    backbone = causal_lm.backbone
    if not isinstance(backbone, keras_hub.models.Gemma3Backbone):
        raise UserError(f"GGUF export supports Gemma 3 only, not {type(backbone).__name__}")
    tokenizer = causal_lm.preprocessor.tokenizer
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GEMMA3, backbone.num_layers)
    writer = gguf.GGUFWriter(str(out) + ".partial", "gemma3")
    writer.add_name(name)
    writer.add_context_length(32768)
    writer.add_embedding_length(backbone.hidden_dim)
    writer.add_block_count(backbone.num_layers)
    writer.add_feed_forward_length(backbone.intermediate_dim)
    writer.add_head_count(backbone.num_query_heads)
    writer.add_head_count_kv(backbone.num_key_value_heads)
    writer.add_key_length(backbone.head_dim)
    writer.add_value_length(backbone.head_dim)
    writer.add_layer_norm_rms_eps(backbone.layer_norm_epsilon)
    writer.add_rope_freq_base(1_000_000.0)
    writer.add_sliding_window(backbone.sliding_window_size)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    pieces, scores, types = _gguf_vocabulary(tokenizer)
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(pieces)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(tokenizer.start_token_id)
    writer.add_eos_token_id(tokenizer.end_token_id)
    writer.add_unk_token_id(tokenizer.token_to_id("<unk>"))
    writer.add_pad_token_id(tokenizer.pad_token_id)
    writer.add_add_bos_token(True)
    writer.add_add_space_prefix(False)
    for hf_key, tensor in get_gemma3_weights_map(backbone, include_lm_head=True).items():
        gguf_name = names.get_name(hf_key, try_suffixes=(".weight",))
        if gguf_name is None:
            continue  # lm_head: tied to the token embedding
        array = np.asarray(tensor, dtype="float32")
        if gguf_name.endswith("norm.weight"):
            writer.add_tensor(gguf_name, array + 1.0)  # llama.cpp stores Gemma norms as 1 + w
        else:
            writer.add_tensor(gguf_name, array.astype("float16"))
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file(progress=True)
        writer.close()
        os.replace(str(out) + ".partial", out)
    except OSError as err:
        raise UserError(f"could not write {out}: {err.strerror or err}") from None
    finally:
        Path(str(out) + ".partial").unlink(missing_ok=True)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m gemma_cse.export",
        description="Export a training run's merged model for serving at scale: Hugging Face "
        "safetensors (vLLM, transformers) or GGUF (llama.cpp).",
    )
    parser.add_argument("--run", required=True, help="run directory (runs/<name>) with preset/")
    parser.add_argument("--format", choices=["hf", "gguf"], required=True)
    parser.add_argument("--out", help="output path (default: <run>/export-hf or <run>/model.gguf)")
    args = parser.parse_args(argv)
    if not Path(args.run).is_dir():
        raise UserError(f"{args.run}: no such run directory")
    preset = Path(args.run) / "preset"
    if not (preset / "config.json").is_file():
        raise UserError(f"{args.run}: no merged preset (preset/config.json); train the run first")
    from gemma_cse.models import load_causal_lm

    causal_lm = load_causal_lm(str(preset))
    if args.format == "hf":
        out = export_hf(causal_lm, Path(args.out or Path(args.run) / "export-hf"))
    else:
        out = export_gguf(
            causal_lm, Path(args.out or Path(args.run) / "model.gguf"), Path(args.run).name
        )
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
