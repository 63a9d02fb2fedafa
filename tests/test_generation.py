"""Generation: chat prompts, the fast decoding layout, bounded decoding, compile reuse."""

from __future__ import annotations

import numpy as np
import pytest

from gemma_cse.data import Entry
from gemma_cse.generation import (
    CopyBudget,
    DecodingConfig,
    Generator,
    SubsetOutput,
    chat_prompt,
    count_compilations,
    cut_repetition,
    grounded_message,
    lookup_decode,
    lookup_draft,
    merge_lora,
    prepare_for_decoding,
    repeat_start,
    restrict_vocabulary,
    use_heads_projections,
    vocabulary_for,
)
from gemma_cse.models import load_causal_lm


@pytest.fixture()
def tiny_gemma(tiny_presets):
    return load_causal_lm(str(tiny_presets["gemma3"]))


def test_chat_prompt_renders_history_in_gemma_turns(tiny_gemma):
    tokenizer = tiny_gemma.preprocessor.tokenizer
    prompt = chat_prompt(tokenizer, [("hola", "¡Hola! ¿En qué te ayudo?")], "¿Y la constancia?")
    assert prompt == (
        "<start_of_turn>user\nhola<end_of_turn>\n<start_of_turn>model\n¡Hola! ¿En qué te ayudo?"
        "<end_of_turn>\n<start_of_turn>user\n¿Y la constancia?<end_of_turn>\n<start_of_turn>model\n"
    )


def test_grounded_message_numbers_sources_and_keeps_question():
    entries = [Entry("a", "¿Q1?", "R1."), Entry("b", "¿Q2?", "R2.")]
    message = grounded_message("¿Cómo me inscribo?", entries)
    assert "[1] Pregunta: ¿Q1?\nRespuesta: R1." in message
    assert "[2] Pregunta: ¿Q2?" in message
    assert message.endswith("¿Cómo me inscribo?")


@pytest.mark.parametrize(
    ("text", "expected", "cut"),
    [
        ("Ve al SEL. Ve al SEL. Ve al SEL.", "Ve al SEL.", True),
        ("Entra al SEL y descarga tu constancia.", "Entra al SEL y descarga tu constancia.", False),
        (
            "pide la constancia en el SEL y luego pide la constancia en el SEL y luego",
            "pide la constancia en el SEL y luego",
            True,
        ),
    ],
)
def test_cut_repetition(text, expected, cut):
    assert cut_repetition(text) == (expected, cut)


def test_subset_output_equals_full_logits_on_its_columns(tiny_gemma):
    backbone = tiny_gemma.backbone
    embedding = backbone.token_embedding
    ids = np.array([3, 10, 57, 200, 511], "int32")
    hidden = np.random.default_rng(0).normal(size=(2, 4, backbone.hidden_dim)).astype("float32")
    full = np.asarray(embedding(hidden, reverse=True))
    subset = np.asarray(SubsetOutput(embedding, ids, embedding.input_dim)(hidden, reverse=True))
    np.testing.assert_allclose(subset[..., ids], full[..., ids], rtol=1e-5, atol=1e-5)
    others = np.setdiff1d(np.arange(embedding.input_dim), ids)
    assert (subset[..., others] <= -1e8).all()


@pytest.mark.parametrize("prepare", [restrict_vocabulary, prepare_for_decoding])
def test_restricted_generation_uses_only_allowed_tokens(tiny_gemma, prepare):
    tokenizer = tiny_gemma.preprocessor.tokenizer
    allowed = vocabulary_for(tokenizer, ["Consulta el SEL para tu constancia de estudios."])
    prepare(tiny_gemma, allowed)
    Generator(tiny_gemma, DecodingConfig(max_new_tokens=12))  # compiles with the greedy sampler
    prompt = chat_prompt(tokenizer, [], "¿Dónde pido mi constancia?")
    inputs = tiny_gemma.preprocessor.generate_preprocess([prompt], sequence_length=64)
    inputs = {k: np.asarray(inputs[k]) for k in ("token_ids", "padding_mask")}
    prompt_len = int(np.asarray(inputs["padding_mask"]).sum())
    output = tiny_gemma.generate_step(inputs, stop_token_ids=None)  # token ids in and out
    new_ids = np.asarray(output["token_ids"])[0, prompt_len:]
    assert len(new_ids) > 0
    assert set(new_ids.tolist()) <= set(allowed.tolist())


