"""The answering engine: the one object the chat CLI, the API and the evaluation call.

message (+ history) → retrieval → guard → (answer mode) → faithfulness check → ``Reply``.
A generated answer whose checkable facts (URLs, e-mails, numbers, office and system names)
are not in its sources is not returned as is: the best source's answer is, marked
``fallback``. Modes, for the comparison the evaluation reports:

- ``retrieval``: the best entry's answer verbatim, no LLM;
- ``closed_book``: the model alone (as the earlier attempts did);
- ``rag`` / ``rag_few_shot``: the model with the retrieved entries in its prompt (prompting);
- ``rag_lora``: the fine-tuned model with the retrieved entries (default when an adapter exists).
"""

from __future__ import annotations

import re
import time
import unicodedata
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from pathlib import Path

from gemma_cse.cli import UserError
from gemma_cse.data import Entry, load_entries
from gemma_cse.generation import (
    FEW_SHOT,
    DecodingConfig,
    Generator,
    chat_prompt,
    grounded_message,
    prepare_for_decoding,
    vocabulary_for,
)
from gemma_cse.guard import Guard, reply_for
from gemma_cse.retrieval import Hit, Retriever

DEFAULT_ADAPTER = Path(__file__).resolve().parents[2] / "adapters" / "cse_gemma3_270m_rag"
SOURCES_IN_PROMPT = 1  # a 270M model copies from one source well, picks among two badly
MIN_SUPPORT = 0.6  # below this share of words found in the sources, an answer is not grounded


class Mode(StrEnum):
    retrieval = "retrieval"
    closed_book = "closed_book"
    rag = "rag"
    rag_few_shot = "rag_few_shot"
    rag_lora = "rag_lora"


class Status(StrEnum):
    answered = "answered"
    out_of_scope = "out_of_scope"
    refused = "refused"
    chitchat = "chitchat"
    self_harm = "self_harm"
    fallback = "fallback"


GUARD_STATUS = {
    "out_of_scope": Status.out_of_scope,
    "refuse": Status.refused,
    "chitchat": Status.chitchat,
    "self_harm": Status.self_harm,
}


@dataclass(frozen=True)
class Source:
    entry_id: str
    topic: str
    score: float


@dataclass(frozen=True)
class Timings:
    retrieval_ms: float = 0.0
    guard_ms: float = 0.0
    generation_ms: float = 0.0
    tokens_per_second: float = 0.0


