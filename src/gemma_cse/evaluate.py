"""``python -m gemma_cse.evaluate``: the engine over evaluation sets → one report folder.

Reads top to bottom: metrics (small pure functions) → evaluation items (held-out test split
and blind test, out-of-scope test half, or any CSV/JSONL) → ``evaluate_mode`` (one engine over
the items, one cached JSONL line per question, resumable) → ``score_record`` /
``system_metrics`` → ``write_report`` (report.md, metrics.json, errors.jsonl, PNGs) → command
line.

A *system* is one answering mode with one model and adapter (``rag_lora@run_a``); several
systems in one report give the comparison across modes and across runs. Statuses are scored
with ``fallback`` counted as an answer (the engine answered with the best source's text).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import sys
import time
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, replace
from datetime import datetime
from pathlib import Path

import numpy as np

from gemma_cse.cli import UserError, run
from gemma_cse.data import (
    BLIND_OUT_OF_SCOPE_FILE,
    BLIND_TEST_FILE,
    Entry,
    OutOfScope,
    load_blind_test,
    load_entries,
    load_out_of_scope,
    make_splits,
    normalize,
)

MODES = ("retrieval", "rag", "rag_few_shot", "rag_lora", "closed_book")
ADAPTER_MODES = ("rag_lora", "closed_book")  # the modes Engine.build gives the adapter to
LLM_MODES = ("rag", "rag_few_shot", "rag_lora", "closed_book")
ANSWERED = ("answered", "fallback")  # statuses that put KB text in front of the student
EXPECTED_STATUSES = ("answered", "out_of_scope", "refused", "chitchat", "self_harm")
GOT_STATUSES = (*EXPECTED_STATUSES, "fallback")
IN_SCOPE = "in_scope"
TEST_SPLIT = "test split"  # the default evaluation sets (Item.subset)
BLIND_TEST = "blind test"
RANKING_DEPTH = 10  # retrieval ranking kept per question (MRR is MRR@10)
GOALS = {  # metric → (comparison, target), on the held-out test
    "right_topic": (">=", 0.95),
    "oos_f1": (">=", 0.95),
    "false_refusal_rate": ("<=", 0.03),
    "faithfulness": (">=", 0.98),
    "clean_stop_rate": (">=", 1.0),
}
GOAL_NAMES = {
    "right_topic": "right source topic",
    "oos_f1": "out-of-scope F1",
    "false_refusal_rate": "false refusals",
    "faithfulness": "faithfulness",
    "clean_stop_rate": "clean stop",
}


# ---------------------------------------------------------------- metrics (pure)


def hit_at_k(rankings: Sequence[Sequence[str]], golds: Sequence[str], k: int) -> float:
    """Share of questions whose gold id is among the first ``k`` retrieved ids."""
    if not golds:
        return 0.0
    return sum(
        gold in list(ranked)[:k] for ranked, gold in zip(rankings, golds, strict=True)
    ) / len(golds)


def mrr(rankings: Sequence[Sequence[str]], golds: Sequence[str]) -> float:
    """Mean reciprocal rank of the gold id (0 for a question whose ranking lacks it)."""
    if not golds:
        return 0.0
    total = 0.0
    for ranked, gold in zip(rankings, golds, strict=True):
        ranked = list(ranked)
        total += 1.0 / (ranked.index(gold) + 1) if gold in ranked else 0.0
    return total / len(golds)


def chrf(hypothesis: str, reference: str) -> float:
    """Sentence chrF (0–100, sacrebleu's defaults: character 6-grams, β = 2)."""
    import sacrebleu

    return float(sacrebleu.sentence_chrf(hypothesis, [reference]).score)


def corpus_chrf(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """Corpus chrF (0–100): n-gram statistics summed over all pairs, then one F-score."""
    import sacrebleu

    if not hypotheses:
        return 0.0
    return float(sacrebleu.corpus_chrf(list(hypotheses), [list(references)]).score)


class _WordTokenizer:
    """Case-folded Unicode words. rouge-score's own tokenizer keeps only ``[a-z0-9]``, which
    would split Spanish words at every accent ("información" → "informaci", "n")."""

    def tokenize(self, text: str) -> list[str]:
        return re.findall(r"\w+", text.casefold())


_ROUGE = None


def rouge_l(hypothesis: str, reference: str) -> float:
    """ROUGE-L F-measure (0–1): longest common word subsequence, via ``rouge-score``."""
    global _ROUGE
    if _ROUGE is None:
        from rouge_score import rouge_scorer

        _ROUGE = rouge_scorer.RougeScorer(["rougeL"], tokenizer=_WordTokenizer())
    return float(_ROUGE.score(reference, hypothesis)["rougeL"].fmeasure)


def embedding_similarity(hypotheses: Sequence[str], references: Sequence[str], embedder) -> list:
    """Cosine similarity of each hypothesis to its reference, with an embedder whose
    ``embed(texts)`` returns L2-normalised vectors (each distinct text is embedded once)."""
    texts = list(dict.fromkeys([*hypotheses, *references]))
    if not texts:
        return []
    vectors = np.asarray(embedder.embed(texts), dtype="float64")
    row = {text: i for i, text in enumerate(texts)}
    return [
        float(vectors[row[h]] @ vectors[row[r]])
        for h, r in zip(hypotheses, references, strict=True)
    ]


def prf(tp: int, fp: int, fn: int) -> dict[str, float]:
    """Precision, recall and F1 from counts (0 where a ratio has no denominator)."""
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1}


def status_prf(
    expected: Sequence[str], got: Sequence[str], labels: Iterable[str] | None = None
) -> dict[str, dict[str, float]]:
    """One-vs-rest precision/recall/F1 and support for each status label."""
    labels = list(labels) if labels is not None else sorted(set(expected) | set(got))
    out = {}
    for label in labels:
        tp = sum(e == label and g == label for e, g in zip(expected, got, strict=True))
        fp = sum(e != label and g == label for e, g in zip(expected, got, strict=True))
        fn = sum(e == label and g != label for e, g in zip(expected, got, strict=True))
        out[label] = prf(tp, fp, fn) | {"support": tp + fn, "predicted": tp + fp}
    return out


def kind_prf(
    kinds: Sequence[str], expected: Sequence[str], got: Sequence[str]
) -> dict[str, dict[str, float]]:
    """Precision/recall/F1 per out-of-scope kind.

    Several kinds share a status (near misses, general knowledge and other institutions are
    all ``out_of_scope``), so for kind *k* with status *s*: true positives are items of kind
    *k* that got *s*; false negatives, items of kind *k* that did not; false positives, items
    that should not get *s* (any kind) but did. Items of other kinds that should also get *s*
    are neither.
    """
    out = {}
    for kind in sorted(set(kinds) - {IN_SCOPE}):
        status = next(e for k, e in zip(kinds, expected, strict=True) if k == kind)
        rows = list(zip(kinds, expected, got, strict=True))
        tp = sum(k == kind and g == status for k, _, g in rows)
        fn = sum(k == kind and g != status for k, _, g in rows)
        fp = sum(e != status and g == status for _, e, g in rows)
        out[kind] = prf(tp, fp, fn) | {"support": tp + fn, "status": status}
    return out


def declined_prf(expected: Sequence[str], got: Sequence[str]) -> dict[str, float]:
    """Precision/recall/F1 of declining (any status but an answer; ``fallback`` is an answer):
    the out-of-scope detection over in-scope and out-of-scope messages together."""
    pairs = [(e not in ANSWERED, g not in ANSWERED) for e, g in zip(expected, got, strict=True)]
    tp = sum(e and g for e, g in pairs)
    return prf(tp, sum(g and not e for e, g in pairs), sum(e and not g for e, g in pairs))


def false_refusal_rate(in_scope_statuses: Sequence[str]) -> float:
    """Share of in-scope questions the engine declined (any status but an answer)."""
    if not in_scope_statuses:
        return 0.0
    return sum(s not in ANSWERED for s in in_scope_statuses) / len(in_scope_statuses)


def percentile(values: Sequence[float], q: float) -> float | None:
    """The ``q``-th percentile (0–100) with linear interpolation; None for no values."""
    return float(np.percentile(np.asarray(values, dtype="float64"), q)) if len(values) else None


def repetition_rate(text: str, n: int = 3) -> float:
    """Share of the word ``n``-grams of ``text`` that repeat an earlier one (0 = no loop)."""
    words = re.findall(r"\w+", text.casefold())
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    return (len(grams) - len(set(grams))) / len(grams) if grams else 0.0


def _mean(values: Sequence[float]) -> float | None:
    return float(np.mean(values)) if len(values) else None


def wilson_interval(successes: float, n: int, z: float = 1.96) -> tuple[float, float] | None:
    """The Wilson score interval (95% by default) of a share of ``successes`` in ``n`` trials:
    how far a goal can sit from the measured share and still be within sampling noise."""
    if n <= 0:
        return None
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * float(np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)))
    return max(0.0, centre - half), min(1.0, centre + half)