def test_generation_is_bounded_and_reuses_the_compiled_function(tiny_gemma):
    tokenizer = tiny_gemma.preprocessor.tokenizer
    generator = Generator(tiny_gemma, DecodingConfig(max_new_tokens=8))
    compilations = count_compilations()
    first = generator.generate(chat_prompt(tokenizer, [], "¿Cuándo es la reinscripción?"))
    assert first.new_tokens <= 8
    assert compilations, "the first request compiles"
    before = len(compilations)
    second = generator.generate(chat_prompt(tokenizer, [], "¿Y las bajas de UEA, cuándo son?"))
    assert second.new_tokens <= 8
    assert len(compilations) == before  # same length bucket: the compiled function is reused


def test_merged_lora_and_heads_projections_keep_logits_and_answers(tiny_gemma):
    backbone = tiny_gemma.backbone
    backbone.enable_lora(rank=2)
    rng = np.random.default_rng(0)
    for variable in backbone.trainable_variables:  # LoRA B starts at zero: make it count
        variable.assign(rng.normal(scale=0.05, size=variable.shape).astype("float32"))
    tokenizer = tiny_gemma.preprocessor.tokenizer
    prompt = chat_prompt(tokenizer, [], "¿Dónde pido mi constancia?")
    inputs = tiny_gemma.preprocessor.generate_preprocess([prompt], sequence_length=32)
    inputs = {k: np.asarray(inputs[k]) for k in ("token_ids", "padding_mask")}
    Generator(tiny_gemma, DecodingConfig(max_new_tokens=10))
    before = np.asarray(tiny_gemma(inputs))
    answer = tiny_gemma.generate(prompt, max_length=48, stop_token_ids=None)

    layers = len(backbone.transformer_layers)
    assert merge_lora(backbone) == 2 * layers  # query and value of every layer
    assert not any(getattr(x, "lora_enabled", False) for x in backbone._flatten_layers())
    assert use_heads_projections(tiny_gemma) == 2 * layers  # query and output projections
    assert use_heads_projections(tiny_gemma) == 0  # idempotent
    np.testing.assert_allclose(np.asarray(tiny_gemma(inputs)), before, rtol=1e-4, atol=1e-4)
    assert tiny_gemma.generate(prompt, max_length=48, stop_token_ids=None) == answer


@pytest.mark.parametrize(
    ("history", "expected"),
    [
        ([5, 6, 7, 8, 9, 1, 6, 7], [8, 9, 1]),  # the 2-gram (6, 7) occurred: what followed
        ([5, 6, 7, 5, 6, 9, 2, 5, 6], [9, 2, 5]),  # the latest occurrence wins
        ([1, 2, 3, 4], []),  # the last token never occurred before
    ],
)
def test_lookup_draft(history, expected):
    assert lookup_draft(history, 3) == expected


@pytest.mark.parametrize("fast", [False, True])
def test_prompt_lookup_decoding_gives_the_greedy_answer(tiny_gemma, fast):
    tokenizer = tiny_gemma.preprocessor.tokenizer
    if fast:
        texts = ["Consulta el SEL para tu constancia de estudios.", "La CSE atiende de 9 a 15."]
        prepare_for_decoding(tiny_gemma, vocabulary_for(tokenizer, texts))
    plain = Generator(tiny_gemma, DecodingConfig(max_new_tokens=40), lookup=False)
    lookup = Generator(tiny_gemma, DecodingConfig(max_new_tokens=40))
    assert lookup.lookup and not plain.lookup
    source = "Fuente: la constancia de estudios se pide en el SEL y se entrega en ventanilla. "
    for question in ("¿Dónde pido mi constancia?", source * 3 + "¿Y la constancia de estudios?"):
        prompt = chat_prompt(tokenizer, [], question)
        expected, got = plain.generate(prompt), lookup.generate(prompt)
        assert got.token_ids == expected.token_ids and len(got.token_ids) > 0
        assert (got.text, got.stopped) == (expected.text, expected.stopped)
    assert got.forward_passes < got.new_tokens, "drafts from the prompt were accepted"


