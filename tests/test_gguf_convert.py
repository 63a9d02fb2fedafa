"""The GGUF → KerasHub conversion, checked against llama.cpp on the real embedded model.

llama.cpp is the program the GGUF was made for, so its tokens, next-token logits and
perplexity (recorded by ``tools/make_golden.py`` in ``tests/golden/``) are the reference. The
``embedded`` tests load the real converted model; the others build tiny GGUF files with gguf's
own writer and check the pieces of the conversion one by one.
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as QType
from sentencepiece import SentencePieceProcessor
from sentencepiece import sentencepiece_model_pb2 as sp

from gemma_cse import gguf_convert, models
from gemma_cse.cli import UserError

GOLDEN_PATH = Path(__file__).parent / "golden" / "gemma3_270m_llamacpp.json"
GOLDEN = json.loads(GOLDEN_PATH.read_text(encoding="utf-8"))
# Two top-1 candidates closer than this (in logits) are a tie that neither implementation
# breaks reliably: llama.cpp quantizes activations to 8 bits, which moves logits by up to
# ~0.7 here, while KerasHub computes in float32.
TIE = 0.05


# --- The real embedded model against llama.cpp ------------------------------------------


@pytest.fixture(scope="module")
def model():
    gguf_path = models.embedded_gguf()
    if gguf_path.stat().st_size != GOLDEN["gguf_bytes"]:
        pytest.fail(f"{GOLDEN_PATH.name} was made from another GGUF: rerun tools/make_golden.py")
    return models.load_causal_lm()


def logits_of(model, sequences: list[list[int]]) -> np.ndarray:
    """KerasHub's logits for right-padded ``sequences``: (batch, longest, vocab), float64."""
    length = max(len(ids) for ids in sequences)
    token_ids = np.zeros((len(sequences), length), dtype="int32")
    padding_mask = np.zeros((len(sequences), length), dtype=bool)
    for row, ids in enumerate(sequences):
        token_ids[row, : len(ids)] = ids
        padding_mask[row, : len(ids)] = True
    logits = model({"token_ids": token_ids, "padding_mask": padding_mask})
    return np.asarray(logits, dtype=np.float64)


@pytest.mark.embedded
def test_token_ids_match_llama_cpp(model):
    tokenizer = model.preprocessor.tokenizer
    cases = [(s["text"], s["ids"]) for s in GOLDEN["strings"]]
    cases += [(p["text"], p["ids"][1:]) for p in GOLDEN["prompts"]]  # prompts without BOS
    assert len(GOLDEN["strings"]) >= 32
    wrong = []
    for text, expected in cases:
        ids = np.asarray(tokenizer.tokenize(text)).tolist()
        if ids != expected:
            wrong.append(f"{text!r}: ours {ids}, llama.cpp {expected}")
    assert not wrong, f"{len(wrong)}/{len(cases)} strings tokenized differently:\n" + "\n".join(
        wrong
    )


@pytest.mark.embedded
def test_next_token_matches_llama_cpp(model):
    prompts = GOLDEN["prompts"]
    assert len(prompts) >= 24
    logits = logits_of(model, [p["ids"] for p in prompts])
    agree, ties, report = 0, 0, []
    for row, prompt in enumerate(prompts):
        ours = logits[row, len(prompt["ids"]) - 1]
        ref_ids, ref_logits = prompt["top5_ids"], np.array(prompt["top5_logits"])
        top = int(ours.argmax())
        # Whatever the top-1, the two models must rank the same few tokens first and give
        # them nearly the same logits; a broken conversion misses this by whole units.
        assert top in ref_ids, f"{prompt['text']!r}: our top-1 {top} not in llama.cpp's top 5"
        assert ref_ids[0] in np.argsort(-ours)[:5], f"{prompt['text']!r}: top-5 differ"
        gap = np.abs(ours[ref_ids] - ref_logits).max()
        assert gap < 1.0, f"{prompt['text']!r}: llama.cpp's top-5 logits differ by {gap:.2f}"
        if top == ref_ids[0]:
            agree += 1
            continue
        ref_of_top = ref_logits[ref_ids.index(top)]
        tie = min(ours[top] - ours[ref_ids[0]], ref_logits[0] - ref_of_top) < TIE
        ties += tie
        report.append(
            f"{prompt['text']!r}: ours {top} ({ours[top]:.3f} vs {ours[ref_ids[0]]:.3f}), "
            f"llama.cpp {ref_ids[0]} ({ref_logits[0]:.3f} vs {ref_of_top:.3f})"
            + (" — a tie" if tie else "")
        )
    share = (agree + ties) / len(prompts)
    print(f"top-1 equal on {agree}/{len(prompts)} prompts, {ties} more within a tie", *report)
    assert share >= 0.95, f"top-1 agreement {share:.0%} < 95%:\n" + "\n".join(report)


