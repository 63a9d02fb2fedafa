"""Export round trips: HF safetensors through KerasHub's loader, GGUF through our importer."""

from __future__ import annotations

import numpy as np
import pytest

from gemma_cse.cli import UserError
from gemma_cse.export import _gguf_vocabulary, export_gguf, export_hf, main
from gemma_cse.gguf_convert import gguf_to_causal_lm, read_gguf
from gemma_cse.models import load_causal_lm


def _logits(model, text: str) -> np.ndarray:
    tokenizer = model.preprocessor.tokenizer
    ids = np.array([[tokenizer.start_token_id, *np.asarray(tokenizer.tokenize(text)).tolist()]])
    return np.asarray(model({"token_ids": ids, "padding_mask": np.ones_like(ids, bool)}))


@pytest.fixture(scope="module")
def tiny_gemma(tiny_presets):
    return load_causal_lm(str(tiny_presets["gemma3"]))


def test_gguf_export_reads_back_with_the_same_logits(tiny_gemma, tmp_path):
    path = export_gguf(tiny_gemma, tmp_path / "tiny.gguf")
    assert not list(tmp_path.glob("*.partial"))
    back = gguf_to_causal_lm(path)
    text = "<start_of_turn>user\n¿Cómo tramito mi constancia?<end_of_turn>\n"
    expected, got = _logits(tiny_gemma, text), _logits(back, text)
    assert np.abs(expected).max() > 0.05  # not a degenerate model
    np.testing.assert_allclose(got, expected, atol=5e-3)  # float16 storage
    assert np.argmax(got[0, -1]) == np.argmax(expected[0, -1])


def test_hf_export_loads_through_kerashub(tiny_gemma, tmp_path):
    out = export_hf(tiny_gemma, tmp_path / "hf")
    assert (out / "config.json").is_file() and list(out.glob("*.safetensors"))
    back = load_causal_lm(str(out))
    text = "Hola, ¿cuándo es la reinscripción?"
    np.testing.assert_allclose(_logits(back, text), _logits(tiny_gemma, text), atol=1e-4)


def test_gguf_export_refuses_other_families(tiny_presets, tmp_path):
    with pytest.raises(UserError, match="Gemma 3 only"):
        export_gguf(load_causal_lm(str(tiny_presets["gpt2"])), tmp_path / "x.gguf")


def test_export_cli_needs_a_trained_run(tmp_path, capsys):
    with pytest.raises(UserError, match="no merged preset"):
        main(["--run", str(tmp_path), "--format", "hf"])
    with pytest.raises(UserError, match="no such run directory"):
        main(["--run", str(tmp_path / "typo"), "--format", "gguf"])


@pytest.mark.embedded
def test_embedded_vocabulary_exports_as_llamacpp_stores_it():
    from gemma_cse.gguf_convert import field
    from gemma_cse.models import embedded_gguf

    reader = read_gguf(embedded_gguf())
    tokens_field = reader.fields["tokenizer.ggml.tokens"]
    original = [bytes(tokens_field.parts[i]).decode("utf-8") for i in tokens_field.data]
    pieces, scores, types = _gguf_vocabulary(load_causal_lm().preprocessor.tokenizer)
    assert pieces == original
    assert types == [int(t) for t in field(reader, "tokenizer.ggml.token_type")]
    np.testing.assert_allclose(scores, field(reader, "tokenizer.ggml.scores"))


def test_llamacpp_reads_the_exported_gguf_like_kerashub(tiny_gemma, tmp_path):
    """llama.cpp itself loads our GGUF: same token ids and the same greedy continuation."""
    llama_cpp = pytest.importorskip("llama_cpp")
    path = export_gguf(tiny_gemma, tmp_path / "tiny.gguf")
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=128, logits_all=True, verbose=False)
    tokenizer = tiny_gemma.preprocessor.tokenizer
    for question in ("¿Cómo tramito mi constancia?", "hola", "¿Cuándo es la reinscripción?"):
        text = f"<start_of_turn>user\n{question}<end_of_turn>\n<start_of_turn>model\n"
        ids = [tokenizer.start_token_id, *np.asarray(tokenizer.tokenize(text)).tolist()]
        assert llm.tokenize(text.encode(), add_bos=True, special=True) == ids
        keras_ids, llama_ids = list(ids), list(ids)
        for _ in range(8):  # greedy, one token at a time in both
            x = np.array([keras_ids])
            logits = np.asarray(tiny_gemma({"token_ids": x, "padding_mask": np.ones_like(x, bool)}))
            keras_ids.append(int(np.argmax(logits[0, -1])))
            llm.reset()
            llm.eval(llama_ids)
            llama_ids.append(int(np.argmax(llm.scores[len(llama_ids) - 1])))
        assert llama_ids == keras_ids
