"""Tests of ``gemma_cse.data``: the real knowledge base against the shared topic list, the
validator on planted defects (exact file, line and reason), the splits, and the per-family
encoding with loss weights on real (tiny) KerasHub tokenizers."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from gemma_cse.data import (
    MAX_ANSWER_CHARS,
    MAX_QUESTION_CHARS,
    TOPICS_FILE,
    DataError,
    chat_family,
    encode_example,
    known_topics,
    load_blind_test,
    load_entries,
    load_out_of_scope,
    make_splits,
    normalize,
    pack,
)

REPO = Path(__file__).resolve().parents[1]
SHARED_TOPICS = Path(__file__).resolve().parents[2] / "shared" / "cse_topics.md"
EXPECTED_STATUS = {  # out-of-scope kind → what the guard must answer
    "general_knowledge": "out_of_scope",
    "other_institution": "out_of_scope",
    "near_miss": "out_of_scope",
    "harmful": "refused",
    "self_harm": "self_harm",
    "prompt_injection": "refused",
    "chitchat": "chitchat",
}


# ---------------------------------------------------------------- the real knowledge base


@pytest.fixture(scope="module")
def entries():
    return load_entries()


@pytest.fixture(scope="module")
def shared_topics() -> dict[str, list[str]]:
    """Section title → topic ids, parsed from the shared ``cse_topics.md``."""
    if not SHARED_TOPICS.is_file():
        pytest.skip(f"{SHARED_TOPICS} is absent (the shared/ folder beside the repo root)")
    text = SHARED_TOPICS.read_text(encoding="utf-8")
    sections: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
        if line.startswith("## "):
            current = line[3:].strip()
            sections[current] = []
        elif (match := re.match(r"- `([a-z0-9_]+)` — ", line)) and current:
            sections[current].append(match[1])
    declared = re.search(r"Hay (\d+) temas en (\d+) categorías", text)
    assert declared, "cse_topics.md no longer states how many topics it has"
    ids = [t for topics in sections.values() for t in topics]
    assert len(ids) == len(set(ids)) == int(declared[1]), "topic list parsed wrongly"
    assert len(sections) == int(declared[2])
    return sections


def test_every_shared_topic_has_entries_and_five_questions(entries, shared_topics):
    questions = Counter()
    for entry in entries:
        questions[entry.topic] += len(entry.questions)
    ids = [t for topics in shared_topics.values() for t in topics]
    assert [t for t in ids if questions[t] == 0] == [], "topics without entries"
    assert [t for t in ids if questions[t] < 5] == [], "topics with fewer than 5 questions"
    assert set(questions) <= set(ids), "entries on topics that are not in cse_topics.md"
    assert sum(questions.values()) >= 617


def test_topics_file_matches_shared_topics(shared_topics):
    rows = [json.loads(line) for line in TOPICS_FILE.read_text(encoding="utf-8").splitlines()]
    ids = [row["topic"] for row in rows]
    assert len(ids) == len(set(ids))
    assert set(ids) == {t for topics in shared_topics.values() for t in topics}
    # one category per section of the shared file, a different one for each section
    categories = {
        title: {row["category"] for row in rows if row["topic"] in topics}
        for title, topics in shared_topics.items()
    }
    assert all(len(c) == 1 for c in categories.values()), categories
    assert len({c.pop() for c in categories.values()}) == len(shared_topics)


def test_entries_are_consistent_with_topics(entries):
    topics = known_topics()
    assert all(e.category == topics[e.topic] for e in entries)
    assert all(e.answer and e.source for e in entries)
    assert all(len(e.variants) >= 5 for e in entries)
    ids = [e.id for e in entries]
    assert len(ids) == len(set(ids))
    questions = [normalize(q) for e in entries for q in e.questions]
    assert len(questions) == len(set(questions)), "a question is asked twice in the KB"


def test_out_of_scope_set(entries):
    items = load_out_of_scope()
    assert len(items) >= 150
    assert {i.kind for i in items} == set(EXPECTED_STATUS)
    wrong = [(i.id, i.kind, i.expected) for i in items if EXPECTED_STATUS[i.kind] != i.expected]
    assert wrong == []
    assert len({i.id for i in items}) == len(items)
    assert len({normalize(i.text) for i in items}) == len(items)
    kb_questions = {normalize(q) for e in entries for q in e.questions}
    assert [i.text for i in items if normalize(i.text) in kb_questions] == []


# ---------------------------------------------------------------- planted defects


@pytest.fixture(scope="module")
def topic() -> str:
    return sorted(known_topics())[0]


def write(path: Path, content: str | bytes) -> Path:
    path.write_bytes(content.encode("utf-8") if isinstance(content, str) else content)
    return path


def jsonl(*rows: dict) -> str:
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def problems(path: Path, **kwargs) -> list[tuple[str, int, str]]:
    with pytest.raises(DataError) as info:
        load_entries(path, **kwargs)
    return [(p.file, p.line, p.reason) for p in info.value.problems]


def test_missing_column(tmp_path):
    path = write(tmp_path / "kb.csv", "question,variants\n¿Dónde pago?,donde pago\n")
    assert problems(path) == [(str(path), 1, "missing column(s): answer")]
    path = write(
        tmp_path / "kb.jsonl", jsonl({"question": "¿Q?", "answer": "A."}, {"question": "¿R?"})
    )
    assert problems(path) == [(str(path), 2, "missing column: answer")]


def test_empty_cell(tmp_path):
    path = write(
        tmp_path / "kb.csv",
        "question,answer\n¿Dónde pago?,En la Caja General.\n¿Y la constancia?,   \n",
    )
    assert problems(path) == [(str(path), 3, "empty cell: answer")]


def test_unknown_topic(tmp_path, topic):
    path = write(
        tmp_path / "kb.jsonl",
        jsonl(
            {"id": "a", "topic": topic, "question": "¿Q?", "answer": "A."},
            {"id": "b", "topic": "no_such_topic", "question": "¿R?", "answer": "B."},
        ),
    )
    assert problems(path) == [(str(path), 2, "unknown topic 'no_such_topic'")]


def test_duplicate_id(tmp_path, topic):
    rows = [
        {"id": i, "topic": topic, "question": f"¿Pregunta {n}?", "answer": f"Respuesta {n}."}
        for n, i in enumerate(["x", "y", "x"])
    ]
    path = write(tmp_path / "kb.jsonl", jsonl(*rows))
    assert problems(path) == [(str(path), 3, "duplicate id 'x' (first at kb.jsonl:1)")]


def test_same_question_with_different_answers(tmp_path, topic):
    path = write(
        tmp_path / "kb.jsonl",
        jsonl(
            {
                "id": "a",
                "topic": topic,
                "question": "¿Cómo pago la cuota?",
                "answer": "En la Caja.",
            },
            {
                "id": "b",
                "topic": topic,
                "question": "¿Qué horario hay?",
                "answer": "De 9 a 3.",
                "variants": ["otra forma", "COMO PAGO LA CUOTA"],
            },
            {"id": "c", "topic": topic, "question": "como pago la cuota", "answer": "en la caja"},
        ),
    )
    # the same question with the same answer (up to case and punctuation) is no conflict
    assert problems(path) == [
        (str(path), 2, "question 'COMO PAGO LA CUOTA' has a different answer at kb.jsonl:1")
    ]


def test_same_question_with_different_answers_in_bare_csv(tmp_path):
    path = write(
        tmp_path / "kb.csv",
        "question,answer\n¿Cuándo es la reinscripción?,Consulta el calendario.\n"
        "cuando es la REINSCRIPCION,Cuando diga el SEL.\n",
    )
    assert problems(path) == [
        (
            str(path),
            3,
            "question 'cuando es la REINSCRIPCION' has a different answer at kb.csv:2",
        )
    ]


def test_invalid_encoding(tmp_path):
    content = (
        b"question,answer\n\xc2\xbfD\xc3\xb3nde pago?,En la Caja General.\n"
        + "¿Qué trámite hago?,Pídelo en el SEL.\n".encode("latin-1")
        + b"otra pregunta,otra respuesta\n"
    )
    path = write(tmp_path / "kb.csv", content)
    found = problems(path)
    assert [(f, line) for f, line, _ in found] == [(str(path), 3)]
    assert found[0][2].startswith("invalid UTF-8 encoding")
    kept = load_entries(path, skip_bad_rows=True, report=lambda message: None)
    assert [e.question for e in kept] == ["¿Dónde pago?", "otra pregunta"]


def test_over_long_text(tmp_path, topic):
    fits = {
        "id": "a",
        "topic": topic,
        "question": "q" * MAX_QUESTION_CHARS,
        "answer": "a" * MAX_ANSWER_CHARS,
    }
    long_answer = {
        "id": "b",
        "topic": topic,
        "question": "¿B?",
        "answer": "b" * (MAX_ANSWER_CHARS + 1),
    }
    long_variant = {
        "id": "c",
        "topic": topic,
        "question": "¿C?",
        "answer": "C.",
        "variants": ["¿otra?", "c" * (MAX_QUESTION_CHARS + 1)],
    }
    path = write(tmp_path / "kb.jsonl", jsonl(fits, long_answer, long_variant))
    a, q = MAX_ANSWER_CHARS, MAX_QUESTION_CHARS
    assert problems(path) == [
        (str(path), 2, f"answer too long ({a + 1} > {a} characters)"),
        (str(path), 3, f"question too long ({q + 1} > {q} characters)"),
    ]


def test_csv_with_semicolons_and_variants(tmp_path, topic):
    path = write(
        tmp_path / "kb.csv",
        f"id;topic;question;answer;variants\n"
        f"pago;{topic};¿Dónde pago?;En la Caja General, con tu referencia.;donde pago | "
        f"¿dónde se paga? |  oye y donde pago\n",
    )
    [entry] = load_entries(path)
    assert (entry.id, entry.topic, entry.category) == ("pago", topic, known_topics()[topic])
    assert entry.answer == "En la Caja General, con tu referencia."
    assert entry.variants == ("donde pago", "¿dónde se paga?", "oye y donde pago")
    write(path, path.read_text(encoding="utf-8") + f"x;{topic};¿X?;\n")
    assert problems(path) == [(str(path), 3, "4 cells, header has 5")]


def test_csv_with_bom_and_crlf(tmp_path):
    content = "\ufeffquestion,answer\r\n¿Dónde pago?,En la Caja.\r\n¿Y luego?,\r\n"
    path = write(tmp_path / "kb.csv", content.encode("utf-8"))
    assert problems(path) == [(str(path), 3, "empty cell: answer")]
    write(path, content.replace("¿Y luego?,", "¿Y luego?,Nada.").encode("utf-8"))
    assert [e.question for e in load_entries(path)] == ["¿Dónde pago?", "¿Y luego?"]


def test_bare_question_answer_csv_merges_rows_with_one_answer(tmp_path):
    path = write(
        tmp_path / "faq.csv",
        "question,answer\n"
        "¿Cómo saco una constancia?,Solicítala en el SEL.\n"
        "¿Dónde pago?,En la Caja General.\n"
        "como saco constancia,Solicítala en el SEL.\n"
        "necesito una constancia,solicítala en el SEL\n",
    )
    constancia, pago = load_entries(path)
    assert constancia.id == "faq:2" and constancia.answer == "Solicítala en el SEL."
    assert constancia.questions == (
        "¿Cómo saco una constancia?",
        "como saco constancia",
        "necesito una constancia",
    )
    assert (pago.id, pago.questions, pago.topic) == ("faq:3", ("¿Dónde pago?",), "")


def test_multiline_csv_cells_keep_line_numbers(tmp_path):
    path = write(
        tmp_path / "kb.csv",
        "question,answer\n"
        '"¿Cómo pido\nmi constancia?","Entra al SEL.\n\nDescárgala ahí."\n'  # lines 2-5
        "¿Dónde pago?,\n"  # line 6
        "\n"
        '¿Y el horario?,"En el SEL,\nsección Horario."\n'  # lines 8-9
        "¿Y la credencial?,\n",  # line 10
    )
    assert problems(path) == [
        (str(path), 6, "empty cell: answer"),
        (str(path), 10, "empty cell: answer"),
    ]
    kept = load_entries(path, skip_bad_rows=True, report=lambda message: None)
    assert [e.id for e in kept] == ["kb:2", "kb:8"]
    assert kept[0].answer == "Entra al SEL.\n\nDescárgala ahí."


def test_jsonl(tmp_path, topic):
    row = {
        "id": "a",
        "topic": topic,
        "question": "¿Dónde pago?",
        "answer": "En la Caja.",
        "source": "Caja General",
        "variants": ["donde pago", " ", "¿y dónde se paga?"],
        "paraphrases": ["oye y la caja donde queda", " "],
    }
    path = write(tmp_path / "kb.jsonl", jsonl(row) + "\n" + '{"id": "b",\n' + "[1, 2]\n")
    assert problems(path) == [
        (str(path), 3, "not valid JSON (Expecting property name enclosed in double quotes)"),
        (str(path), 4, "not a JSON object"),
    ]
    write(path, jsonl(row))
    [entry] = load_entries(path)
    assert entry.source == "Caja General" and entry.category == known_topics()[topic]
    assert entry.questions == ("¿Dónde pago?", "donde pago", "¿y dónde se paga?")
    assert entry.paraphrases == ("oye y la caja donde queda",)
    assert entry.indexed_questions == (*entry.questions, "oye y la caja donde queda")


def test_paraphrases_stay_out_of_the_splits():
    from gemma_cse.data import Entry

    variants = ("donde pago", "¿y dónde se paga?", "¿en qué lugar pago?")
    entry = Entry("a", "¿Dónde pago?", "En la Caja.", variants=variants, paraphrases=("oye",))
    splits = make_splits([entry])
    used = {ex.question for ex in splits.train + splits.validation + splits.test}
    assert used == set(entry.questions)


def test_bad_paraphrases(tmp_path, topic):
    base = {"topic": topic, "answer": "En la Caja.", "variants": ["donde pago"]}
    path = write(
        tmp_path / "kb.jsonl",
        jsonl(
            base | {"id": "a", "question": "¿Dónde pago?", "paraphrases": ["¡Donde PAGO!"]},
            base | {"id": "b", "question": "¿Cuándo?", "paraphrases": "no es una lista"},
            {
                "id": "c",
                "topic": topic,
                "question": "¿Qué?",
                "answer": "Otra.",
                "paraphrases": ["oye donde pago"],
            },
            base | {"id": "d", "question": "¿Y?", "paraphrases": ["oye donde pago"]},
        ),
    )
    assert problems(path) == [
        (str(path), 1, "paraphrase repeats one of the entry's questions: '¡Donde PAGO!'"),
        (str(path), 2, "paraphrases must be a list of strings"),
        (str(path), 4, "question 'oye donde pago' has a different answer at kb.jsonl:3"),
    ]


def test_every_entry_has_paraphrases_unlike_its_questions(entries):
    splits = make_splits(entries)
    held = {normalize(ex.question) for ex in splits.test + splits.validation}
    for entry in entries:
        assert len(entry.paraphrases) >= 10, entry.id
        assert held.isdisjoint(normalize(p) for p in entry.paraphrases), entry.id


def test_blind_test_asks_every_entry_four_times_in_new_words(entries):
    blind = load_blind_test(entries)  # the loader refuses a question the KB holds
    assert Counter(ex.entry.id for ex in blind) == {e.id: 4 for e in entries}
    splits = make_splits(entries)
    held = {normalize(ex.question) for ex in splits.test + splits.validation}
    assert held.isdisjoint(normalize(ex.question) for ex in blind)


def test_blind_test_bad_rows(tmp_path, entries):
    kb_question = entries[0].paraphrases[0]
    path = write(
        tmp_path / "blind.jsonl",
        jsonl(
            {"id": entries[0].id, "question": "oye y esto como va"},
            {"id": "no_such_entry", "question": "otra pregunta"},
            {"id": entries[1].id, "question": "  "},
            {"id": entries[1].id, "question": kb_question.upper()},
            {"id": entries[2].id, "question": "¡Oye, y esto cómo va!"},
        )
        + "[1]\n",
    )
    with pytest.raises(DataError) as err:
        load_blind_test(entries, path)
    assert [(p.line, p.reason) for p in err.value.problems] == [
        (2, "no knowledge-base entry has id 'no_such_entry'"),
        (3, "missing or empty: question"),
        (4, f"repeats a question of knowledge-base entry {entries[0].id!r}"),
        (5, "repeats the question at line 1"),
        (6, "not a JSON object"),
    ]
    assert all(p.file == str(path) for p in err.value.problems)


def defective_folder(folder: Path, topic: str) -> list[tuple[str, int, str]]:
    """A folder with good rows and defective rows in two files; → the expected problems."""
    folder.mkdir()
    csv_file = write(
        folder / "a.csv",
        "topic,question,answer\n"
        f"{topic},¿Dónde pago?,En la Caja General.\n"
        f"{topic},¿Y la constancia?,\n"
        f"otro_tema,¿Y el horario?,En el SEL.\n"
        f"{topic},¿Qué hago?,Acude a la CSE.\n",
    )
    jsonl_file = write(
        folder / "b.jsonl",
        jsonl(
            {"id": "j1", "topic": topic, "question": "¿Cuándo?", "answer": "Ya."},
            {"id": "j1", "topic": topic, "question": "¿Quién?", "answer": "Tú."},
            {"id": "j3", "topic": topic, "question": "", "answer": ""},
            {"id": "j4", "topic": topic, "question": "donde pago", "answer": "En el banco."},
            {"id": "j5", "topic": topic, "question": "¿Cómo?", "answer": "Así."},
        ),
    )
    return [
        (str(csv_file), 3, "empty cell: answer"),
        (str(csv_file), 4, "unknown topic 'otro_tema'"),
        (str(jsonl_file), 2, "duplicate id 'j1' (first at b.jsonl:1)"),
        (str(jsonl_file), 3, "empty cell: question"),
        (str(jsonl_file), 3, "empty cell: answer"),
        (str(jsonl_file), 4, "question 'donde pago' has a different answer at a.csv:2"),
    ]


def test_all_problems_are_reported_at_once(tmp_path, topic):
    expected = defective_folder(tmp_path / "kb", topic)
    assert sorted(problems(tmp_path / "kb")) == sorted(expected)


def test_skip_bad_rows_keeps_good_rows_and_counts_skipped(tmp_path, topic):
    defective_folder(tmp_path / "kb", topic)
    messages: list[str] = []
    kept = load_entries(tmp_path / "kb", skip_bad_rows=True, report=messages.append)
    assert [e.question for e in kept] == ["¿Dónde pago?", "¿Qué hago?", "¿Cuándo?", "¿Cómo?"]
    [message] = messages
    assert message.startswith("skipped 5 bad row(s), kept 4 entries"), message


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "GEMMA_CSE_DEBUG"}
    return subprocess.run(
        [sys.executable, "-m", "gemma_cse.data", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=120,
    )


def test_cli_validate_reports_problems_without_traceback(tmp_path):
    path = write(
        tmp_path / "my.csv",
        "question,answer\n¿Dónde pago?,En la Caja.\n¿Y la constancia?,\n¿Y la credencial?,\n",
    )
    result = run_cli("validate", str(path))
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith("error: ")
    assert f"{path}:3: empty cell: answer" in result.stderr
    assert f"{path}:4: empty cell: answer" in result.stderr
    assert "ok:" not in result.stdout

    result = run_cli("validate", str(path), "--skip-bad-rows")
    assert result.returncode == 0, result.stderr
    assert "skipped 2 bad row(s)" in result.stderr
    assert result.stdout.startswith("ok: 1 entries, 1 questions")


def test_cli_validate_missing_file_is_one_error_line(tmp_path):
    result = run_cli("validate", str(tmp_path / "nothing.csv"))
    assert result.returncode == 2
    assert result.stderr == f"error: {tmp_path / 'nothing.csv'}: no such file or folder\n"


def test_cli_validate_real_kb(entries):
    result = run_cli("validate")
    assert result.returncode == 0, result.stderr
    questions = sum(len(e.questions) for e in entries)
    assert result.stdout.startswith(f"ok: {len(entries)} entries, {questions} questions")


# ---------------------------------------------------------------- splits


def test_splits_are_deterministic(entries):
    first, second = make_splits(entries), make_splits(list(entries))
    assert first == second
    assert make_splits(entries, seed=14) != first


def test_splits_hold_out_one_unseen_variant_per_entry(entries):
    splits = make_splits(entries)
    train = Counter(normalize(ex.question) for ex in splits.train)
    for held in (splits.test, splits.validation):
        assert sorted(ex.entry.id for ex in held) == sorted(e.id for e in entries)
        assert all(ex.question in ex.entry.variants for ex in held)
        assert [ex.question for ex in held if normalize(ex.question) in train] == []
    assert {ex.question for ex in splits.test}.isdisjoint(ex.question for ex in splits.validation)
    # every question is used exactly once; canonical questions always train
    used = [(ex.entry.id, ex.question) for ex in splits.train + splits.validation + splits.test]
    assert sorted(used) == sorted((e.id, q) for e in entries for q in e.questions)
    assert {e.question for e in entries} <= {ex.question for ex in splits.train}


def test_splits_heldout_topics(entries):
    splits = make_splits(entries)
    topics = {e.topic for e in entries}
    assert set(splits.heldout_topics) <= topics
    assert len(set(splits.heldout_topics)) == len(splits.heldout_topics)
    assert abs(len(splits.heldout_topics) - 0.1 * len(topics)) <= 1
    kept = splits.without_heldout(entries)
    assert {e.topic for e in kept} == topics - set(splits.heldout_topics)
    assert len(kept) < len(entries)


def test_splits_of_entries_with_few_variants():
    from gemma_cse.data import Entry

    few = [Entry(f"e{n}", f"¿Pregunta {n}?", "R.", variants=("a", "b")[:n]) for n in range(3)]
    splits = make_splits(few)
    assert splits.test == splits.validation == [] and splits.heldout_topics == []
    assert len(splits.train) == sum(len(e.questions) for e in few)


# ---------------------------------------------------------------- encoding

TERMINATORS = {"gemma": "<end_of_turn>", "gpt2": "<|endoftext|>", "llama": "</s>"}
FAMILIES = {"gemma3": "gemma", "gpt2": "gpt2", "llama": "llama"}  # tiny preset → chat format
QUESTION = "¿Dónde consulto mi constancia?"
ANSWER = "Descárgala en el SEL, en el apartado Constancias."


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def tokenizer(request, tiny_presets):
    import keras_hub

    if request.param not in tiny_presets:
        pytest.skip(f"no tiny {request.param} preset")
    tokenizer = keras_hub.tokenizers.Tokenizer.from_preset(str(tiny_presets[request.param]))
    assert chat_family(tokenizer) == FAMILIES[request.param]
    return tokenizer


def detokenize(tokenizer, ids) -> str:
    text = tokenizer.detokenize(np.asarray(ids, dtype="int32"))
    return text.numpy().decode("utf-8") if hasattr(text, "numpy") else str(text)


def test_encode_weights_only_answer_and_terminator(tokenizer):
    family = chat_family(tokenizer)
    ids, weights = encode_example(tokenizer, QUESTION, ANSWER)
    assert len(ids) == len(weights)
    prompt_length = weights.index(1)
    assert set(weights[:prompt_length]) == {0} and set(weights[prompt_length:]) == {1}
    assert ids[-1] == tokenizer.token_to_id(TERMINATORS[family])
    # exactly the answer (GPT-2's byte-level BPE keeps the space after "Respuesta:")
    answer = detokenize(tokenizer, ids[prompt_length:-1])
    assert answer == (" " + ANSWER if family == "gpt2" else ANSWER)
    prompt = detokenize(tokenizer, ids[:prompt_length])
    assert QUESTION in prompt and "Desc" not in prompt
    assert "  " not in detokenize(tokenizer, ids), "prompt and answer join with one space"
    if family == "gemma":
        assert prompt.startswith("<start_of_turn>user\n")
        assert prompt.endswith("<end_of_turn>\n<start_of_turn>model\n")
    if tokenizer.start_token_id is not None:
        assert ids[0] == tokenizer.start_token_id


def test_pack_shifts_labels_and_weights_and_pads(tokenizer):
    encoded = [encode_example(tokenizer, QUESTION, ANSWER), encode_example(tokenizer, "¿Y?", "Sí.")]
    length = max(len(ids) for ids, _ in encoded) + 3
    x, y, weights = pack(encoded, length, pad_id=0)
    assert x["token_ids"].shape == y.shape == weights.shape == (2, length)
    for row, (ids, loss) in enumerate(encoded):
        n = len(ids)
        assert x["token_ids"][row, :n].tolist() == ids
        assert y[row, : n - 1].tolist() == ids[1:]
        assert weights[row, : n - 1].tolist() == loss[1:]
        assert x["padding_mask"][row].tolist() == [True] * n + [False] * (length - n)
        assert not x["token_ids"][row, n:].any() and not y[row, n - 1 :].any()
        assert not weights[row, n - 1 :].any()
    # the loss covers exactly the answer and the terminator, each predicted from the token before
    assert weights[0].sum() == sum(encoded[0][1])
    assert y[0][weights[0] == 1].tolist() == [i for i, w in zip(*encoded[0], strict=True) if w]


def test_pack_truncates_at_sequence_length(tokenizer):
    ids, loss = encode_example(tokenizer, QUESTION, ANSWER)
    length = len(ids) - 4
    x, y, weights = pack([(ids, loss)], length)
    assert x["token_ids"].shape == (1, length)
    assert x["token_ids"][0].tolist() == ids[:length]
    assert y[0].tolist() == ids[1 : length + 1]
    assert weights[0].tolist() == loss[1 : length + 1]
    assert x["padding_mask"].all()
    # shorter than the prompt: nothing of the answer is left, so there is no loss at all
    assert not pack([(ids, loss)], 3)[2].any()
