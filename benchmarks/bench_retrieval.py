"""Retrieval quality and latency per scorer, field and fusion, on questions the index has not seen.

The index holds only the ``train`` questions of each entry (``make_splits``), with the entry's
answer and topic description; the queries are the one held-out variant per entry of
``validation`` and ``test`` (132 each), and the blind test (264,
``data/cse/blind_test.jsonl``). Prints, per configuration: hit@1, hit@3 and MRR on each set,
topic@1 (test: right topic, any of its entries), AUROC of the top score for test questions vs
``out_of_scope.jsonl`` (all kinds, and near misses only: can a guard threshold it?), and
p50/p95 milliseconds per ``search(k=3)`` on the test questions with a cold query-embedding
cache (a new question each time), wall clock and CPU time (the CPU figure is what a query
costs without other jobs competing for the cores).

``--every-variant``: the instrument that decides knowledge-base changes. Every variant of every
entry outside the seed-13 test split is asked exactly once, of an index built without its fold
(5 folds, the default configuration); no question counts twice, as it can over seeded splits.

Usage: python benchmarks/bench_retrieval.py [--embedders use,e5] [--grid] [--every-variant]
       [--latency-queries N]
(e5 embeds ~1.3k texts: about 1–2 minutes on 2 cores; --every-variant about 4 minutes.)
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import random
import time

import numpy as np
from sklearn.metrics import roc_auc_score

from gemma_cse.data import load_blind_test, load_entries, load_out_of_scope, make_splits
from gemma_cse.retrieval import (
    DEFAULT_FIELDS,
    DEFAULT_WEIGHTS,
    Retriever,
    get_embedder,
    train_entries,
)

QUESTIONS_ONLY = (1.0, 0.0, 0.0)


def rank_of(fused: np.ndarray, gold: int) -> int:
    """1-based rank of ``gold`` as ``search`` orders entries (ties broken by index)."""
    return 1 + int((fused > fused[gold]).sum() + (fused[:gold] == fused[gold]).sum())


def metrics(ranks: list[int]) -> tuple[float, float, float]:
    r = np.asarray(ranks)
    return float((r == 1).mean()), float((r <= 3).mean()), float((1.0 / r).mean())


def auroc(inside: list[float], outside: list[float]) -> float:
    labels = [1] * len(inside) + [0] * len(outside)
    return float(roc_auc_score(labels, inside + outside))


class Memo:
    """An embedder that embeds each distinct text once (the grid rebuilds indexes per seed)."""

    def __init__(self, embedder):
        self.embedder, self.name, self.vectors = embedder, embedder.name, {}

    def embed(self, texts):
        new = [t for t in dict.fromkeys(texts) if t not in self.vectors]
        if new:
            self.vectors.update(zip(new, self.embedder.embed(new), strict=True))
        return np.stack([self.vectors[t] for t in texts])


class Evaluation:
    """Pooled parts per query computed once per base retriever; fusions scored from them."""

    def __init__(
        self,
        base: Retriever,
        query_sets: dict[str, list],
        out_of_scope: list[str],
        exclude=frozenset(),
    ):
        self.base = base
        self.index = {e.id: i for i, e in enumerate(base.entries)}
        self.queries = {
            name: [
                (ex.question, self.index[ex.entry.id])
                for ex in examples
                if ex.question not in exclude
            ]
            for name, examples in query_sets.items()
        }
        texts = [q for qs in self.queries.values() for q, _ in qs] + out_of_scope
        self.pooled = {text: base.entry_scores(text)[1] for text in dict.fromkeys(texts)}
        self.out_of_scope = out_of_scope

    def score(self, retriever: Retriever, near_miss: list[str]) -> dict[str, float]:
        """Ranking figures per query set; AUROC of the top score, the test questions (else the
        first set's) vs the out-of-scope texts; topic@1 on test."""
        row = {}
        fused = {t: retriever.fuse(p) for t, p in self.pooled.items()}
        first = next(iter(self.queries.values()))
        for split, queries in self.queries.items():
            ranks = [rank_of(fused[q], gold) for q, gold in queries]
            names = (f"{split}_hit1", f"{split}_hit3", f"{split}_mrr")
            row.update(zip(names, metrics(ranks), strict=True))
        inside = [float(fused[q].max()) for q, _ in self.queries.get("test", first)]
        for name, outside in (("auroc_oos", self.out_of_scope), ("auroc_near", near_miss)):
            if outside:
                row[name] = auroc(inside, [float(fused[t].max()) for t in outside])
        if "test" in self.queries:
            topics = [e.topic for e in self.base.entries]
            row["test_topic1"] = float(
                np.mean(
                    [
                        topics[int(np.argmax(fused[q]))] == topics[gold]
                        for q, gold in self.queries["test"]
                    ]
                )
            )
        return row


def latency(retriever: Retriever, texts: list[str]) -> tuple[float, float, float]:
    """Wall p50, wall p95 and CPU p95 ms of ``search(text, 3)``, each query embedded anew.

    CPU time (all threads of the process) shows the cost without other jobs' contention.
    """
    retriever.search(texts[0], 3)  # model loaded, code paths warm
    wall, cpu = [], []
    for text in texts:
        if retriever.cache is not None:
            retriever.cache.clear()
        start, start_cpu = time.perf_counter(), time.process_time()
        retriever.search(text, 3)
        wall.append((time.perf_counter() - start) * 1e3)
        cpu.append((time.process_time() - start_cpu) * 1e3)
    p50, p95 = np.percentile(wall, [50, 95])
    return float(p50), float(p95), float(np.percentile(cpu, 95))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], epilog="See the module docstring for the columns."
    )
    parser.add_argument(
        "--embedders", default="use,e5", help="comma-separated: use, e5 (default: %(default)s)"
    )
    parser.add_argument(
        "--grid",
        action="store_true",
        help="also choose field and fusion weights (0.1 steps) on the validation splits of "
        "--grid-seeds",
    )
    parser.add_argument(
        "--grid-seeds",
        default="13,1,2,3,4",
        help="splits whose validation questions choose the weights (default: %(default)s)",
    )
    parser.add_argument(
        "--every-variant",
        action="store_true",
        help="only ask every non-test variant once, of an index without its fold (5 folds)",
    )
    parser.add_argument(
        "--latency-queries",
        type=int,
        default=132,
        help="test questions timed per configuration (default: %(default)s)",
    )
    args = parser.parse_args()
    embedders = [e for e in args.embedders.split(",") if e]
    if args.every_variant:
        every_variant()
        return

    kb = load_entries()
    splits = make_splits(kb)
    entries = train_entries(splits)
    query_sets = {
        "validation": splits.validation,
        "test": splits.test,
        "blind": load_blind_test(kb),
    }
    items = load_out_of_scope()
    out_of_scope = [o.text for o in items]
    near_miss = [o.text for o in items if o.kind == "near_miss"]
    timed = [ex.question for ex in splits.test][: args.latency_queries]
    print(
        f"index: {len(entries)} entries, {sum(len(e.questions) for e in entries)} train questions;"
        f" queries: {len(splits.validation)} validation, {len(splits.test)} test,"
        f" {len(query_sets['blind'])} blind test;"
        f" out of scope: {len(out_of_scope)} ({len(near_miss)} near misses)"
    )

    bases: dict[str, Retriever] = {}
    for key, embedder, spelling in (
        ("accents", None, False),
        ("lexical", None, True),
        *((name, name, True) for name in embedders),
    ):
        start = time.perf_counter()
        bases[key] = Retriever(entries, embedder, spelling=spelling)
        print(f"built {key} index in {time.perf_counter() - start:.1f} s")

    q = QUESTIONS_ONLY
    configs = [  # label, base, weights (bm25, char, semantic, classifier), fusion, fields
        ("BM25, questions (accent folding only)", "accents", (1, 0, 0), "weighted", q),
        ("BM25, questions", "lexical", (1, 0, 0), "weighted", q),
        ("char 3-5, questions", "lexical", (0, 1, 0), "weighted", q),
        ("BM25+char, questions", "lexical", (0.6, 0.4, 0), "weighted", q),
        ("BM25+char, all fields", "lexical", (0.6, 0.4, 0), "weighted", None),
        ("classifier (lexical features)", "lexical", (0, 0, 0, 1), "weighted", None),
        ("BM25+char+classifier", "lexical", DEFAULT_WEIGHTS[None], "weighted", None),
    ]
    for name in embedders:
        w = DEFAULT_WEIGHTS[name]
        configs += [
            (f"{name} alone, questions", name, (0, 0, 1), "weighted", q),
            (f"BM25+char+{name}, questions", name, (0.5, 0.3, 0.2), "weighted", q),
            (f"BM25+char+{name}, all fields", name, w[:3], "weighted", None),
            (f"classifier (with {name})", name, (0, 0, 0, 1), "weighted", None),
            (f"BM25+char+{name}+classifier", name, w, "weighted", None),
            (f"BM25+char+{name}+classifier RRF", name, (1, 1, 1, 1), "rrf", None),
        ]

    evaluations = {key: Evaluation(base, query_sets, out_of_scope) for key, base in bases.items()}
    header = (
        f"{'configuration':38s} {'weights':>18s} | {'val h@1':>7s} {'h@3':>5s} {'MRR':>5s} | "
        f"{'test h@1':>8s} {'h@3':>5s} {'MRR':>5s} {'topic@1':>7s} | "
        f"{'blind h@1':>9s} {'h@3':>5s} {'MRR':>5s} | {'AUROC oos':>9s} "
        f"{'near':>5s} | {'p50 ms':>6s} {'p95 ms':>6s} {'cpu p95':>7s}"
    )
    print(f"\nfields (question/answer/topic) unless 'questions': {DEFAULT_FIELDS}")
    print(header + "\n" + "-" * len(header))
    for label, key, weights, fusion, fields in configs:
        retriever = bases[key].with_weights(weights, fusion, fields=fields or DEFAULT_FIELDS)
        row = evaluations[key].score(retriever, near_miss)
        p50, p95, cpu95 = latency(retriever, timed)
        shown = "/".join(f"{w:.2g}" for w in retriever.weights)
        print(
            f"{label:38s} {shown:>18s} | {row['validation_hit1']:7.3f} "
            f"{row['validation_hit3']:5.3f} {row['validation_mrr']:5.3f} | "
            f"{row['test_hit1']:8.3f} {row['test_hit3']:5.3f} {row['test_mrr']:5.3f} "
            f"{row['test_topic1']:7.3f} | {row['blind_hit1']:9.3f} {row['blind_hit3']:5.3f} "
            f"{row['blind_mrr']:5.3f} | {row['auroc_oos']:9.3f} {row['auroc_near']:5.3f} | "
            f"{p50:6.1f} {p95:6.1f} {cpu95:7.1f}"
        )

    if args.grid:
        grid(args, embedders, out_of_scope)


