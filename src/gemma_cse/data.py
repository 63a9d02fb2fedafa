"""The knowledge base: load (CSV or JSONL), validate with file:line:reason, split, and encode
training examples per model family with loss only on the answer and its terminator.

Run ``python -m gemma_cse.data validate|stats PATH`` to check a file or folder.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import random
import re
import sys
import unicodedata
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from gemma_cse.cli import UserError, run

DATA_DIR = Path(__file__).resolve().parents[2] / "data" / "cse"
KB_DIR = DATA_DIR / "kb"
TOPICS_FILE = DATA_DIR / "topics.jsonl"
OUT_OF_SCOPE_FILE = DATA_DIR / "out_of_scope.jsonl"
BLIND_TEST_FILE = DATA_DIR / "blind_test.jsonl"
BLIND_OUT_OF_SCOPE_FILE = DATA_DIR / "blind_out_of_scope.jsonl"
MAX_QUESTION_CHARS = 600
MAX_ANSWER_CHARS = 1500
VARIANT_SEPARATOR = " | "  # how a CSV cell lists several question variants


@dataclass(frozen=True)
class Entry:
    """One answer of the knowledge base and every question it answers."""

    id: str
    question: str
    answer: str
    topic: str = ""
    category: str = ""
    source: str = ""
    variants: tuple[str, ...] = ()
    # more ways to ask, for the retrieval index only: never split into validation/test (so the
    # held-out questions stay the same) and not used to fine-tune (so epochs stay short)
    paraphrases: tuple[str, ...] = ()

    @property
    def questions(self) -> tuple[str, ...]:
        return (self.question, *self.variants)

    @property
    def indexed_questions(self) -> tuple[str, ...]:
        """Every question the retrieval index holds for this entry."""
        return (*self.questions, *self.paraphrases)


@dataclass(frozen=True)
class Example:
    """A question paired with the entry that answers it."""

    question: str
    entry: Entry


@dataclass(frozen=True)
class Problem:
    file: str
    line: int
    reason: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.reason}"


class DataError(UserError):
    """Every problem found in the input at once."""

    def __init__(self, problems: list[Problem]):
        self.problems = problems
        lines = "\n".join(f"  {p}" for p in problems)
        super().__init__(f"{len(problems)} bad row(s); fix them:\n{lines}")


def known_topics() -> dict[str, str]:
    """Topic id → category, from ``data/cse/topics.jsonl``."""
    rows = (json.loads(line) for line in TOPICS_FILE.read_text(encoding="utf-8").splitlines())
    return {row["topic"]: row["category"] for row in rows}


def normalize(text: str) -> str:
    """Case-, accent- and punctuation-insensitive form used to spot repeated questions."""
    text = unicodedata.normalize("NFKD", text.casefold())
    text = "".join(c for c in text if not unicodedata.combining(c))
    return " ".join(re.findall(r"\w+", text))


# ---------------------------------------------------------------- reading rows


def _decoded_lines(path: Path, problems: list[Problem]) -> list[str]:
    """The file's lines as text; lines that are not UTF-8 are reported and blanked."""
    raw = path.read_bytes().removeprefix(b"\xef\xbb\xbf")
    lines = []
    for number, chunk in enumerate(raw.splitlines(keepends=True), start=1):
        try:
            lines.append(chunk.decode("utf-8"))
        except UnicodeDecodeError as err:
            problems.append(Problem(str(path), number, f"invalid UTF-8 encoding ({err.reason})"))
            lines.append("\n")
    return lines


def _jsonl_rows(
    path: Path, lines: list[str], problems: list[Problem]
) -> Iterator[tuple[int, dict]]:
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            problems.append(Problem(str(path), number, f"not valid JSON ({err.msg})"))
            continue
        if not isinstance(row, dict):
            problems.append(Problem(str(path), number, "not a JSON object"))
            continue
        yield number, row


