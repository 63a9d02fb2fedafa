"""Retrieval quality and latency per scorer and fusion, on questions the index has not seen.

The index holds only the ``train`` questions of each entry (``make_splits``); the queries are
the one held-out variant per entry of ``validation`` and ``test`` (132 each). Prints, per
configuration: hit@1, hit@3 and MRR on both splits, topic@1 (test: right topic, any of its
entries), AUROC of the top score for test questions vs ``out_of_scope.jsonl`` (all kinds, and
near misses only: can a guard threshold it?), and p50/p95 milliseconds per ``search(k=3)`` on
the test questions with a cold query-embedding cache (a new question each time), wall clock
and CPU time (the CPU figure is what a query costs without other jobs competing for the cores).

Usage: python benchmarks/bench_retrieval.py [--embedders use,e5] [--grid] [--latency-queries N]
(e5 embeds ~1.3k texts: about 1–2 minutes on 2 cores.)
"""

from __future__ import annotations

import argparse
import itertools
import time

import numpy as np
from sklearn.metrics import roc_auc_score

from gemma_cse.data import load_entries, load_out_of_scope, make_splits
from gemma_cse.retrieval import DEFAULT_WEIGHTS, Retriever, get_embedder, train_entries


def rank_of(fused: np.ndarray, gold: int) -> int:
    """1-based rank of ``gold`` as ``search`` orders entries (ties broken by index)."""
    return 1 + int((fused > fused[gold]).sum() + (fused[:gold] == fused[gold]).sum())