def grid(args, embedders: list[str], out_of_scope: list[str]) -> None:
    """Field and fusion weights by validation MRR pooled over several seeds' splits (less
    noise than 132 queries), with the AUROC of validation questions vs out-of-scope texts;
    questions in the seed-13 test split are never used as queries here."""
    entries = load_entries()
    seeds = [int(s) for s in args.grid_seeds.split(",")]
    test_questions = frozenset(ex.question for ex in make_splits(entries).test)
    print(f"\nweight grid, weighted fusion, validation of seeds {seeds} (seed-13 test excluded):")
    for name in [None, *embedders]:
        embedder = Memo(get_embedder(name)) if name else None
        evaluations = []
        for seed in seeds:
            splits = make_splits(entries, seed=seed)
            base = Retriever(train_entries(splits), embedder)
            evaluations.append(
                Evaluation(
                    base, {"validation": splits.validation}, out_of_scope, exclude=test_questions
                )
            )
        grid_for(name, evaluations)


FOLDS = 5


def every_variant() -> None:
    """Each non-test variant asked once, of the KB without the seed-13 test variants and
    without the variants of the query's fold (each entry's variants shuffled by its id)."""
    entries = load_entries()
    test_questions = frozenset(ex.question for ex in make_splits(entries).test)
    pool = {}
    for entry in entries:
        pool[entry.id] = [v for v in entry.variants if v not in test_questions]
        random.Random(entry.id).shuffle(pool[entry.id])
    ranks, topics = [], []
    for fold in range(FOLDS):
        held = {key: variants[fold::FOLDS] for key, variants in pool.items()}
        retriever = Retriever(
            [
                dataclasses.replace(e, variants=tuple(v for v in pool[e.id] if v not in held[e.id]))
                for e in entries
            ]
        )
        for gold, entry in enumerate(retriever.entries):
            for question in held[entry.id]:
                fused = retriever.entry_scores(question)[0]
                ranks.append(rank_of(fused, gold))
                topics.append(retriever.entries[int(np.argmax(fused))].topic == entry.topic)
        print(f"fold {fold + 1}/{FOLDS}: {len(ranks)} questions asked", flush=True)
    hit1, hit3, mrr = metrics(ranks)
    print(
        f"every non-test variant once ({len(ranks)} questions, {FOLDS} folds): hit@1 {hit1:.3f} "
        f"hit@3 {hit3:.3f} MRR {mrr:.3f} topic@1 {np.mean(topics):.3f}"
    )