def _csv_rows(path: Path, lines: list[str], problems: list[Problem]) -> Iterator[tuple[int, dict]]:
    text = "".join(lines)
    header = lines[0] if lines else ""
    delimiter = ";" if header.count(";") > header.count(",") else ","
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    columns = [c.strip().lower() for c in next(reader, [])]
    missing = [c for c in ("question", "answer") if c not in columns]
    if missing:
        problems.append(Problem(str(path), 1, f"missing column(s): {', '.join(missing)}"))
        return
    start = reader.line_num + 1
    for cells in reader:
        line, start = start, reader.line_num + 1
        if not any(cell.strip() for cell in cells):
            continue
        if len(cells) != len(columns):
            problems.append(
                Problem(str(path), line, f"{len(cells)} cells, header has {len(columns)}")
            )
            continue
        row = dict(zip(columns, cells, strict=True))
        for name in ("variants", "paraphrases"):
            if row.get(name):
                row[name] = [v.strip() for v in row[name].split(VARIANT_SEPARATOR.strip())]
        yield line, row


def read_rows(path: Path, problems: list[Problem]) -> Iterator[tuple[int, dict]]:
    """(line number, row dict) for each record of a ``.csv`` or ``.jsonl`` file."""
    lines = _decoded_lines(path, problems)
    if path.suffix.lower() == ".csv":
        yield from _csv_rows(path, lines, problems)
    elif path.suffix.lower() in (".jsonl", ".json"):
        yield from _jsonl_rows(path, lines, problems)
    else:
        raise UserError(f"{path}: unsupported file type (use .csv or .jsonl)")


def data_files(path: str | Path) -> list[Path]:
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in (".csv", ".jsonl"))
        if not files:
            raise UserError(f"{path}: no .csv or .jsonl files")
        return files
    if not path.is_file():
        raise UserError(f"{path}: no such file or folder")
    return [path]


# ---------------------------------------------------------------- validation


def _entry_from_row(
    row: dict, where: Problem, topics: dict[str, str]
) -> tuple[Entry | None, list[str]]:
    reasons = []
    question = str(row.get("question") or "").strip()
    answer = str(row.get("answer") or "").strip()
    for name, value in (("question", question), ("answer", answer)):
        if name not in row:
            reasons.append(f"missing column: {name}")
        elif not value:
            reasons.append(f"empty cell: {name}")
    variants = _question_list(row, "variants", reasons)
    paraphrases = _question_list(row, "paraphrases", reasons)
    asked = {normalize(q) for q in (question, *variants)}
    for text in paraphrases:
        if normalize(text) in asked:
            reasons.append(f"paraphrase repeats one of the entry's questions: {text!r}")
    topic = str(row.get("topic") or "").strip()
    category = str(row.get("category") or "").strip()
    if "topic" in row and not topic:
        reasons.append("empty cell: topic")
    elif topic and topic not in topics:
        reasons.append(f"unknown topic {topic!r}")
    elif topic:
        category = category or topics[topic]
    if "id" in row and not str(row["id"]).strip():
        reasons.append("empty cell: id")
    if len(answer) > MAX_ANSWER_CHARS:
        reasons.append(f"answer too long ({len(answer)} > {MAX_ANSWER_CHARS} characters)")
    for text in (question, *variants, *paraphrases):
        if len(text) > MAX_QUESTION_CHARS:
            reasons.append(f"question too long ({len(text)} > {MAX_QUESTION_CHARS} characters)")
    if reasons:
        return None, reasons
    entry_id = str(row.get("id") or f"{Path(where.file).stem}:{where.line}").strip()
    source = str(row.get("source") or "")
    entry = Entry(entry_id, question, answer, topic, category, source, variants, paraphrases)
    return entry, []


def _question_list(row: dict, name: str, reasons: list[str]) -> tuple[str, ...]:
    """The stripped, non-empty strings of list column ``name`` (a reason added if malformed)."""
    values = row.get(name) or []
    if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
        reasons.append(f"{name} must be a list of strings")
        return ()
    return tuple(v.strip() for v in values if v.strip())