# ---------------------------------------------------------------- evaluation items


@dataclass(frozen=True)
class Item:
    """One evaluation question: in scope (``expected`` = answered, with its gold entry) or
    out of scope (``expected`` = the status the guard must give, ``kind`` its kind)."""

    id: str
    question: str
    expected: str
    kind: str = IN_SCOPE
    gold_id: str = ""
    gold_topic: str = ""
    gold_category: str = ""
    gold_answer: str = ""
    subset: str = ""  # the evaluation set it belongs to (test split, blind test; "" for a file)


def in_scope_item(question: str, entry: Entry, item_id: str, subset: str) -> Item:
    return Item(
        item_id,
        question,
        "answered",
        IN_SCOPE,
        entry.id,
        entry.topic,
        entry.category,
        entry.answer,
        subset,
    )


def _golds_in_kb(entries: Sequence[Entry], kb: Sequence[Entry], data) -> list[Entry]:
    """The KB entry each evaluation file's entry stands for: same id, else the same answer.
    One that matches none could never be answered right, so it is an error, not a silent 0."""
    by_id = {e.id: e for e in kb}
    by_answer = {normalize(e.answer): e for e in kb}
    golds = [by_id.get(e.id) or by_answer.get(normalize(e.answer)) for e in entries]
    unmatched = [e for e, gold in zip(entries, golds, strict=True) if gold is None]
    if unmatched:
        raise UserError(
            f"{data}: {len(unmatched)} row(s) match no knowledge-base entry by id or by "
            f"answer, e.g. {unmatched[0].question!r}; give each row its KB entry's id or answer"
        )
    return golds


def load_items(
    data: str | Path | None = None,
    out_of_scope: str | Path | None = "default",
    kb: str | Path | None = None,
    seed: int = 13,
    limit: int | None = None,
) -> tuple[list[Item], dict]:
    """Evaluation items and a description of where they came from.

    ``data``: None for the held-out test of ``kb``: its test split (one unseen variant per
    entry) and, for the committed KB, the blind test (``data/cse/blind_test.jsonl``); or a
    CSV/JSONL file or folder whose every question is asked with its entry as gold.
    ``out_of_scope``: "default" for the test half of ``data/cse/out_of_scope.jsonl`` and, with
    the blind test, ``data/cse/blind_out_of_scope.jsonl``; a path for all of that file, or None
    for none. ``limit``: the first N in-scope questions. Each item names its ``subset``: the
    default sets are "test split" (its questions and the out-of-scope test half) and "blind
    test" (both blind files), so that the goals can be read on each alone.
    """
    entries = load_entries(kb) if kb else load_entries()
    blind = data is None and kb is None
    if data is None:
        examples = make_splits(entries, seed=seed).test
        items = [
            in_scope_item(ex.question, ex.entry, f"{ex.entry.id}#test", TEST_SPLIT)
            for ex in examples
        ]
        source = f"held-out test split (seed {seed})"
        if blind:
            questions = load_blind_test(entries)
            items += [
                in_scope_item(ex.question, ex.entry, f"{ex.entry.id}#blind{i}", BLIND_TEST)
                for i, ex in enumerate(questions)
            ]
            source += f" + {BLIND_TEST} ({len(questions)} questions, {BLIND_TEST_FILE.name})"
    else:
        asked = load_entries(data)
        items = [
            in_scope_item(q, gold, f"{e.id}#{i}", "")
            for e, gold in zip(asked, _golds_in_kb(asked, entries, data), strict=True)
            for i, q in enumerate(e.questions)
        ]
        source = str(data)
    items = items[:limit] if limit else items
    oos: list[tuple[OutOfScope, str]] = []
    oos_source = "none"
    if out_of_scope == "default":
        from gemma_cse.guard import split_out_of_scope  # the guard calibrates on the other half

        _, half = split_out_of_scope(load_out_of_scope())
        oos = [(o, TEST_SPLIT if data is None else "") for o in half]
        oos_source = f"test half of out_of_scope.jsonl ({len(half)} messages; guard's split)"
        if blind:
            _, extra = split_out_of_scope(load_out_of_scope(BLIND_OUT_OF_SCOPE_FILE))
            oos += [(o, BLIND_TEST) for o in extra]
            name = BLIND_OUT_OF_SCOPE_FILE.name
            oos_source += f" + {BLIND_TEST}: test half of {name} ({len(extra)} messages)"
    elif out_of_scope:
        oos = [(o, "") for o in load_out_of_scope(out_of_scope)]
        oos_source = str(out_of_scope)
    items += [Item(o.id, o.text, o.expected, o.kind, subset=subset) for o, subset in oos]
    return items, {"in_scope": source, "out_of_scope": oos_source}


# ---------------------------------------------------------------- running one engine