def metrics(ranks: list[int]) -> tuple[float, float, float]:
    r = np.asarray(ranks)
    return float((r == 1).mean()), float((r <= 3).mean()), float((1.0 / r).mean())


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
        splits,
        out_of_scope: list[str],
        names=("validation", "test"),
        exclude=frozenset(),
    ):
        self.base = base
        self.index = {e.id: i for i, e in enumerate(base.entries)}
        self.queries = {
            name: [
                (ex.question, self.index[ex.entry.id])
                for ex in getattr(splits, name)
                if ex.question not in exclude
            ]
            for name in names
        }
        texts = [q for qs in self.queries.values() for q, _ in qs] + out_of_scope
        self.pooled = {text: base.entry_scores(text)[1] for text in dict.fromkeys(texts)}
        self.out_of_scope = out_of_scope

    def score(self, retriever: Retriever, near_miss: list[str]) -> dict[str, float]:
        row = {}
        fused = {t: retriever.fuse(p) for t, p in self.pooled.items()}
        for split, queries in self.queries.items():
            ranks = [rank_of(fused[q], gold) for q, gold in queries]
            names = (f"{split}_hit1", f"{split}_hit3", f"{split}_mrr")
            row.update(zip(names, metrics(ranks), strict=True))
        if "test" not in self.queries:
            return row
        topics = [e.topic for e in self.base.entries]
        row["test_topic1"] = float(
            np.mean(
                [
                    topics[int(np.argmax(fused[q]))] == topics[gold]
                    for q, gold in self.queries["test"]
                ]
            )
        )
        inside = [float(fused[q].max()) for q, _ in self.queries["test"]]
        for name, outside in (("auroc_oos", self.out_of_scope), ("auroc_near", near_miss)):
            scores = inside + [float(fused[t].max()) for t in outside]
            labels = [1] * len(inside) + [0] * len(outside)
            row[name] = float(roc_auc_score(labels, scores))
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
        help="also choose fusion weights (0.1 steps) on the validation splits of --grid-seeds",
    )
    parser.add_argument(
        "--grid-seeds",
        default="13,1,2,3,4",
        help="splits whose validation questions choose the weights (default: %(default)s)",
    )
    parser.add_argument(
        "--latency-queries",
        type=int,
        default=132,
        help="test questions timed per configuration (default: %(default)s)",
    )
    args = parser.parse_args()
    embedders = [e for e in args.embedders.split(",") if e]

    splits = make_splits(load_entries())
    entries = train_entries(splits)
    items = load_out_of_scope()
    out_of_scope = [o.text for o in items]
    near_miss = [o.text for o in items if o.kind == "near_miss"]
    timed = [ex.question for ex in splits.test][: args.latency_queries]
    print(
        f"index: {len(entries)} entries, {sum(len(e.questions) for e in entries)} train questions;"
        f" queries: {len(splits.validation)} validation, {len(splits.test)} test;"
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

    configs = [
        ("BM25 (accent folding only)", "accents", (1, 0, 0), "weighted"),
        ("char 3-5 (accent folding only)", "accents", (0, 1, 0), "weighted"),
        ("BM25", "lexical", (1, 0, 0), "weighted"),
        ("char 3-5", "lexical", (0, 1, 0), "weighted"),
        ("BM25+char weighted", "lexical", DEFAULT_WEIGHTS[None], "weighted"),
        ("BM25+char RRF", "lexical", (1, 1, 0), "rrf"),
    ]
    for name in embedders:
        configs += [
            (f"{name} alone", name, (0, 0, 1), "weighted"),
            (f"BM25+char+{name} weighted", name, DEFAULT_WEIGHTS[name], "weighted"),
            (f"BM25+char+{name} RRF", name, (1, 1, 1), "rrf"),
        ]

    evaluations = {key: Evaluation(base, splits, out_of_scope) for key, base in bases.items()}
    header = (
        f"{'configuration':34s} {'weights':>14s} | {'val h@1':>7s} {'h@3':>5s} {'MRR':>5s} | "
        f"{'test h@1':>8s} {'h@3':>5s} {'MRR':>5s} {'topic@1':>7s} | {'AUROC oos':>9s} "
        f"{'near':>5s} | {'p50 ms':>6s} {'p95 ms':>6s} {'cpu p95':>7s}"
    )
    print("\n" + header + "\n" + "-" * len(header))
    for label, key, weights, fusion in configs:
        retriever = bases[key].with_weights(weights, fusion)
        row = evaluations[key].score(retriever, near_miss)
        p50, p95, cpu95 = latency(retriever, timed)
        shown = "/".join(f"{w:.2g}" for w in retriever.weights)
        print(
            f"{label:34s} {shown:>14s} | {row['validation_hit1']:7.3f} "
            f"{row['validation_hit3']:5.3f} {row['validation_mrr']:5.3f} | "
            f"{row['test_hit1']:8.3f} {row['test_hit3']:5.3f} {row['test_mrr']:5.3f} "
            f"{row['test_topic1']:7.3f} | {row['auroc_oos']:9.3f} {row['auroc_near']:5.3f} | "
            f"{p50:6.1f} {p95:6.1f} {cpu95:7.1f}"
        )

    if args.grid:
        grid(args, embedders, near_miss)


def grid(args, embedders: list[str], near_miss: list[str]) -> None:
    """Fusion weights by validation MRR pooled over several seeds' splits (less noise than
    132 queries); questions in the seed-13 test split are never used as queries here."""
    entries = load_entries()
    seeds = [int(s) for s in args.grid_seeds.split(",")]
    test_questions = frozenset(ex.question for ex in make_splits(entries).test)
    steps = np.round(np.arange(0, 1.01, 0.1), 2)
    print(f"\nweight grid, weighted fusion, validation of seeds {seeds} (seed-13 test excluded):")
    for name in [None, *embedders]:
        embedder = Memo(get_embedder(name)) if name else None
        evaluations = []
        for seed in seeds:
            splits = make_splits(entries, seed=seed)
            base = Retriever(train_entries(splits), embedder)
            evaluations.append(
                Evaluation(base, splits, [], names=["validation"], exclude=test_questions)
            )
        queries = sum(len(e.queries["validation"]) for e in evaluations)
        rows = {}
        for w_bm25, w_char in itertools.product(steps, steps):
            w_semantic = 0.0 if name is None else round(1 - w_bm25 - w_char, 2)
            if w_semantic < 0 or (name is None and w_bm25 + w_char != 1):
                continue
            weights = (float(w_bm25), float(w_char), float(w_semantic))
            scores = [e.score(e.base.with_weights(weights), near_miss) for e in evaluations]
            sizes = [len(e.queries["validation"]) for e in evaluations]
            rows[weights] = [
                float(np.average([s[key] for s in scores], weights=sizes))
                for key in ("validation_hit1", "validation_hit3", "validation_mrr")
            ]
        best = sorted(rows, key=lambda w: -rows[w][2])[:5]
        alone = [(1.0, 0.0, 0.0), (0.0, 1.0, 0.0)] if name is None else [(0.0, 0.0, 1.0)]
        print(f"  {name or 'lexical'} ({queries} validation queries), best 5 by MRR, then alone:")
        for weights in [*best, *alone]:
            hit1, hit3, mrr = rows[weights]
            shown = "/".join(f"{w:.1f}" for w in weights)
            print(f"    {shown}: hit@1 {hit1:.3f} hit@3 {hit3:.3f} MRR {mrr:.3f}")


if __name__ == "__main__":
    main()