def test_copy_budget_counts_prompt_passages():
    budget = CopyBudget([1, 2, 3, 4, 9, 1, 2, 3, 4, 5, 6, 7, 8], n=4)
    assert budget.allows([1, 2, 3], 4)  # (1, 2, 3, 4): the prompt holds it twice
    assert budget.allows([1, 2, 3, 4, 1, 2, 3], 4)
    assert not budget.allows([1, 2, 3, 4, 1, 2, 3, 4, 1, 2, 3], 4)  # a third time
    assert budget.allows([5, 6, 7], 8) and not budget.allows([5, 6, 7, 8, 5, 6, 7], 8)
    assert budget.allows([7, 7, 7, 7, 7], 7)  # not a prompt passage: not budgeted
    assert budget.allows([6, 7], 8)  # shorter than a passage


@pytest.mark.parametrize(
    ("tokens", "expected"),
    [
        ([5, 1, 2, 3, 4, 6, 1, 2, 3, 4], 6),  # the repeat (1, 2, 3, 4) began at index 6
        ([1, 2, 1, 2, 1, 2], 2),  # the longest earlier-seen suffix: (1, 2, 1, 2)
        ([1, 2, 3], 2),  # nothing repeats: the last token
    ],
)
def test_repeat_start(tokens, expected):
    assert repeat_start(tokens) == expected


# A scripted copier: prompt 10 11 … 18 then the question 30. It copies the passage, and
# after its ``loops``-th 17 it jumps back to 11 (its second choice, 18, is how the source
# goes on; 18 → stop). Drafted tokens are scored as the model would, position by position.
STOP = 1
PROMPT = [10, 11, 12, 13, 14, 15, 16, 17, 18, 30]


def scripted_step(prompt: list[int], calls: list, back_to_start_after: int):
    sequence = list(prompt)

    def step(tokens, index):
        calls.append((list(tokens), index))
        del sequence[index:]
        rows = []
        for token in tokens:
            sequence.append(token)
            seventeens = sequence[len(prompt) :].count(17)
            if token == 17:
                loop = seventeens <= back_to_start_after
                rows.append([11, 18] if loop else [18, STOP])
            else:
                rows.append([token + 1 if 11 <= token < 17 else STOP, STOP])
        return rows

    return step


def test_lookup_decoding_revises_a_copy_loop_where_it_began():
    calls = []
    step = scripted_step(PROMPT, calls, back_to_start_after=1000)  # loops for ever
    new, passes = lookup_decode(PROMPT, [11, STOP], step, 60, [STOP])
    assert new == [11, 12, 13, 14, 15, 16, 17, 18, STOP]  # not 11 … 17 11 12 13 14 …
    assert passes == len(calls) < len(new)  # drafts from the prompt were accepted
    assert calls[0] == ([11, 12, 13, 14, 15, 16, 17, 18], len(PROMPT))  # 11 + 7 drafted


def test_lookup_decoding_copies_a_passage_as_often_as_the_prompt_holds_it():
    prompt = PROMPT[:8] + PROMPT[1:]  # the passage 11 … 17 twice
    step = scripted_step(prompt, [], back_to_start_after=1)  # copies it twice, goes on
    new, _ = lookup_decode(prompt, [11, STOP], step, 60, [STOP])
    assert new == [11, 12, 13, 14, 15, 16, 17] * 2 + [18, STOP]
    step = scripted_step(PROMPT, [], back_to_start_after=1)  # the same, held once: revised
    assert lookup_decode(PROMPT, [11, STOP], step, 60, [STOP])[0] == [*range(11, 19), STOP]


def test_a_qlora_base_decodes_with_the_fast_layout(tiny_gemma):
    """After ``quantize_base`` (which locks Keras' layer tracking) the output layer can still
    be restricted, and the quantized model decodes within it."""
    from gemma_cse.train import quantize_base

    quantize_base(tiny_gemma.backbone, "int8")
    tokenizer = tiny_gemma.preprocessor.tokenizer
    allowed = vocabulary_for(tokenizer, ["Consulta el SEL para tu constancia."])
    prepare_for_decoding(tiny_gemma, allowed)
    assert isinstance(tiny_gemma.backbone.token_embedding, SubsetOutput)
    prompt = chat_prompt(tokenizer, [], "¿Dónde pido mi constancia?")
    got = Generator(tiny_gemma, DecodingConfig(max_new_tokens=24)).generate(prompt)
    assert got.token_ids and set(got.token_ids) <= set(allowed.tolist())