@pytest.mark.embedded
def test_perplexity_matches_llama_cpp(model):
    golden = GOLDEN["perplexity"]
    ids = golden["ids"]
    paragraph = (GOLDEN_PATH.parent / golden["file"]).read_text(encoding="utf-8").strip()
    assert ids[1:] == np.asarray(model.preprocessor.tokenizer.tokenize(paragraph)).tolist()
    logits = logits_of(model, [ids])[0, :-1]
    logits -= logits.max(axis=-1, keepdims=True)
    log_probs = logits - np.log(np.exp(logits).sum(axis=-1, keepdims=True))
    nll = -log_probs[np.arange(len(ids) - 1), ids[1:]]
    perplexity = float(np.exp(nll.mean()))
    reference = golden["perplexity"]
    assert abs(perplexity / reference - 1) <= 0.05, f"ours {perplexity:.3f}, llama.cpp {reference}"


@pytest.mark.embedded
def test_next_token_matches_llama_cpp_on_float32_weights(model):
    """The same prompts, with llama.cpp run on the GGUF's weights dequantized to float32
    (``tools/make_golden.py --dequantize``): without its 8-bit activations, llama.cpp computes
    what KerasHub computes, so the top-1 must agree on every prompt and the logits to rounding
    (measured: 28/28, largest top-5 logit difference 0.024)."""
    golden = json.loads((GOLDEN_PATH.parent / "gemma3_270m_llamacpp_f32.json").read_text())
    assert golden["gguf_bytes"] == GOLDEN["gguf_bytes"] and golden["weights"].startswith("deq")
    prompts = golden["prompts"]
    logits = logits_of(model, [p["ids"] for p in prompts])
    ours = [logits[row, len(p["ids"]) - 1] for row, p in enumerate(prompts)]
    differ = [
        p["text"] for p, o in zip(prompts, ours, strict=True) if o.argmax() != p["top5_ids"][0]
    ]
    assert not differ, f"top-1 differs from float32 llama.cpp on {len(differ)}: {differ}"
    gap = max(
        np.abs(o[p["top5_ids"]] - np.array(p["top5_logits"])).max()
        for p, o in zip(prompts, ours, strict=True)
    )
    assert gap < 0.1, f"top-5 logits differ from float32 llama.cpp by up to {gap:.3f}"


# --- Tiny GGUF files made with gguf's own writer ----------------------------------------

PAD, EOS, BOS, UNK, MASK, SOT, EOT = range(7)
SPECIAL = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>"]
SPACES2, SPACES3 = 7, 8  # whitespace-run pieces, stored with ASCII spaces as llama.cpp does
BYTES = [f"<0x{b:02X}>" for b in range(256)]
WORDS = ["▁", "h", "o", "l", "a", "u", "s", "e", "r", "ho", "la", "hola", "▁hola", "us", "er"]
WORDS += ["user"]
TOKENS = SPECIAL + ["  ", "   "] + BYTES + WORDS
TYPES = [3] * len(SPECIAL) + [4, 4] + [6] * 256 + [1] * len(WORDS)  # SentencePiece numbering
SCORES = [0.0] * (9 + 256) + [-float(i) for i in range(len(WORDS))]