def _merge_bare_rows(entries: list[tuple[Problem, Entry]]) -> list[tuple[Problem, Entry]]:
    """Bare ``question,answer`` rows sharing one answer become one entry with variants."""
    merged: dict[str, tuple[Problem, Entry]] = {}
    for where, entry in entries:
        key = normalize(entry.answer) if not entry.topic else entry.id
        if key in merged and not entry.topic:
            first_where, first = merged[key]
            variants = (*first.variants, entry.question)
            merged[key] = (first_where, Entry(**{**first.__dict__, "variants": variants}))
        else:
            merged[key] = (where, entry)
    return list(merged.values())


def load_entries(
    path: str | Path = KB_DIR, *, skip_bad_rows: bool = False, report=print
) -> list[Entry]:
    """Load and validate every entry under ``path``; raise ``DataError`` listing all problems."""
    topics = known_topics()
    problems: list[Problem] = []
    bad: set[tuple[str, int]] = set()
    parsed: list[tuple[Problem, Entry]] = []
    for file in data_files(path):
        bare: list[tuple[Problem, Entry]] = []
        for line, row in read_rows(file, problems):
            where = Problem(str(file), line, "")
            entry, reasons = _entry_from_row(row, where, topics)
            problems += [Problem(str(file), line, r) for r in reasons]
            if entry is not None:
                (parsed if entry.topic or "id" in row else bare).append((where, entry))
        parsed += _merge_bare_rows(bare)

    seen_ids: dict[str, Problem] = {}
    seen_questions: dict[str, tuple[Problem, Entry]] = {}
    for where, entry in parsed:
        if entry.id in seen_ids:
            first = seen_ids[entry.id]
            problems.append(
                Problem(
                    where.file,
                    where.line,
                    f"duplicate id {entry.id!r} (first at {Path(first.file).name}:{first.line})",
                )
            )
            bad.add((where.file, where.line))
        seen_ids.setdefault(entry.id, where)
        for question in entry.indexed_questions:
            key = normalize(question)
            if key in seen_questions and seen_questions[key][1].id != entry.id:
                first_where, first = seen_questions[key]
                if normalize(first.answer) != normalize(entry.answer):
                    problems.append(
                        Problem(
                            where.file,
                            where.line,
                            f"question {question!r} has a different answer at "
                            f"{Path(first_where.file).name}:{first_where.line}",
                        )
                    )
                    bad.add((where.file, where.line))
            seen_questions.setdefault(key, (where, entry))

    if problems and not skip_bad_rows:
        raise DataError(problems)
    bad |= {(p.file, p.line) for p in problems}
    entries = [e for where, e in parsed if (where.file, where.line) not in bad]
    if problems:
        report(f"skipped {len(bad)} bad row(s), kept {len(entries)} entries in {path}")
    return entries


@dataclass(frozen=True)
class OutOfScope:
    id: str
    text: str
    kind: str
    expected: str


def load_out_of_scope(path: str | Path = OUT_OF_SCOPE_FILE) -> list[OutOfScope]:
    problems: list[Problem] = []
    rows = list(read_rows(Path(path), problems))
    items = []
    for line, row in rows:
        missing = [k for k in ("id", "text", "kind", "expected") if not str(row.get(k, "")).strip()]
        if missing:
            problems.append(Problem(str(path), line, f"missing or empty: {', '.join(missing)}"))
            continue
        items.append(OutOfScope(row["id"], row["text"], row["kind"], row["expected"]))
    if problems:
        raise DataError(problems)
    return items


def load_blind_test(entries: list[Entry], path: str | Path = BLIND_TEST_FILE) -> list[Example]:
    """Held-out questions written blind (by writers who saw only each entry's canonical
    question and answer), each row ``id`` (its entry) and ``question``: a second test set,
    never indexed nor trained on, that ``evaluate`` asks beside the test split."""
    by_id = {e.id: e for e in entries}
    kb_questions = {normalize(q): e.id for e in entries for q in e.indexed_questions}
    problems: list[Problem] = []
    seen: dict[str, int] = {}
    examples = []
    for line, row in read_rows(Path(path), problems):
        entry_id = str(row.get("id") or "").strip()
        question = str(row.get("question") or "").strip()
        key = normalize(question)
        reasons = [
            f"missing or empty: {name}"
            for name, value in (("id", entry_id), ("question", question))
            if not value
        ]
        if entry_id and entry_id not in by_id:
            reasons.append(f"no knowledge-base entry has id {entry_id!r}")
        if len(question) > MAX_QUESTION_CHARS:
            reasons.append(f"question too long ({len(question)} > {MAX_QUESTION_CHARS} characters)")
        if question and key in kb_questions:
            reasons.append(f"repeats a question of knowledge-base entry {kb_questions[key]!r}")
        if question and key in seen:
            reasons.append(f"repeats the question at line {seen[key]}")
        seen.setdefault(key, line)
        problems += [Problem(str(path), line, r) for r in reasons]
        if not reasons:
            examples.append(Example(question, by_id[entry_id]))
    if problems:
        raise DataError(problems)
    return examples