def record_key(mode: str, model: str, adapter: str | None, item: Item) -> str:
    """The cache key of one question under one system."""
    text = json.dumps([mode, model, adapter, item.kind, item.question, item.gold_id])
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def read_cache(path: Path) -> dict[str, dict]:
    """Cached records by key. A line cut by an interruption (no newline) is dropped from the
    file, so the next record starts on a line of its own."""
    if not path.exists():
        return {}
    raw = path.read_bytes()
    if raw and not raw.endswith(b"\n"):
        raw = raw[: raw.rfind(b"\n") + 1]
        path.write_bytes(raw)
    records = {}
    for line in raw.decode("utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        records.setdefault(row["key"], row)
    return records


def _retrieved(engine, question: str) -> list:
    """[entry id, topic, score] of the engine's retrieval ranking, independent of the guard."""
    retriever = getattr(engine, "retriever", None)
    if retriever is None:
        return []
    return [
        [h.entry.id, h.entry.topic, round(float(h.score), 4)]
        for h in retriever.search(question, k=RANKING_DEPTH)
    ]


def make_record(system: str, item: Item, reply: dict, **extra) -> dict:
    """One cache line: the system, the item, the reply (``Reply.to_dict()``) and extras
    (``retrieved``, ``wall_ms``, ``answer_unsupported``)."""
    reply = json.loads(json.dumps(reply, default=str))  # enums → their values
    return {"system": system, "item": asdict(item), "reply": reply} | extra


def evaluate_mode(
    engine,
    items: Sequence[Item],
    cache_path: str | Path,
    *,
    label: str | None = None,
    entries: Sequence[Entry] | None = None,
    progress: bool = True,
) -> list[dict]:
    """Ask ``engine`` every item; one JSONL line per question is appended to ``cache_path``
    as soon as it is answered, and questions already there are skipped (resume).

    Returns the records in ``items`` order. ``entries`` (default: the engine's KB, else the
    committed one) are looked up to check the returned answer's facts against its sources.
    """
    from tqdm import tqdm

    from gemma_cse.engine import unsupported_facts

    mode = getattr(engine.mode, "value", engine.mode)
    label = label or mode
    cache_path = Path(cache_path)
    cache_path.parent.mkdir(parents=True, exist_ok=True)
    if entries is None:
        entries = getattr(getattr(engine, "retriever", None), "entries", None) or load_entries()
    by_id = {e.id: e for e in entries}
    done = read_cache(cache_path)
    keys = [record_key(mode, engine.model, engine.adapter, item) for item in items]
    todo = [(k, item) for k, item in zip(keys, items, strict=True) if k not in done]
    with (
        open(cache_path, "a", encoding="utf-8") as out,
        tqdm(
            total=len(items),
            initial=len(items) - len(todo),
            desc=label,
            unit="q",
            disable=not progress,
            file=sys.stderr,
        ) as bar,
    ):
        for key, item in todo:
            start = time.perf_counter()
            reply = engine.answer(item.question)
            wall_ms = (time.perf_counter() - start) * 1e3
            sources = [by_id[s.entry_id] for s in reply.sources if s.entry_id in by_id]
            answered = str(reply.status) in ANSWERED
            record = make_record(
                label,
                item,
                reply.to_dict(),
                key=key,
                wall_ms=round(wall_ms, 2),
                retrieved=_retrieved(engine, item.question),
                answer_unsupported=unsupported_facts(reply.text, sources) if answered else [],
            )
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
            out.flush()
            os.fsync(out.fileno())
            done[key] = record
            bar.update(1)
    return [done[k] for k in keys]


# ---------------------------------------------------------------- scoring


def score_record(record: dict) -> dict:
    """Per-question outcome: status handled right, right topic, answer scores.

    The retrieval ranking is the record's ``retrieved`` list (taken before the guard), else
    the reply's sources; its top score is the question's confidence.
    """
    item, reply = record["item"], record["reply"]
    status = reply["status"]
    in_scope = item["kind"] == IN_SCOPE
    sources = reply.get("sources") or []
    ranked = record.get("retrieved") or [[s["entry_id"], s["topic"], s["score"]] for s in sources]
    ranking = [r[0] for r in ranked]
    answered = status in ANSWERED
    right_topic = False
    if in_scope and answered and sources:
        top = sources[0]
        gold_topic = item["gold_topic"]
        right_topic = (
            top["topic"] == gold_topic if gold_topic else top["entry_id"] == item["gold_id"]
        )
    rank = ranking.index(item["gold_id"]) + 1 if in_scope and item["gold_id"] in ranking else None
    scores = {
        "status": status,
        "status_handled": "answered" if status == "fallback" else status,
        "answered": answered,
        "right_topic": right_topic,
        "correct": right_topic if in_scope else status == item["expected"],
        "rank": rank,
        "ranking": ranking,
        "confidence": float(ranked[0][2]) if ranked else 0.0,
        "generated": reply["mode"] in LLM_MODES and answered,
        "faithful": answered and not record.get("answer_unsupported"),
        "words": len(reply["text"].split()),
        "repetition": repetition_rate(reply["text"]),
    }
    if in_scope:
        scores["chrf"] = chrf(reply["text"], item["gold_answer"])
        scores["rouge_l"] = rouge_l(reply["text"], item["gold_answer"])
    return scores


def _goal(value: float | None, name: str, n: int | None) -> dict:
    """One goal's verdict; ``n``: the questions a share is over (None: not a share, as F1)."""
    op, target = GOALS[name]
    passed = None if value is None else (value >= target if op == ">=" else value <= target)
    interval = None if value is None or n is None else wilson_interval(round(value * n), n)
    return {"value": value, "target": target, "op": op, "pass": passed, "n": n, "ci95": interval}


def system_metrics(
    records: Sequence[dict],
    similarities: Sequence[float] | None = None,
    scored: Sequence[dict] | None = None,
) -> dict:
    """Every metric of one system from its records (and embedding similarities, if any;
    ``scored``: the records' ``score_record`` results, if already computed)."""
    scored = scored if scored is not None else [score_record(r) for r in records]
    items = [r["item"] for r in records]
    replies = [r["reply"] for r in records]
    ins = [i for i, item in enumerate(items) if item["kind"] == IN_SCOPE]
    oos = [i for i, item in enumerate(items) if item["kind"] != IN_SCOPE]
    gold_ids = [items[i]["gold_id"] for i in ins]
    rankings = [scored[i]["ranking"] for i in ins]
    hyps = [replies[i]["text"] for i in ins]
    refs = [items[i]["gold_answer"] for i in ins]
    expected = [item["expected"] for item in items]
    got = [s["status_handled"] for s in scored]
    answered = [i for i, s in enumerate(scored) if s["answered"]]
    generated = [i for i, s in enumerate(scored) if s["generated"]]
    gen_seconds = sum(replies[i]["timings"]["generation_ms"] for i in generated) / 1e3
    gen_tokens = sum(replies[i]["new_tokens"] for i in generated)
    wall = [r.get("wall_ms") or 0.0 for r in records]
    by_category: dict[str, list[bool]] = defaultdict(list)
    for item, s in zip(items, scored, strict=True):
        group = (
            (item["gold_category"] or "(none)")
            if item["kind"] == IN_SCOPE
            else f"oos:{item['kind']}"
        )
        by_category[group].append(s["correct"])
    metrics = {
        "n": len(records),
        "n_in_scope": len(ins),
        "n_out_of_scope": len(oos),
        "mode": replies[0]["mode"] if replies else None,
        "model": replies[0]["model"] if replies else None,
        "adapter": replies[0]["adapter"] if replies else None,
        "hit_at_1": hit_at_k(rankings, gold_ids, 1) if ins else None,
        "hit_at_3": hit_at_k(rankings, gold_ids, 3) if ins else None,
        "mrr": mrr(rankings, gold_ids) if ins else None,
        "right_topic": _mean([scored[i]["right_topic"] for i in ins]),
        "chrf": corpus_chrf(hyps, refs) if ins else None,
        "chrf_mean": _mean([scored[i]["chrf"] for i in ins]),
        "rouge_l": _mean([scored[i]["rouge_l"] for i in ins]),
        "embedding_similarity": _mean(list(similarities)) if similarities else None,
        "faithfulness": _mean([scored[i]["faithful"] for i in answered]),
        "n_answers_checked": len(answered),
        "generated_faithfulness": _mean([not replies[i]["unsupported_facts"] for i in generated]),
        "fallback_rate": _mean([replies[i]["status"] == "fallback" for i in generated]),
        "n_generated": len(generated),
        "oos_detection": declined_prf(expected, got) if oos else None,
        "status_accuracy": _mean([g == e for g, e in zip(got, expected, strict=True)]),
        "per_status": status_prf(expected, got, EXPECTED_STATUSES),
        "per_kind": kind_prf([i["kind"] for i in items], expected, got),
        "false_refusal_rate": false_refusal_rate([scored[i]["status"] for i in ins])
        if ins
        else None,
        "clean_stop_rate": _mean([replies[i]["stopped"] for i in generated]),
        "answer_words_mean": _mean([scored[i]["words"] for i in answered]),
        "answer_words_p50": percentile([scored[i]["words"] for i in answered], 50),
        "new_tokens_mean": _mean([replies[i]["new_tokens"] for i in generated]),
        "repetition_mean": _mean([scored[i]["repetition"] for i in answered]),
        "repetitive_share": _mean([scored[i]["repetition"] > 0.1 for i in answered]),
        "latency_p50_ms": percentile(wall, 50),
        "latency_p95_ms": percentile(wall, 95),
        "tokens_per_second": gen_tokens / gen_seconds if gen_seconds else None,
        "per_category": {
            k: {"n": len(v), "accuracy": sum(v) / len(v)} for k, v in sorted(by_category.items())
        },
    }
    metrics["oos_f1"] = metrics["oos_detection"]["f1"] if metrics["oos_detection"] else None
    shares_of = {  # the questions each goal's share is over
        "right_topic": len(ins),
        "false_refusal_rate": len(ins),
        "faithfulness": len(answered),
        "clean_stop_rate": len(generated),
    }
    metrics["goals"] = {name: _goal(metrics[name], name, shares_of.get(name)) for name in GOALS}
    groups: dict[str, list[int]] = defaultdict(list)
    for i, item in enumerate(items):
        groups[item.get("subset", "")].append(i)
    metrics["by_set"] = {name: _set_goals(items, scored, idx) for name, idx in groups.items()}
    return metrics


SET_GOALS = ("right_topic", "oos_f1", "false_refusal_rate")  # the goals a set has alone


def _set_goals(items: Sequence[dict], scored: Sequence[dict], indices: Sequence[int]) -> dict:
    """``SET_GOALS`` on the items at ``indices`` alone (an evaluation set: Item.subset)."""
    ins = [i for i in indices if items[i]["kind"] == IN_SCOPE]
    n_oos = len(indices) - len(ins)
    f1 = None
    if ins and n_oos:
        expected = [items[i]["expected"] for i in indices]
        f1 = declined_prf(expected, [scored[i]["status_handled"] for i in indices])["f1"]
    refusals = false_refusal_rate([scored[i]["status"] for i in ins]) if ins else None
    values = {
        "right_topic": (_mean([scored[i]["right_topic"] for i in ins]), len(ins)),
        "oos_f1": (f1, None),
        "false_refusal_rate": (refusals, len(ins)),
    }
    return {
        "n_in_scope": len(ins),
        "n_out_of_scope": n_oos,
        "goals": {name: _goal(value, name, n) for name, (value, n) in values.items()},
    }


# ---------------------------------------------------------------- report


def _fmt(value, kind: str = "pct") -> str:
    if value is None:
        return "n/a"
    if kind == "pct":
        return f"{100 * value:.1f}%"
    if kind == "ms":
        return f"{value:.0f} ms" if value >= 10 else f"{value:.1f} ms"
    if kind == "int":
        return f"{value:.0f}"
    return f"{value:.2f}" if kind == "f2" else f"{value:.3f}"


def _fmt_interval(goal: dict) -> str:
    low, high = goal["ci95"]
    return f"{_fmt(low)}–{_fmt(high)}"


def _fmt_goal(goal: dict | None) -> str:
    """A goal's cell: "93.9% ❌ (88.5%–96.9%)"."""
    if goal is None:
        return "n/a"
    mark = {True: "✅", False: "❌", None: ""}[goal["pass"]]
    spread = f" ({_fmt_interval(goal)})" if goal["ci95"] else ""
    return f"{_fmt(goal['value'])} {mark}{spread}".strip()


def md_table(headers: Sequence[str], rows: Sequence[Sequence]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _group_order(group: str) -> tuple[bool, str]:
    """KB categories first, then the out-of-scope kinds (``oos:...``)."""
    return group.startswith("oos:"), group


def _safe(label: str) -> str:
    return re.sub(r"[^\w.-]+", "_", label)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_confusion(expected: Sequence[str], got: Sequence[str], title: str, out: Path) -> None:
    """Expected status (rows) × returned status (columns), with counts."""
    plt = _plt()
    matrix = np.zeros((len(EXPECTED_STATUSES), len(GOT_STATUSES)), int)
    for e, g in zip(expected, got, strict=True):
        if e in EXPECTED_STATUSES and g in GOT_STATUSES:
            matrix[EXPECTED_STATUSES.index(e), GOT_STATUSES.index(g)] += 1
    fig, ax = plt.subplots(figsize=(7, 5))
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(len(GOT_STATUSES)), GOT_STATUSES, rotation=30, ha="right")
    ax.set_yticks(range(len(EXPECTED_STATUSES)), EXPECTED_STATUSES)
    for (r, c), n in np.ndenumerate(matrix):
        if n:
            color = "white" if n > matrix.max() / 2 else "black"
            ax.text(c, r, str(n), ha="center", va="center", color=color)
    ax.set_xlabel("returned status")
    ax.set_ylabel("expected status")
    ax.set_title(f"status confusion: {title}")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def plot_confidence(confidences: Sequence[float], correct: Sequence[bool], title: str, out: Path):
    """Top retrieval score of wrong (left, red) and correct (right, blue) outcomes, as
    ``rasa test`` draws its confidence histograms: one shared confidence axis."""
    plt = _plt()
    values = np.asarray(confidences, dtype="float64")
    ok = np.asarray(correct, dtype=bool)
    edges = np.histogram_bin_edges(values, bins=20) if len(values) else np.linspace(0, 1, 21)
    right, _ = np.histogram(values[ok], bins=edges)
    wrong, _ = np.histogram(values[~ok], bins=edges)
    centers, height = (edges[:-1] + edges[1:]) / 2, np.diff(edges) * 0.9
    fig, ax = plt.subplots(figsize=(7, 5))
    ax.barh(centers, -wrong, height=height, color="#d62728", label=f"wrong ({(~ok).sum()})")
    ax.barh(centers, right, height=height, color="#1f77b4", label=f"correct ({ok.sum()})")
    ax.axvline(0, color="black", linewidth=0.8)
    ticks = ax.get_xticks()
    ax.set_xticks(ticks, [f"{abs(t):.0f}" for t in ticks])
    ax.set_xlabel("number of questions (wrong ← | → correct)")
    ax.set_ylabel("confidence (top retrieval score)")
    ax.set_title(f"confidence of correct vs wrong: {title}")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def plot_per_category(per_system: dict[str, dict], out: Path) -> None:
    """Accuracy per KB category (right topic) and per out-of-scope kind (right status)."""
    plt = _plt()
    groups = sorted({g for m in per_system.values() for g in m["per_category"]}, key=_group_order)
    systems = list(per_system)
    fig, ax = plt.subplots(figsize=(8, 0.35 * len(groups) * max(1, len(systems)) + 1.5))
    height = 0.8 / max(1, len(systems))
    for s, name in enumerate(systems):
        cats = per_system[name]["per_category"]
        values = [cats[g]["accuracy"] if g in cats else 0 for g in groups]
        ax.barh(np.arange(len(groups)) + s * height, values, height=height, label=name)
    ax.set_yticks(np.arange(len(groups)) + height * (len(systems) - 1) / 2, groups)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("accuracy")
    ax.set_title("per-category accuracy")
    ax.legend(fontsize="small")
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def _run_info(run_dir: Path) -> dict:
    """Settings and final metrics of a training run (or adapter) directory, as far as known."""
    import yaml

    info = {"run": run_dir.name, "path": str(run_dir)}
    if (run_dir / "config.yaml").is_file():
        config = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8")) or {}
        info |= {k: config.get(k) for k in ("model", "lora_rank", "lora_targets", "quantize")}
    if (run_dir / "run.json").is_file():
        summary = json.loads((run_dir / "run.json").read_text(encoding="utf-8"))
        info |= {
            "epochs_run": summary.get("epochs_run"),
            "train_tokens_per_second": summary.get("train_tokens_per_second_wall"),
            **summary.get("final_metrics", {}),
        }
    return info


def _errors(label: str, records: Sequence[dict], scored: Sequence[dict]) -> list[dict]:
    rows = []
    for record, s in zip(records, scored, strict=True):
        item, reply = record["item"], record["reply"]
        problems = []
        if not s["correct"]:
            wrong_status = s["status_handled"] != item["expected"]
            problems.append("wrong_status" if wrong_status else "wrong_topic")
        if s["answered"] and not s["faithful"]:
            problems.append("unfaithful")
        if s["generated"] and not reply["stopped"]:
            problems.append("not_stopped")
        if not problems:
            continue
        expected = {"status": item["expected"], "kind": item["kind"], "set": item.get("subset", "")}
        if item["kind"] == IN_SCOPE:
            expected |= {
                "entry_id": item["gold_id"],
                "topic": item["gold_topic"],
                "answer": item["gold_answer"],
            }
        rows.append(
            {
                "system": label,
                "question": item["question"],
                "problems": problems,
                "expected": expected,
                "got": {
                    "status": reply["status"],
                    "text": reply["text"],
                    "guard_reason": reply.get("guard_reason", ""),
                    "unsupported_facts": record.get("answer_unsupported") or [],
                    "generation_unsupported_facts": reply.get("unsupported_facts") or [],
                },
                "sources": reply.get("sources") or [],
                "scores": {
                    "retrieved": (record.get("retrieved") or [])[:3],
                    "gold_rank": s["rank"],
                    **{k: round(s[k], 2) for k in ("chrf", "rouge_l") if k in s},
                },
            }
        )
    return rows


def _similarities(results: dict[str, list[dict]], embedder) -> dict[str, list[float] | None]:
    if embedder is None:
        return {label: None for label in results}
    out = {}
    for label, records in results.items():
        pairs = [
            (r["reply"]["text"], r["item"]["gold_answer"])
            for r in records
            if r["item"]["kind"] == IN_SCOPE
        ]
        out[label] = embedding_similarity(*zip(*pairs, strict=True), embedder) if pairs else None
    return out


def write_report(
    results_by_mode: dict[str, list[dict]],
    out_dir: str | Path,
    run_dir: str | Path | Sequence[str | Path] | None = None,
    *,
    embedder=None,
    meta: dict | None = None,
) -> dict:
    """report.md, metrics.json, errors.jsonl and PNGs for the results of one or more systems
    (label → records from ``evaluate_mode``); ``run_dir``: training run(s) whose curves and
    settings go in the report. Returns metrics.json's content."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    run_dirs = (
        [Path(run_dir)] if isinstance(run_dir, str | Path) else [Path(p) for p in run_dir or []]
    )
    sims = _similarities(results_by_mode, embedder)
    scored_by = {label: [score_record(r) for r in rs] for label, rs in results_by_mode.items()}
    per_system = {
        label: system_metrics(records, sims[label], scored_by[label])
        for label, records in results_by_mode.items()
    }
    runs = {str(Path(p).resolve()): _run_info(Path(p)) for p in run_dirs}
    for metrics in per_system.values():
        if metrics["adapter"]:
            key = str(Path(metrics["adapter"]).resolve())
            runs.setdefault(key, _run_info(Path(metrics["adapter"])))

    figures: dict[str, list[str]] = defaultdict(list)
    errors = []
    for label, records in results_by_mode.items():
        scored = scored_by[label]
        errors += _errors(label, records, scored)
        name = _safe(label)
        plot_confusion(
            [r["item"]["expected"] for r in records],
            [s["status"] for s in scored],
            label,
            out_dir / f"confusion_{name}.png",
        )
        plot_confidence(
            [s["confidence"] for s in scored],
            [s["correct"] for s in scored],
            label,
            out_dir / f"confidence_{name}.png",
        )
        figures[label] += [f"confusion_{name}.png", f"confidence_{name}.png"]
    if per_system:
        plot_per_category(per_system, out_dir / "per_category.png")
    curves = []
    if run_dirs or runs:
        from gemma_cse.train import plot_curves

        for info in runs.values():
            csv = Path(info["path"]) / "metrics.csv"
            if csv.is_file() and csv.stat().st_size:
                png = (
                    "training_curves.png"
                    if len(runs) == 1
                    else f"training_curves_{_safe(info['run'])}.png"
                )
                plot_curves(csv, out_dir / png)
                curves.append((info["run"], png))

    with open(out_dir / "errors.jsonl", "w", encoding="utf-8") as f:
        for row in errors:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    meta = {"created": datetime.now().isoformat(timespec="seconds")} | (meta or {})
    metrics_json = {
        "meta": meta,
        "goals": {k: {"op": op, "target": t} for k, (op, t) in GOALS.items()},
        "runs": list(runs.values()),
        "systems": per_system,
    }
    (out_dir / "metrics.json").write_text(
        json.dumps(metrics_json, indent=2, ensure_ascii=False), encoding="utf-8"
    )
    report = _report_md(per_system, meta, runs, figures, curves, errors)
    (out_dir / "report.md").write_text(report, encoding="utf-8")
    return metrics_json


def _report_md(per_system, meta, runs, figures, curves, errors) -> str:
    labels = list(per_system)
    out = ["# Evaluation report", ""]
    out += [f"- {k.replace('_', ' ')}: {v}" for k, v in meta.items()]
    for label, m in per_system.items():
        out.append(
            f"- `{label}`: mode {m['mode']}, model {m['model']}, adapter {m['adapter'] or 'none'}, "
            f"{m['n_in_scope']} in-scope + {m['n_out_of_scope']} out-of-scope questions"
        )
    out += ["", "## Goals on the held-out test", ""]
    rows = []
    for goal, (op, target) in GOALS.items():
        row = [GOAL_NAMES[goal], f"{op} {_fmt(target)}"]
        row += [_fmt_goal(per_system[label]["goals"][goal]) for label in labels]
        rows.append(row)
    out += [md_table(["goal", "target", *labels], rows), ""]
    sets = list(dict.fromkeys(k for m in per_system.values() for k in m["by_set"]))
    if len(sets) > 1:
        rows = []
        for name in sets:
            first = next(m["by_set"][name] for m in per_system.values() if name in m["by_set"])
            size = f"{first['n_in_scope']} + {first['n_out_of_scope']}"
            for goal in SET_GOALS:
                cells = [
                    _fmt_goal(per_system[label]["by_set"].get(name, {}).get("goals", {}).get(goal))
                    for label in labels
                ]
                rows.append([f"{GOAL_NAMES[goal]}, {name}", size, *cells])
        out += [md_table(["goal on each set alone", "in scope + out of scope", *labels], rows), ""]
    out += [
        "Out-of-scope F1: detecting that a message must not be answered from the knowledge base "
        "(any status but an answer), over in-scope and out-of-scope questions. Faithfulness: "
        "share of returned answers (answered or fallback) whose checkable facts (URLs, e-mails, "
        "numbers, acronyms, office names) appear in their sources; the engine replaces an "
        "unfaithful generation by the best source (fallback), see *generated faithful* below. "
        "Clean stop: generated answers that ended on their own end-of-turn token. In brackets: "
        "the 95% Wilson interval of a share over its questions (in-scope, returned answers, "
        "generated answers); a target inside it is within sampling noise of the measured share.",
        "",
        "## Comparison across modes",
        "",
    ]
    columns = [
        ("right topic", "right_topic", "pct"),
        ("hit@1", "hit_at_1", "pct"),
        ("hit@3", "hit_at_3", "pct"),
        ("MRR", "mrr", "f3"),
        ("chrF", "chrf", "f2"),
        ("ROUGE-L", "rouge_l", "f3"),
        ("emb. sim.", "embedding_similarity", "f3"),
        ("faithful", "faithfulness", "pct"),
        ("generated faithful", "generated_faithfulness", "pct"),
        ("fallback", "fallback_rate", "pct"),
        ("OOS F1", "oos_f1", "f3"),
        ("false refusals", "false_refusal_rate", "pct"),
        ("clean stop", "clean_stop_rate", "pct"),
        ("words", "answer_words_mean", "int"),
        ("repetition", "repetition_mean", "f3"),
        ("p50", "latency_p50_ms", "ms"),
        ("p95", "latency_p95_ms", "ms"),
        ("tokens/s", "tokens_per_second", "f2"),
    ]
    out.append(
        md_table(
            ["system", *[c[0] for c in columns]],
            [
                [f"`{label}`", *[_fmt(m[k], f) for _, k, f in columns]]
                for label, m in per_system.items()
            ],
        )
    )
    out += [
        "",
        "hit@k / MRR@10: the gold entry in the retrieval ranking (before the guard). Right "
        "topic: answered with a top source of the gold topic (a refusal counts as wrong). chrF "
        "(corpus, 0–100), ROUGE-L and embedding similarity: returned text vs the gold answer, "
        "in-scope questions. Latency: wall time of one `answer` call (an LLM mode's first "
        "call per prompt-length bucket includes compiling it).",
        "",
    ]
    adapter_systems = [lbl for lbl, m in per_system.items() if m["adapter"]]
    if runs or adapter_systems:
        out += ["## Comparison across runs", ""]
        rows = []
        for label, m in per_system.items():
            if m["mode"] not in ("rag", "rag_lora"):
                continue
            info = runs.get(str(Path(m["adapter"]).resolve()), {}) if m["adapter"] else {}
            rows.append(
                [
                    f"`{label}`",
                    info.get("run", "base"),
                    m["model"],
                    info.get("lora_rank", "—"),
                    info.get("lora_targets", "—"),
                    info.get("quantize", "—"),
                    _fmt(info.get("val_loss"), "f3"),
                    _fmt(info.get("train_tokens_per_second"), "int"),
                    _fmt(m["right_topic"]),
                    _fmt(m["chrf"], "f2"),
                    _fmt(m["rouge_l"], "f3"),
                    _fmt(m["generated_faithfulness"]),
                    _fmt(m["fallback_rate"]),
                    _fmt(m["clean_stop_rate"]),
                    _fmt(m["tokens_per_second"], "f2"),
                ]
            )
        headers = [
            "system",
            "run",
            "model",
            "LoRA rank",
            "targets",
            "quantize",
            "val loss",
            "train tokens/s",
            "right topic",
            "chrF",
            "ROUGE-L",
            "generated faithful",
            "fallback",
            "clean stop",
            "tokens/s",
        ]
        out += [md_table(headers, rows) if rows else "(no rag or rag_lora system evaluated)", ""]
        for run_name, png in curves:
            out += [f"Training curves of `{run_name}`:", "", f"![training curves]({png})", ""]

    out += ["## Status handling", ""]
    for label, m in per_system.items():
        out += [f"### `{label}`", ""]
        rows = [
            [
                kind,
                v["status"],
                v["support"],
                _fmt(v["precision"], "f3"),
                _fmt(v["recall"], "f3"),
                _fmt(v["f1"], "f3"),
            ]
            for kind, v in m["per_kind"].items()
        ]
        if rows:
            out += [
                md_table(["kind", "expected status", "n", "precision", "recall", "F1"], rows),
                "",
            ]
        rows = [
            [
                status,
                v["support"],
                _fmt(v["precision"], "f3"),
                _fmt(v["recall"], "f3"),
                _fmt(v["f1"], "f3"),
            ]
            for status, v in m["per_status"].items()
            if v["support"] or v["predicted"]
        ]
        out += [
            md_table(["status", "n", "precision", "recall", "F1"], rows),
            "",
            f"False refusals on in-scope questions: {_fmt(m['false_refusal_rate'])}; status "
            f"accuracy: {_fmt(m['status_accuracy'])}.",
            "",
        ]
        out += [f"![{png}]({png})" for png in figures[label]] + [""]

    out += ["## Per-category accuracy", ""]
    groups = sorted({g for m in per_system.values() for g in m["per_category"]}, key=_group_order)
    rows = []
    for group in groups:
        row = [group]
        for label in labels:
            cell = per_system[label]["per_category"].get(group)
            row.append(f"{_fmt(cell['accuracy'])} (n={cell['n']})" if cell else "—")
        rows.append(row)
    out += [
        md_table(["category", *labels], rows),
        "",
        "![per-category accuracy](per_category.png)",
        "",
    ]

    out += [
        "## Errors",
        "",
        f"{len(errors)} misses in `errors.jsonl`; the first few per system:",
        "",
    ]
    for label in labels:
        mine = [e for e in errors if e["system"] == label][:8]
        if mine:
            rows = [
                [
                    e["question"][:80],
                    ", ".join(e["problems"]),
                    e["expected"]["status"]
                    + (f" / {e['expected']['topic']}" if e["expected"].get("topic") else ""),
                    e["got"]["status"] + (f" / {e['sources'][0]['topic']}" if e["sources"] else ""),
                ]
                for e in mine
            ]
            out += [
                f"### `{label}`",
                "",
                md_table(["question", "problems", "expected", "got"], rows),
                "",
            ]
    return "\n".join(out)


# ---------------------------------------------------------------- systems and engines


@dataclass(frozen=True)
class System:
    """One mode with one model and adapter, evaluated as one column of the report."""

    label: str
    mode: str
    model: str
    adapter: Path | None = None


def plan_systems(
    modes: Sequence[str], adapters: Sequence[Path], model: str | None, explicit: bool
) -> tuple[list[System], list[str]]:
    """The systems to evaluate and notes on what was skipped.

    Modes without an adapter (retrieval, rag, rag_few_shot) run once on the base model
    (``model``, else the first adapter's base, else the embedded model); ``rag_lora`` and
    ``closed_book`` run once per adapter (``closed_book`` without any runs the base model).
    """
    from gemma_cse.models import EMBEDDED

    configs = {a: _run_info(a) for a in adapters}
    base = model or next((c.get("model") for c in configs.values() if c.get("model")), EMBEDDED)
    systems, notes = [], []
    for mode in modes:
        if mode == "retrieval":
            systems.append(System("retrieval", mode, base))
        elif mode not in ADAPTER_MODES:
            systems.append(System(mode, mode, base))
        elif adapters:
            for a in adapters:
                label = mode if len(adapters) == 1 else f"{mode}@{a.name}"
                systems.append(System(label, mode, configs[a].get("model") or base, a))
        elif mode == "closed_book":
            systems.append(System(mode, mode, base))
        elif explicit:
            raise UserError("mode rag_lora needs an adapter: pass --run or --adapter DIR")
        else:
            notes.append("rag_lora skipped: no adapter (pass --run or --adapter DIR)")
    # systems sharing a loaded model next to each other, so each model is loaded once
    order = {key: i for i, key in enumerate(dict.fromkeys((s.model, s.adapter) for s in systems))}
    systems.sort(key=lambda s: (s.mode != "retrieval", order[(s.model, s.adapter)]))
    return systems, notes


def without_questions(entries: Sequence[Entry], questions: Iterable[str]) -> list[Entry]:
    """``entries`` without the question variants among ``questions`` (compared normalised),
    so that an evaluated question is not in the index verbatim. Canonical questions stay."""
    drop = {normalize(q) for q in questions}
    return [
        replace(e, variants=tuple(v for v in e.variants if normalize(v) not in drop))
        for e in entries
    ]


def write_kb(entries: Sequence[Entry], path: Path) -> Path:
    """``entries`` as a knowledge-base JSONL file that ``load_entries`` reads back as is."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fields = ("id", "topic", "category", "question", "answer", "source")
    with open(path, "w", encoding="utf-8") as out:
        for e in entries:
            row = {k: getattr(e, k) for k in fields if getattr(e, k)}
            row["variants"] = list(e.variants)
            if e.paraphrases:
                row["paraphrases"] = list(e.paraphrases)
            out.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


class Engines:
    """Builds an Engine per system, sharing the retriever and guard, and keeping one loaded
    model at a time (systems are ordered so that each model loads once).

    The index is the knowledge base without the evaluated questions (``exclude``): the
    held-out test variants are part of the KB files, and a retriever that indexed them would
    find every test question verbatim. The KB it indexes is written to ``index_kb``.
    """

    def __init__(
        self,
        kb: str | Path | None = None,
        exclude: Iterable[str] = (),
        index_kb: str | Path | None = None,
    ):
        entries = load_entries(kb) if kb else load_entries()
        self.entries = without_questions(entries, exclude)
        self.removed = sum(len(e.variants) for e in entries) - sum(
            len(e.variants) for e in self.entries
        )
        self.index_kb = Path(index_kb) if index_kb else None
        self.kb = kb
        if self.removed:
            if self.index_kb is None:
                raise ValueError("index_kb: a file for the knowledge base without the questions")
            self.kb = write_kb(self.entries, self.index_kb)
        self._base = None
        self._generator_key = None
        self._generator = None

    @property
    def base(self):
        """The retrieval-mode engine, built by ``Engine.build``: its retriever and guard serve
        every system."""
        from gemma_cse.engine import Engine, Mode

        if self._base is None:
            self._base = Engine.build(Mode.retrieval, adapter=None, kb=self.kb)
        return self._base

    def engine(self, system: System):
        from gemma_cse.engine import Engine, Mode, load_generator
        from gemma_cse.generation import DecodingConfig

        base = self.base
        generator = None
        if system.mode != "retrieval":
            key = (system.model, system.adapter)
            if key != self._generator_key:
                self._generator = None  # free the previous model first
                if system.adapter and not (system.adapter / "adapter.lora.h5").is_file():
                    raise UserError(f"{system.adapter}: no adapter.lora.h5")
                self._generator = load_generator(
                    system.model, system.adapter, self.entries, DecodingConfig()
                )
                self._generator_key = key
            generator = self._generator
        adapter = str(system.adapter) if system.adapter else None
        mode = Mode(system.mode)
        return Engine(base.retriever, base.guard, generator, mode, system.model, adapter)


def _embedder(engine):
    """The retriever's sentence embedder (``embed(texts)`` → normalised vectors), if any."""
    retriever = getattr(engine, "retriever", None)
    embedder = getattr(retriever, "embedder", None)
    return embedder if callable(getattr(embedder, "embed", None)) else None


# ---------------------------------------------------------------- command line


def _seed_of(adapters: Sequence[Path]) -> int:
    """The split seed of the runs (13 without any): runs split with different seeds trained on
    each other's test questions, so they cannot be compared on one test set."""
    import yaml

    seeds = {
        a: int((yaml.safe_load((a / "config.yaml").read_text()) or {}).get("seed", 13))
        for a in adapters
        if (a / "config.yaml").is_file()
    }
    if len(set(seeds.values())) > 1:
        listed = ", ".join(f"{a} seed {seed}" for a, seed in seeds.items())
        raise UserError(f"runs split with different seeds ({listed}); compare runs of one seed")
    return next(iter(seeds.values()), 13)


def main(argv: list[str] | None = None) -> int:
    from gemma_cse.data import OUT_OF_SCOPE_FILE

    parser = argparse.ArgumentParser(
        prog="python -m gemma_cse.evaluate",
        description="Evaluate the answering engine in one or more modes and write a report "
        "folder: report.md (tables), metrics.json, errors.jsonl (every miss) and PNGs "
        "(status confusion, confidence of correct vs wrong, per-category accuracy, training "
        "curves). Each answer is cached as soon as it is given: running the same command again "
        "after an interruption resumes where it stopped. The evaluated questions are left out "
        "of the retrieval index (the index's knowledge base is written to <out>/index_kb.jsonl).",
        epilog="Modes: retrieval (best entry verbatim, no LLM), rag and rag_few_shot (base model "
        "with the retrieved entries, zero-/few-shot prompt), rag_lora (fine-tuned model with "
        "the retrieved entries), closed_book (the model alone). LLM modes cost seconds per "
        "question on a CPU: try --modes retrieval or --limit 10 first. Several --run give the "
        "comparison across runs (LoRA ranks, int8/int4 QLoRA).",
    )
    parser.add_argument(
        "--run",
        action="append",
        default=[],
        metavar="DIR",
        help="training run directory (runs/<name>: adapter.lora.h5, config.yaml, metrics.csv); "
        "repeat to compare runs",
    )
    parser.add_argument(
        "--adapter",
        metavar="DIR",
        help="adapter directory when no --run is given (default: the committed adapter if it "
        "exists; 'none' for no adapter)",
    )
    parser.add_argument(
        "--model",
        metavar="SPEC",
        help="base model spec for the modes without an adapter (default: the run's base model, "
        "else embedded:gemma3-270m)",
    )
    parser.add_argument(
        "--modes",
        default=",".join(MODES),
        help="comma-separated modes to evaluate (default: %(default)s)",
    )
    parser.add_argument(
        "--data",
        metavar="PATH",
        help="in-scope questions: a CSV/JSONL file or folder in the knowledge-base format "
        "(default: the held-out test: the knowledge base's test split and, with the committed "
        f"knowledge base, the blind test {BLIND_TEST_FILE.name})",
    )
    parser.add_argument(
        "--out-of-scope",
        metavar="PATH",
        help=f"out-of-scope messages (default: the test halves of {OUT_OF_SCOPE_FILE.name} and, "
        f"with the blind test, {BLIND_OUT_OF_SCOPE_FILE.name}; the guard calibrates on the other "
        "halves; 'none' to skip)",
    )
    parser.add_argument(
        "--kb", metavar="PATH", help="knowledge base to answer from (default: data/cse/kb)"
    )
    parser.add_argument(
        "--limit", type=int, metavar="N", help="only the first N in-scope questions"
    )
    parser.add_argument(
        "--out",
        metavar="DIR",
        help="report folder (default: reports/<run names or 'base'>; the same folder resumes)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)

    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = [m for m in modes if m not in MODES]
    if unknown or not modes:
        raise UserError(
            f"unknown mode(s) {', '.join(unknown) or '(none)'}; choose from {', '.join(MODES)}"
        )
    if args.limit is not None and args.limit < 1:
        raise UserError("--limit must be at least 1")
    adapters = [Path(r) for r in args.run]
    if not adapters and (args.adapter or "").lower() != "none":
        from gemma_cse.engine import DEFAULT_ADAPTER

        adapter = Path(args.adapter) if args.adapter else DEFAULT_ADAPTER
        if args.adapter and not adapter.is_dir():
            raise UserError(f"{adapter}: no such adapter directory")
        adapters = [adapter] if adapter.is_dir() else []
    for a in adapters:
        if not a.is_dir():
            raise UserError(f"{a}: no such run directory")
        if not (a / "adapter.lora.h5").is_file() and any(m in ADAPTER_MODES for m in modes):
            raise UserError(
                f"{a}: no adapter.lora.h5 (finish training or drop --modes rag_lora,closed_book)"
            )
    systems, notes = plan_systems(
        modes, adapters, args.model, explicit=args.modes != parser.get_default("modes")
    )
    oos = (
        "default"
        if args.out_of_scope is None
        else (None if args.out_of_scope.lower() == "none" else args.out_of_scope)
    )
    items, sources = load_items(args.data, oos, args.kb, seed=_seed_of(adapters), limit=args.limit)
    if not items:
        raise UserError("no questions to evaluate")
    name = "+".join(a.name for a in adapters if a.name) or "base"
    out_dir = Path(args.out) if args.out else Path("reports") / name
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"{out_dir}: exists and is not a folder (--out names the report folder)")
    print(
        f"evaluating {len(items)} questions ({sum(i.kind == IN_SCOPE for i in items)} in scope) "
        f"with {', '.join(s.label for s in systems)} → {out_dir}",
        file=sys.stderr,
    )
    for note in notes:
        print(f"note: {note}", file=sys.stderr)

    in_scope = [i.question for i in items if i.kind == IN_SCOPE]
    engines = Engines(args.kb, exclude=in_scope, index_kb=out_dir / "index_kb.jsonl")
    results = {}
    try:
        for system in systems:
            engine = engines.engine(system)
            results[system.label] = evaluate_mode(
                engine,
                items,
                out_dir / "cache" / f"{_safe(system.label)}.jsonl",
                label=system.label,
                entries=engines.entries,
                progress=not args.no_progress,
            )
    except KeyboardInterrupt:
        print(
            f"\nanswers so far are cached in {out_dir / 'cache'}; run the same command to resume",
            file=sys.stderr,
        )
        raise
    meta = {
        "in_scope_set": sources["in_scope"],
        "out_of_scope_set": sources["out_of_scope"],
        "limit": args.limit,
        "index": f"knowledge base without the {engines.removed} evaluated question variants "
        f"({engines.kb})"
        if engines.removed
        else f"knowledge base as is ({args.kb or 'data/cse/kb'})",
        "notes": "; ".join(notes) or None,
        "command": "python -m gemma_cse.evaluate "
        + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    meta = {k: v for k, v in meta.items() if v is not None}
    metrics = write_report(results, out_dir, adapters, embedder=_embedder(engines.base), meta=meta)
    for label, m in metrics["systems"].items():
        passed = sum(g["pass"] is True for g in m["goals"].values())
        known = sum(g["pass"] is not None for g in m["goals"].values())
        right = m["goals"]["right_topic"]
        spread = f" (95% CI {_fmt_interval(right)})" if right["ci95"] else ""
        if len(m["by_set"]) > 1:
            spread += (
                " ["
                + ", ".join(
                    f"{name} {_fmt(s['goals']['right_topic']['value'])}"
                    for name, s in m["by_set"].items()
                )
                + "]"
            )
        print(
            f"{label}: right topic {_fmt(m['right_topic'])}{spread}, "
            f"OOS F1 {_fmt(m['oos_f1'], 'f3')}, "
            f"false refusals {_fmt(m['false_refusal_rate'])}, faithful {_fmt(m['faithfulness'])}, "
            f"goals met {passed}/{known}"
        )
    print(f"report: {out_dir / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