def write_gguf(path: Path, arch: str = "gemma3", rope_base: float = 1_000_000.0, tensors=()):
    """A small GGUF with Gemma 3's metadata layout and the vocabulary above."""
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(1)
    writer.add_context_length(512)
    writer.add_embedding_length(64)
    writer.add_feed_forward_length(128)
    writer.add_head_count(2)
    writer.add_head_count_kv(1)
    writer.add_key_length(32)
    writer.add_value_length(32)
    writer.add_sliding_window(16)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_rope_freq_base(rope_base)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(TOKENS)
    writer.add_token_scores(SCORES)
    writer.add_token_types(TYPES)
    writer.add_bos_token_id(BOS)
    writer.add_eos_token_id(EOS)
    writer.add_unk_token_id(UNK)
    writer.add_pad_token_id(PAD)
    for name, array, qtype in tensors:
        if qtype == QType.F32:
            writer.add_tensor(name, array)
        else:
            writer.add_tensor(name, gguf.quants.quantize(array, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture
def tiny_gguf(tmp_path):
    rng = np.random.default_rng(0)
    tensors = [
        ("blk.0.attn_norm.weight", np.full(64, 1.25, dtype=np.float32), QType.F32),
        ("blk.0.ffn_up.weight", rng.normal(size=(128, 64)).astype(np.float32), QType.Q8_0),
        ("token_embd.weight", rng.normal(size=(len(TOKENS), 64)).astype(np.float32), QType.F32),
    ]
    return write_gguf(tmp_path / "tiny.gguf", tensors=tensors), tensors


def test_bulk_reader_reads_what_gguf_reads(tiny_gguf):
    path, _ = tiny_gguf
    ours, stock = gguf_convert.BulkGGUFReader(path), gguf.GGUFReader(path)
    assert list(ours.fields) == list(stock.fields)
    for key, field in stock.fields.items():
        mine = ours.fields[key]
        assert mine.contents() == field.contents(), key
        assert (mine.offset, mine.data, mine.types) == (field.offset, field.data, field.types)
        assert [p.tolist() for p in mine.parts] == [p.tolist() for p in field.parts], key
        assert [p.dtype for p in mine.parts] == [p.dtype for p in field.parts], key
    assert [t.name for t in ours.tensors] == [t.name for t in stock.tensors]
    for mine, tensor in zip(ours.tensors, stock.tensors, strict=True):
        assert mine.tensor_type == tensor.tensor_type
        assert np.array_equal(mine.data, tensor.data) and mine.data.dtype == tensor.data.dtype


def test_hf_config_from_metadata(tiny_gguf):
    config = gguf_convert.hf_config(gguf_convert.read_gguf(tiny_gguf[0]))
    assert config["vocab_size"] == len(TOKENS)
    assert (config["num_hidden_layers"], config["hidden_size"]) == (1, 64)
    assert (config["num_attention_heads"], config["num_key_value_heads"]) == (2, 1)
    assert (config["head_dim"], config["sliding_window"]) == (32, 16)


def test_unsupported_rope_base_is_a_user_error(tmp_path):
    reader = gguf_convert.read_gguf(write_gguf(tmp_path / "r.gguf", rope_base=10_000.0))
    with pytest.raises(UserError, match="rope base"):
        gguf_convert.hf_config(reader)


def test_tensor_loader_dequantizes_to_hf_layout_and_unshifts_norms(tiny_gguf):
    path, tensors = tiny_gguf
    loader = gguf_convert.GGUFTensorLoader(gguf_convert.read_gguf(path), num_layers=1)
    norm = loader.get_tensor("model.layers.0.input_layernorm.weight")
    np.testing.assert_array_equal(norm, np.full(64, 0.25, dtype=np.float32))  # stored 1 + w
    up = loader.get_tensor("model.layers.0.mlp.up_proj.weight")
    assert up.shape == (128, 64) and up.dtype == np.float32  # (out, in), as in Hugging Face
    np.testing.assert_allclose(up, tensors[1][1], atol=0.03)  # Q8_0: ~1% of the range
    with pytest.raises(KeyError, match="not in the GGUF"):
        loader.get_tensor("model.layers.0.mlp.down_proj.weight")


@pytest.fixture
def spm(tiny_gguf):
    proto = gguf_convert.sentencepiece_proto(gguf_convert.read_gguf(tiny_gguf[0]))
    return proto, SentencePieceProcessor(model_proto=proto)


def test_sentencepiece_proto_settings(spm):
    proto = sp.ModelProto.FromString(spm[0])
    assert proto.trainer_spec.model_type == sp.TrainerSpec.BPE
    assert proto.trainer_spec.byte_fallback
    ids = proto.trainer_spec
    assert (ids.unk_id, ids.bos_id, ids.eos_id, ids.pad_id) == (UNK, BOS, EOS, PAD)
    assert proto.normalizer_spec.name == "identity"  # no NFKC: text reaches the model as is
    assert not proto.normalizer_spec.add_dummy_prefix
    assert [p.piece for p in proto.pieces][SPACES2] == "▁▁"


def test_sentencepiece_piece_types_are_repaired(spm):
    processor = spm[1]
    assert processor.unk_id() == UNK and processor.is_unknown(UNK)  # stored as control
    assert processor.is_control(BOS) and processor.is_control(EOS)  # left alone
    for piece in (MASK, SOT, EOT):  # stored as control, must match inside text
        assert not processor.is_control(piece) and not processor.is_unknown(piece)


def test_sentencepiece_matches_chat_markers_in_text(spm):
    processor = spm[1]
    assert processor.encode("<start_of_turn>user") == [SOT, TOKENS.index("user")]
    assert processor.encode("hola<end_of_turn>") == [TOKENS.index("hola"), EOT]
    assert BOS not in processor.encode("<bos>hola")  # true control pieces stay out of text


def test_sentencepiece_whitespace_runs_bytes_and_no_dummy_prefix(spm):
    processor = spm[1]
    hola = TOKENS.index("hola")
    assert processor.encode("hola") == [hola]  # no "▁" added in front
    assert processor.encode("hola  hola") == [hola, SPACES2, hola]
    assert processor.encode("hola   hola") == [hola, SPACES3, hola]
    byte = TOKENS.index("<0x00>")
    assert processor.encode("ñ") == [byte + 0xC3, byte + 0xB1]  # byte fallback, UTF-8 bytes
    assert processor.decode(processor.encode("¿ñandú?  ¡sí!")) == "¿ñandú?  ¡sí!"


# --- Files that are not (whole) GGUF files -----------------------------------------------


def one_line_error(call, *args, match: str) -> str:
    with pytest.raises(UserError, match=match) as info:
        call(*args)
    message = str(info.value)
    assert "\n" not in message and len(message) < 300, message
    return message


@pytest.fixture
def empty_cache(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("GEMMA_CSE_CACHE", str(cache))
    return cache


def test_truncated_gguf_is_a_clear_user_error(tmp_path):
    real = models.embedded_gguf()
    with real.open("rb") as file:
        head = file.read(1 << 20)
    path = tmp_path / "truncated.gguf"
    path.write_bytes(head)
    one_line_error(gguf_convert.read_gguf, path, match="truncated or corrupt GGUF file")


def test_truncated_gguf_through_load_causal_lm(tmp_path, empty_cache):
    path = tmp_path / "truncated.gguf"
    with models.embedded_gguf().open("rb") as file:
        path.write_bytes(file.read(1 << 20))
    one_line_error(models.load_causal_lm, str(path), match="truncated or corrupt GGUF file")
    assert not any((empty_cache / "presets").iterdir())  # no half-written preset left


def test_gguf_truncated_in_tensor_data_is_a_user_error(tiny_gguf, tmp_path):
    data = tiny_gguf[0].read_bytes()
    path = tmp_path / "cut.gguf"
    path.write_bytes(data[: len(data) - 1000])
    one_line_error(gguf_convert.read_gguf, path, match="truncated or corrupt GGUF file")


@pytest.mark.parametrize(
    "content",
    [b"", b"hello, this is not a model\n" * 100, b"GGUF" + bytes(range(256)) * 40],
    ids=["empty", "text", "bad-header"],
)
def test_garbage_file_is_a_clear_user_error(tmp_path, empty_cache, content):
    path = tmp_path / "garbage.gguf"
    path.write_bytes(content)
    one_line_error(gguf_convert.read_gguf, path, match="garbage.gguf: (not a valid|truncated)")
    one_line_error(models.load_causal_lm, str(path), match="(not a valid|truncated)")


def test_other_architecture_is_a_user_error(tmp_path):
    path = write_gguf(tmp_path / "llama.gguf", arch="llama")
    one_line_error(gguf_convert.read_gguf, path, match="'llama' is not supported")


def test_missing_gguf_is_a_user_error(tmp_path):
    one_line_error(gguf_convert.read_gguf, tmp_path / "nothing.gguf", match="no such GGUF")


# --- Building Keras models without random initialization -------------------------------


def test_build_then_assign_skips_init_and_leaves_keras_consistent():
    import keras

    def build():
        layer = keras.layers.Dense(3, bias_initializer="ones")
        layer.build((None, 2))
        return layer

    kernel = np.arange(6, dtype="float32").reshape(2, 3)
    layer = gguf_convert.build_then_assign(build, lambda layer: layer.kernel.assign(kernel))
    np.testing.assert_array_equal(np.asarray(layer.kernel), kernel)
    np.testing.assert_array_equal(np.asarray(layer.bias), np.ones(3))  # unset: initialized
    with keras.StatelessScope():  # Keras would fail here on a variable it thinks is pending
        pass
    np.testing.assert_array_equal(np.asarray(layer(np.ones((1, 2)))), [[4.0, 6.0, 8.0]])


def test_build_then_assign_failure_leaves_nothing_pending():
    import keras

    def build():
        layer = keras.layers.Dense(3)
        layer.build((None, 2))
        return layer

    def assign(layer):
        layer.kernel.assign(np.zeros((2, 3), dtype="float32"))
        raise RuntimeError("weights file is broken")

    with pytest.raises(RuntimeError, match="broken"):
        gguf_convert.build_then_assign(build, assign)
    with keras.StatelessScope():  # nothing of the thrown-away layer is initialized here
        pass