@dataclass(frozen=True)
class Reply:
    text: str
    status: Status
    mode: str
    sources: list[Source] = field(default_factory=list)
    timings: Timings = Timings()
    model: str = ""
    adapter: str | None = None
    new_tokens: int = 0
    stopped: bool = True  # ended on its own end-of-turn token
    unsupported_facts: list[str] = field(default_factory=list)
    guard_reason: str = ""
    draft: str = ""  # what the model generated, kept when a fallback replaced it
    repetition_cut: bool = False

    def to_dict(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------- faithfulness

_FACT_PATTERNS = (
    r"https?://[^\s)\],;]+[^\s)\],;.]",  # URLs
    r"[\w.+-]+@[\w-]+(?:\.[\w-]+)+",  # e-mail addresses
    r"\b\d+(?:[.,:/]\d+)*\b",  # amounts, dates, times, percentages
    r"\b[A-ZÁÉÍÓÚÑ]{2,6}\b",  # acronyms: SEL, DTI, IMSS, CURP...
    r"\b(?:Coordinación|Dirección|Secretaría|Defensoría|Caja|Oficina|Departamento|Sistema)"
    r"(?:\s+(?:de(?:l| la| los)?|[A-ZÁÉÍÓÚ][\wáéíóúñ]+))+",  # office and system names
)


def _fold(text: str) -> str:
    text = unicodedata.normalize("NFKD", text.casefold())
    return " ".join("".join(c for c in text if not unicodedata.combining(c)).split())


def checkable_facts(text: str) -> list[str]:
    """URLs, e-mails, numbers, acronyms and office/system names stated in ``text``."""
    facts = []
    for pattern in _FACT_PATTERNS:
        facts += [m.group(0).strip() for m in re.finditer(pattern, text)]
    return list(dict.fromkeys(f for f in facts if f))


def support_ratio(answer: str, sources: Sequence[Entry]) -> float:
    """Share of the answer's content words (over four letters) that occur in the sources."""
    words = {w for w in re.findall(r"\w{5,}", _fold(answer))}
    if not words:
        return 0.0
    haystack = set(
        re.findall(r"\w{5,}", _fold(" ".join(f"{e.question} {e.answer}" for e in sources)))
    )
    return len(words & haystack) / len(words)


def unsupported_facts(answer: str, sources: Sequence[Entry]) -> list[str]:
    """The checkable facts of ``answer`` that appear in none of ``sources``."""
    haystack = _fold(" ".join(f"{e.question} {e.answer} {e.source}" for e in sources))
    return [f for f in checkable_facts(answer) if _fold(f).rstrip("./") not in haystack]


# ---------------------------------------------------------------- engine


def load_generator(model: str, adapter: Path | None, entries: Sequence[Entry], decoding):
    """The causal LM (with the LoRA adapter of a run, if any) ready for fast decoding."""
    if adapter:
        from gemma_cse.config import load_config
        from gemma_cse.train import build_model

        causal_lm = build_model(load_config(adapter / "config.yaml"), training=False)
        causal_lm.backbone.load_lora_weights(str(adapter / "adapter.lora.h5"))
    else:
        from gemma_cse.models import load_causal_lm

        causal_lm = load_causal_lm(model)
    tokenizer = causal_lm.preprocessor.tokenizer
    texts = [t for e in entries for t in (*e.questions, e.answer, e.source)]
    prepare_for_decoding(causal_lm, vocabulary_for(tokenizer, texts + [FEW_SHOT[0][1]]))
    return Generator(causal_lm, decoding)


class Engine:
    """Answers one message at a time; build it once (models and index load here)."""

    def __init__(
        self,
        retriever: Retriever,
        guard: Guard,
        generator: Generator | None = None,
        mode: Mode = Mode.rag_lora,
        model: str = "",
        adapter: str | None = None,
    ):
        if mode != Mode.retrieval and generator is None:
            raise ValueError(f"mode {mode} needs a generator")
        self.retriever, self.guard, self.generator = retriever, guard, generator
        self.mode, self.model, self.adapter = Mode(mode), model, adapter

    @classmethod
    def build(
        cls,
        mode: Mode | str = Mode.rag_lora,
        model: str | None = None,
        adapter: str | Path | None = DEFAULT_ADAPTER,
        kb: str | Path | None = None,
        decoding: DecodingConfig | None = None,
    ) -> Engine:
        """Everything from defaults: knowledge base, index + guard thresholds, model, adapter."""
        from gemma_cse.models import EMBEDDED

        mode = Mode(mode)
        uses_adapter = mode in (Mode.rag_lora, Mode.closed_book)
        adapter = Path(adapter) if adapter and uses_adapter else None
        # the checks come before the slow parts (index, guard calibration, model)
        if mode == Mode.rag_lora and adapter is None:
            raise UserError("mode rag_lora needs an adapter; for the base model use mode rag")
        if adapter and not (adapter / "adapter.lora.h5").is_file():
            raise UserError(f"{adapter}: no adapter.lora.h5 (train a run or pass --adapter none)")
        entries = load_entries(kb) if kb else load_entries()
        retriever = Retriever.cached(entries)
        guard = Guard.calibrated(retriever, entries)
        model = model or EMBEDDED
        generator = (
            None
            if mode == Mode.retrieval
            else load_generator(model, adapter, entries, decoding or DecodingConfig())
        )
        return cls(retriever, guard, generator, mode, model, str(adapter) if adapter else None)

    def answer(self, message: str, history: Sequence[tuple[str, str]] = ()) -> Reply:
        start = time.perf_counter()
        query = (
            message if len(message.split()) > 3 or not history else f"{history[-1][0]} {message}"
        )
        hits: list[Hit] = self.retriever.search(query, k=3)
        retrieved = time.perf_counter()
        decision = self.guard.classify(message, hits)
        guarded = time.perf_counter()
        timings = dict(retrieval_ms=(retrieved - start) * 1e3, guard_ms=(guarded - retrieved) * 1e3)
        common = dict(mode=self.mode.value, model=self.model, adapter=self.adapter)
        if decision.label != "answer":
            return Reply(
                reply_for(decision),
                GUARD_STATUS[decision.label],
                timings=Timings(**timings),
                guard_reason=decision.reason,
                **common,
            )
        sources = [Source(h.entry.id, h.entry.topic, round(h.score, 4)) for h in hits]
        best = hits[0].entry
        if self.mode == Mode.retrieval:
            return Reply(
                best.answer, Status.answered, sources=sources, timings=Timings(**timings), **common
            )

        grounding = [h.entry for h in hits[:SOURCES_IN_PROMPT]]
        tokenizer = self.generator.tokenizer
        if self.mode == Mode.closed_book:
            prompt = chat_prompt(tokenizer, history, message)
        else:
            shots = list(FEW_SHOT) if self.mode == Mode.rag_few_shot else []
            prompt = chat_prompt(
                tokenizer, [*shots, *history], grounded_message(message, grounding)
            )
        generation = self.generator.generate(prompt)
        timings |= dict(
            generation_ms=generation.seconds * 1e3, tokens_per_second=generation.tokens_per_second
        )
        missing = unsupported_facts(generation.text, grounding)
        status = Status.answered
        text = generation.text
        grounded = support_ratio(text, grounding) >= MIN_SUPPORT
        if missing or not grounded or not generation.stopped:
            text, status = best.answer, Status.fallback
        return Reply(
            text,
            status,
            sources=sources,
            timings=Timings(**timings),
            new_tokens=generation.new_tokens,
            stopped=generation.stopped,
            unsupported_facts=missing,
            draft=generation.text,
            repetition_cut=generation.repetition_cut,
            **common,
        )