# ---------------------------------------------------------------- splits


def _rng(seed: int, key: str) -> random.Random:
    return random.Random(int(hashlib.sha256(f"{seed}:{key}".encode()).hexdigest()[:16], 16))


@dataclass
class Splits:
    """Deterministic splits (same seed, same data → same splits).

    Every entry keeps its canonical question in ``train``; of its variants one goes to
    ``test`` and one to ``validation`` (when it has at least three), the rest to ``train``.
    ``heldout_topics`` lists whole topics whose entries the guard never sees, to calibrate
    refusals on near-misses: use ``without_heldout`` to drop them from an index.
    """

    train: list[Example] = field(default_factory=list)
    validation: list[Example] = field(default_factory=list)
    test: list[Example] = field(default_factory=list)
    heldout_topics: list[str] = field(default_factory=list)

    def without_heldout(self, entries: list[Entry]) -> list[Entry]:
        """``entries`` minus those of the held-out topics."""
        heldout = set(self.heldout_topics)
        return [e for e in entries if e.topic not in heldout]

    def counts(self) -> dict[str, int]:
        return {
            "train": len(self.train),
            "validation": len(self.validation),
            "test": len(self.test),
            "heldout_topics": len(self.heldout_topics),
        }


def make_splits(entries: list[Entry], seed: int = 13, heldout_fraction: float = 0.1) -> Splits:
    splits = Splits()
    for entry in entries:
        variants = list(entry.variants)
        _rng(seed, entry.id).shuffle(variants)
        held = variants[:2] if len(variants) >= 3 else []
        splits.test += [Example(q, entry) for q in held[:1]]
        splits.validation += [Example(q, entry) for q in held[1:2]]
        splits.train += [Example(q, entry) for q in (entry.question, *variants[len(held) :])]
    topics = sorted({e.topic for e in entries if e.topic})
    count = round(len(topics) * heldout_fraction)
    splits.heldout_topics = sorted(_rng(seed, "topics").sample(topics, count)) if count else []
    return splits


# ---------------------------------------------------------------- encoding


@dataclass(frozen=True)
class ChatFormat:
    """How a model family sees one exchange; ``stop`` ends the answer and carries loss."""

    prompt: str
    answer: str
    stop: str


CHAT_FORMATS = {
    "gemma": ChatFormat(
        "<start_of_turn>user\n{user}<end_of_turn>\n<start_of_turn>model\n",
        "{answer}",
        "<end_of_turn>",
    ),
    "gpt2": ChatFormat("{user}\nRespuesta:", " {answer}", "<|endoftext|>"),
    # SentencePiece adds the space before the answer itself (dummy prefix), as in "[/INST] A"
    "llama": ChatFormat("[INST] {user} [/INST]", "{answer}", "</s>"),
}


def chat_family(tokenizer) -> str:
    """The chat format a tokenizer's model family was trained with."""
    name = type(tokenizer).__name__.lower()
    for family, markers in (
        ("gemma", ("gemma",)),
        ("gpt2", ("gpt2",)),
        ("llama", ("llama", "mistral")),
    ):
        if any(m in name for m in markers):
            return family
    raise UserError(f"no chat format for tokenizer {type(tokenizer).__name__}")


def stop_token_id(tokenizer) -> int:
    return int(tokenizer.token_to_id(CHAT_FORMATS[chat_family(tokenizer)].stop))