STEPS = np.round(np.arange(0, 1.01, 0.1), 2)
SIMPLEX = [  # three weights summing to 1, in 0.1 steps
    (float(a), float(b), round(1.0 - a - b, 2))
    for a, b in itertools.product(STEPS, STEPS)
    if a + b <= 1.0 + 1e-9
]


def grid_for(name: str | None, evaluations: list[Evaluation]) -> None:
    sizes = [len(e.queries["validation"]) for e in evaluations]

    def figures(fields, weights) -> list[float]:
        rows = [e.score(e.base.with_weights(weights, fields=fields), []) for e in evaluations]
        keys = ("validation_hit1", "validation_hit3", "validation_mrr", "auroc_oos")
        return [float(np.average([row[k] for row in rows], weights=sizes)) for k in keys]

    def show(title, rows, also=()):
        print(f"  {name or 'lexical'} ({sum(sizes)} validation queries), {title}")
        for key in [*sorted(rows, key=lambda k: -rows[k][2])[:5], *also]:
            hit1, hit3, mrr, auc = rows[key]
            shown = "  ".join("/".join(f"{w:.2f}" for w in part) for part in key)
            print(f"    {shown}: hit@1 {hit1:.3f} hit@3 {hit3:.3f} MRR {mrr:.3f} AUROC {auc:.3f}")

    # 1. fields and the classifier's weight, the scorers in their default proportions
    default = np.asarray(DEFAULT_WEIGHTS[name])
    scorers = default[:3] / default[:3].sum()
    rows = {}
    for fields in SIMPLEX:
        for w_classifier in (0.0, 0.1, 0.2, 0.3, 0.4, 1.0):
            weights = (*(scorers * (1 - w_classifier)).round(3), w_classifier)
            rows[(fields, weights)] = figures(fields, weights)
    reference = [(QUESTIONS_ONLY, (*scorers.round(3), 0.0)), (DEFAULT_FIELDS, tuple(default))]
    for key in reference:
        rows.setdefault(key, figures(*key))
    show(
        "fields (question/answer/topic) and weights (bm25/char/semantic/classifier), best 5 "
        "by MRR, then questions alone without the classifier, and the default:",
        rows,
        reference,
    )
    # 2. the scorers' proportions, with the default fields and classifier weight
    rows = {}
    for bm25, char, semantic in SIMPLEX:
        if name is None and semantic > 0:
            continue
        weights = (*(np.array([bm25, char, semantic]) * (1 - default[3])).round(3), default[3])
        rows[(DEFAULT_FIELDS, weights)] = figures(DEFAULT_FIELDS, weights)
    show("scorer weights with the default fields and classifier weight, best 5 by MRR:", rows)


if __name__ == "__main__":
    main()