def _ids(tokenizer, text: str) -> list[int]:
    return [int(i) for i in np.asarray(tokenizer.tokenize(text)).reshape(-1)] if text else []


def encode_example(tokenizer, user: str, answer: str) -> tuple[list[int], list[int]]:
    """Token ids of one exchange and loss weights: 0 on the prompt, 1 on answer + stop token."""
    fmt = CHAT_FORMATS[chat_family(tokenizer)]
    start = [] if tokenizer.start_token_id is None else [int(tokenizer.start_token_id)]
    prompt = start + _ids(tokenizer, fmt.prompt.format(user=user))
    reply = _ids(tokenizer, fmt.answer.format(answer=answer)) + [stop_token_id(tokenizer)]
    return prompt + reply, [0] * len(prompt) + [1] * len(reply)


def pack(encoded: Iterable[tuple[list[int], list[int]]], sequence_length: int, pad_id: int = 0):
    """Right-padded ``(x, y, sample_weight)`` for next-token training; y and weights are shifted."""
    encoded = list(encoded)
    ids = np.full((len(encoded), sequence_length + 1), pad_id, dtype="int32")
    weights = np.zeros((len(encoded), sequence_length + 1), dtype="float32")
    for row, (tokens, loss) in enumerate(encoded):
        tokens, loss = tokens[: sequence_length + 1], loss[: sequence_length + 1]
        ids[row, : len(tokens)] = tokens
        weights[row, : len(loss)] = loss
    mask = np.zeros_like(ids, dtype=bool)
    for row, (tokens, _) in enumerate(encoded):
        mask[row, : len(tokens)] = True
    x = {"token_ids": ids[:, :-1], "padding_mask": mask[:, :-1]}
    return x, ids[:, 1:], weights[:, 1:]


# ---------------------------------------------------------------- command line


def _stats(entries: list[Entry], model: str | None) -> str:
    out = [f"entries: {len(entries)}", f"questions: {sum(len(e.questions) for e in entries)}"]
    out.append(f"paraphrases (retrieval only): {sum(len(e.paraphrases) for e in entries)}")
    out.append(f"topics: {len({e.topic for e in entries if e.topic})}")
    by_category = Counter(e.category or "(none)" for e in entries)
    out += ["per category (entries):"] + [f"  {c}: {n}" for c, n in sorted(by_category.items())]
    splits = make_splits(entries)
    out.append("splits: " + ", ".join(f"{k} {v}" for k, v in splits.counts().items()))
    if model:
        from gemma_cse.models import load_causal_lm

        tokenizer = load_causal_lm(model).preprocessor.tokenizer
        lengths = np.array(
            [len(encode_example(tokenizer, e.question, e.answer)[0]) for e in entries]
        )
        qs = np.percentile(lengths, [50, 90, 99, 100]).astype(int)
        out.append(
            f"tokens per example ({model}): p50 {qs[0]}, p90 {qs[1]}, p99 {qs[2]}, max {qs[3]}"
        )
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m gemma_cse.data",
        description="Validate a knowledge base (CSV with , or ; / JSONL) or print its statistics.",
    )
    parser.add_argument("command", choices=["validate", "stats"])
    parser.add_argument(
        "path", nargs="?", default=str(KB_DIR), help="file or folder (default: %(default)s)"
    )
    parser.add_argument(
        "--skip-bad-rows", action="store_true", help="drop bad rows instead of stopping"
    )
    parser.add_argument("--model", help="model spec for token-length statistics (stats only)")
    args = parser.parse_args(argv)
    entries = load_entries(
        args.path, skip_bad_rows=args.skip_bad_rows, report=lambda m: print(m, file=sys.stderr)
    )
    if args.command == "validate":
        questions = sum(len(e.questions) for e in entries)
        paraphrases = sum(len(e.paraphrases) for e in entries)
        print(
            f"ok: {len(entries)} entries, {questions} questions, {paraphrases} paraphrases "
            f"in {args.path}"
        )
    else:
        print(_stats(entries, args.model))
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
