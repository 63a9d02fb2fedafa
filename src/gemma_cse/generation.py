"""Grounded generation: prompts in the model's chat format, bounded decoding that stops at
end-of-turn, a guard against repetition loops, and a faster output layer.

Speed, on a CPU (``prepare_for_decoding``): a plain decode step of Gemma 3 270M reads the
262k × 640 output projection, copies every attention kernel into another layout, and adds
the LoRA product to the kernels it adapts. We merge LoRA into the kernels once, compute the
attention projections as matmuls over the kernels as stored (``HeadsProjection``), and
score only the tokens the knowledge base uses (``restrict_vocabulary``; every other token
stays at -inf). Greedy decoding of Gemma 3 then uses prompt-lookup decoding
(``Generator``): grounded answers copy long spans of their sources, so the tokens that
followed the last few generated tokens in the prompt are drafted and one forward pass checks
them all; a step reads the weights once whether it checks 1 token or 8, and the output is
the greedy one (within the copy budget below). Lengths are padded to buckets so compiled
functions are reused across requests instead of recompiled.

Loops: a grounded answer that copies a passage of its source sometimes jumps back to the
passage's start and copies it again, forever. The lookup decoder keeps a copy budget
(``CopyBudget``): a 4-token passage of the prompt may be generated as many times as the
prompt holds it. When the best token would copy one once more, the repeat is revised where
it began: that position takes the model's second choice (``lookup_decode``; e.g. "...tu
proyecto; el informe final describe..." again becomes "...tu proyecto; el formato...", as
the source goes on). Text not in the prompt is not budgeted (``cut_repetition`` cuts it).
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import keras
import numpy as np
from keras import ops

from gemma_cse.data import CHAT_FORMATS, Entry, chat_family, stop_token_id

LENGTH_BUCKET = 128  # total sequence lengths are multiples of this: few compiled shapes
PREFILL_CHUNK = 64  # prompt tokens per forward pass when filling the cache
LOOKUP_TOKENS = 8  # tokens one prompt-lookup step checks: the last token + 7 drafted
LOOKUP_NGRAM = 3  # longest suffix of the text looked up in the prompt and answer so far
COPY_NGRAM = 4  # tokens of a copied passage counted by the copy budget (``CopyBudget``)

INSTRUCTIONS = (
    "Eres el asistente virtual de la Coordinación de Sistemas Escolares (CSE) de la "
    "Universidad. Responde en español, de tú, en una a cuatro oraciones, usando solo la "
    "información de las fuentes. No inventes montos, fechas, enlaces ni oficinas. Si las "
    "fuentes no responden la pregunta, dilo y sugiere escribir a cse@universidad.example."
)
FEW_SHOT = (
    (
        "¿Dónde veo mis calificaciones?",
        "Consulta tus calificaciones en el SEL (https://sel.universidad.example), en el apartado "
        "Calificaciones, a partir de la fecha que marca el calendario escolar.",
    ),
)


@dataclass(frozen=True)
class DecodingConfig:
    """Sane defaults: greedy, short answers. temperature > 0 switches to top-k/top-p sampling."""

    max_new_tokens: int = 192  # the knowledge base's answers take up to 158 tokens (30% over 128)
    temperature: float = 0.0
    top_k: int = 40
    top_p: float = 0.9
    seed: int = 0


@dataclass(frozen=True)
class Generation:
    text: str
    new_tokens: int
    stopped: bool  # ended on the end-of-turn token (not cut by the length bound)
    repetition_cut: bool
    seconds: float
    forward_passes: int = 0  # decode steps (prompt-lookup: < new_tokens when drafts hit)
    token_ids: tuple[int, ...] = ()  # the new tokens, without the stop token

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds else 0.0


class SubsetOutput(keras.layers.Layer):
    """The token embedding, but its reverse (output) projection scores only ``token_ids``."""

    def __init__(self, embedding, token_ids: np.ndarray, vocabulary_size: int, **kwargs):
        super().__init__(name="subset_output", dtype=embedding.dtype_policy, **kwargs)
        self.embedding = embedding
        self.token_ids = np.asarray(token_ids, "int32")
        self.vocabulary_size = vocabulary_size

    def subset_scores(self, inputs):
        """Logits (before soft-capping) of the subset's tokens only, in ``token_ids`` order."""
        rows = ops.take(self.embedding.embeddings, self.token_ids, axis=0)
        return ops.einsum("...h,vh->...v", inputs, ops.cast(rows, inputs.dtype))

    def call(self, inputs, reverse=False):
        if not reverse:
            return self.embedding(inputs)
        logits = self.subset_scores(inputs)
        cap = getattr(self.embedding, "logit_soft_cap", None)
        if cap is not None:
            logits = ops.tanh(logits / cap) * cap
        columns = ops.moveaxis(logits, -1, 0)  # scatter rows: (v', ...) into (V, ...)
        full = ops.full((self.vocabulary_size, *ops.shape(columns)[1:]), -1e9, logits.dtype)
        full = ops.scatter_update(full, self.token_ids[:, None], columns)
        return ops.moveaxis(full, 0, -1)  # tokens outside the subset stay at -1e9


class HeadsProjection(keras.layers.Layer):
    """An attention ``EinsumDense`` computed as matmuls that read its kernel as stored.

    For ``btd,ndh->btnh`` (query) and ``btnh,nhd->btd`` (output) XLA on CPU copies the
    kernel into a (in, out) layout at every decode step: 13 of 28 ms a token on the embedded
    model. A matmul batched over heads (query) or over the flattened heads (output) reads
    the same weights in place. ``dense.kernel`` includes LoRA if it is still enabled.
    """

    EQUATIONS = ("btd,ndh->btnh", "btnh,nhd->btd")

    def __init__(self, dense, **kwargs):
        super().__init__(name=f"{dense.name}_heads", dtype=dense.dtype_policy, **kwargs)
        self.dense = dense

    def call(self, x):
        kernel = ops.cast(self.dense.kernel, x.dtype)
        batch, length = ops.shape(x)[0], ops.shape(x)[1]
        if self.dense.equation == self.EQUATIONS[0]:  # (n, d, h): one matmul per head
            heads, dim, head_dim = ops.shape(kernel)
            rows = ops.broadcast_to(ops.reshape(x, (1, -1, dim)), (heads, batch * length, dim))
            y = ops.transpose(ops.matmul(rows, kernel), (1, 0, 2))
            return ops.reshape(y, (batch, length, heads, head_dim))
        out_dim = ops.shape(kernel)[-1]  # (n, h, d): (n·h, d) is the same memory
        y = ops.matmul(ops.reshape(x, (batch * length, -1)), ops.reshape(kernel, (-1, out_dim)))
        return ops.reshape(y, (batch, length, out_dim))


def merge_lora(backbone) -> int:
    """Add each float kernel's LoRA product into the kernel and turn LoRA off (inference).

    Returns the number of layers merged; LoRA on a quantized kernel is left as it is.
    """
    merged = 0
    for layer in backbone._flatten_layers():
        if getattr(layer, "lora_enabled", False) and layer.quantization_mode is None:
            layer._kernel.assign(layer.kernel)  # the kernel property adds the LoRA product
            layer.lora_enabled = False
            merged += 1
    return merged


def use_heads_projections(causal_lm) -> int:
    """Point every attention's query/output projection at a ``HeadsProjection`` (inference).

    Like ``restrict_vocabulary`` this bypasses Keras layer tracking: the original layers
    keep owning the weights (saving is unchanged). Returns how many changed.
    """
    changed = 0
    for layer in causal_lm.backbone._flatten_layers():
        for name in ("query_dense", "output_dense"):
            dense = getattr(layer, name, None)
            if isinstance(dense, HeadsProjection):
                continue
            if (
                isinstance(dense, keras.layers.EinsumDense)
                and dense.equation in HeadsProjection.EQUATIONS
                and dense.quantization_mode is None
            ):
                object.__setattr__(layer, name, HeadsProjection(dense))
                changed += 1
    causal_lm.generate_function = None  # recompile with the new projections
    return changed


def prepare_for_decoding(causal_lm, token_ids: np.ndarray | None) -> None:
    """Everything that makes ``generate`` fast on a CPU; same weights, inference only."""
    merge_lora(causal_lm.backbone)
    use_heads_projections(causal_lm)
    if token_ids is not None:
        restrict_vocabulary(causal_lm, token_ids)


def greedy_tokens(causal_lm, hidden):
    """The best and second-best token ids for final hidden states, (..., 2), scoring only a
    restricted vocabulary's rows. Soft-capping is monotonic: it cannot change the order."""
    output = causal_lm.backbone.token_embedding
    if isinstance(output, SubsetOutput):
        _, best = ops.top_k(output.subset_scores(hidden), 2)
        return ops.take(output.token_ids, best)
    scores = ops.einsum("...h,vh->...v", hidden, ops.cast(output.embeddings, hidden.dtype))
    return ops.cast(ops.top_k(scores, 2)[1], "int32")


class CopyBudget:
    """How often each ``COPY_NGRAM``-token passage of the prompt may be generated: as often
    as the prompt holds it."""

    def __init__(self, prompt: Sequence[int], n: int = COPY_NGRAM):
        self.n = n
        self.held: dict[tuple[int, ...], int] = {}
        for i in range(len(prompt) - n + 1):
            gram = tuple(prompt[i : i + n])
            self.held[gram] = self.held.get(gram, 0) + 1

    def allows(self, generated: Sequence[int], token: int) -> bool:
        """Whether ``token`` may follow ``generated``."""
        tokens = [*generated, token]
        gram = tuple(tokens[-self.n :])
        if len(gram) < self.n or gram not in self.held:
            return True
        windows = np.lib.stride_tricks.sliding_window_view(np.asarray(tokens), self.n)
        return int((windows == gram).all(axis=1).sum()) <= self.held[gram]


def repeat_start(tokens: Sequence[int]) -> int:
    """Where the longest suffix of ``tokens`` that occurred earlier in them begins."""
    tokens = list(tokens)
    for k in range(len(tokens) - 1, 0, -1):
        suffix = tokens[-k:]
        if any(tokens[i : i + k] == suffix for i in range(len(tokens) - k)):
            return len(tokens) - k
    return len(tokens) - 1


def lookup_decode(
    history: list[int], first: list[int], step, limit: int, stop_ids: Sequence[int]
) -> tuple[list[int], int]:
    """Greedy prompt-lookup decoding within the copy budget: (new tokens, forward passes).

    ``first``: the (best, second) next tokens after ``history``; ``step(tokens, index)``:
    (best, second) after each of ``tokens``, placed from position ``index`` (the cache holds
    every position before it). When the best token would copy a prompt passage beyond its
    budget, the repeat is revised where it began: that position takes its second choice.
    """
    best, second = first
    new, seconds, revised = [best], [second], set()
    budget = CopyBudget(history)
    passes = 0
    while new[-1] not in stop_ids and len(new) < limit:
        draft = lookup_draft(history + new, LOOKUP_TOKENS - 1)
        predicted = step([new[-1], *draft], len(history) + len(new) - 1)
        passes += 1
        accepted = 0
        while accepted < len(draft) and predicted[accepted][0] == draft[accepted]:
            accepted += 1
        for best, second in predicted[: accepted + 1]:  # the drafts kept, then one more
            if not budget.allows(new, best):
                at = repeat_start([*new, best])
                if at in revised or at >= len(new):  # revised once already: go on here
                    new, seconds = [*new, second], [*seconds, second]
                else:
                    new, seconds = [*new[:at], seconds[at]], seconds[: at + 1]
                revised.add(len(new) - 1)
                break  # the later predictions followed a token not taken
            new.append(best)
            seconds.append(second)
            if best in stop_ids or len(new) >= limit:
                break
    return new, passes


def lookup_draft(history: Sequence[int], count: int, ngram: int = LOOKUP_NGRAM) -> list[int]:
    """The ``count`` tokens that followed the latest earlier occurrence of the history's
    last n-gram (longest n ≤ ``ngram`` first), or [] when its last token never occurred."""
    tokens = np.asarray(history)
    for n in range(min(ngram, len(tokens) - 1), 0, -1):
        windows = np.lib.stride_tricks.sliding_window_view(tokens[:-1], n)
        found = np.flatnonzero((windows == tokens[-n:]).all(axis=1))
        if len(found):
            start = int(found[-1]) + n
            return tokens[start : start + count].tolist()
    return []


def vocabulary_for(tokenizer, texts: Iterable[str]) -> np.ndarray:
    """Token ids needed to write ``texts`` in the model's chat format, plus special tokens."""
    fmt = CHAT_FORMATS[chat_family(tokenizer)]
    ids = set()
    for text in [*texts, fmt.prompt, fmt.answer, fmt.stop, "0123456789.,;:¿?¡!()\"'-/@ \n"]:
        ids.update(int(i) for i in np.asarray(tokenizer.tokenize(text)).reshape(-1))
    for text in "0123456789":
        ids.update(int(i) for i in np.asarray(tokenizer.tokenize(text)).reshape(-1))
    special = (tokenizer.start_token_id, tokenizer.end_token_id, stop_token_id(tokenizer))
    ids.update(int(t) for t in special if t is not None)
    return np.array(sorted(ids), "int32")


def restrict_vocabulary(causal_lm, token_ids: np.ndarray) -> None:
    """Make ``causal_lm.generate`` score only ``token_ids`` (inference only; JAX backend).

    KerasHub's cached decoding calls ``backbone.token_embedding(x, reverse=True)``; we point
    that attribute at a ``SubsetOutput`` sharing the same weights. The backbone's own
    functional graph (used by ``fit``) keeps the original layer.
    """
    backbone = causal_lm.backbone
    embedding = backbone.token_embedding
    if isinstance(embedding, SubsetOutput):
        embedding = embedding.embedding
    subset = SubsetOutput(embedding, token_ids, embedding.input_dim)
    object.__setattr__(backbone, "_token_embedding", subset)  # bypass Keras layer tracking
    causal_lm.generate_function = None  # recompile with the new output layer


def chat_prompt(tokenizer, turns: Sequence[tuple[str, str]], user: str) -> str:
    """Earlier (user, assistant) turns plus the new user message, ready for the reply."""
    fmt = CHAT_FORMATS[chat_family(tokenizer)]
    text = "".join(
        fmt.prompt.format(user=u) + fmt.answer.format(answer=a) + fmt.stop + "\n" for u, a in turns
    )
    return text + fmt.prompt.format(user=user)


def sources_block(entries: Sequence[Entry]) -> str:
    lines = [
        f"[{i}] Pregunta: {e.question}\nRespuesta: {e.answer}" for i, e in enumerate(entries, 1)
    ]
    return "Fuentes:\n" + "\n".join(lines)


def grounded_message(question: str, entries: Sequence[Entry]) -> str:
    """The user turn for retrieval-grounded answering: instructions, sources, question."""
    return f"{INSTRUCTIONS}\n\n{sources_block(entries)}\n\nPregunta del estudiante: {question}"


def cut_repetition(text: str, ngram: int = 6) -> tuple[str, bool]:
    """Cut a reply at the first repeated sentence or word n-gram (a decoding loop)."""
    sentences = re.split(r"(?<=[.!?])\s+", text.strip())
    seen, kept = set(), []
    for sentence in sentences:
        key = sentence.casefold().strip()
        if key and key in seen:
            return " ".join(kept), True
        seen.add(key)
        kept.append(sentence)
    words = text.split()
    grams: dict[tuple[str, ...], int] = {}
    for i in range(len(words) - ngram + 1):
        gram = tuple(w.casefold() for w in words[i : i + ngram])
        if gram in grams and i - grams[gram] >= ngram:
            return " ".join(words[:i]).rstrip(" ,;"), True
        grams.setdefault(gram, i)
    return text.strip(), False


def count_compilations():
    """A list that grows by one for every XLA compilation JAX does from now on."""
    import jax

    events: list[str] = []

    def listener(event: str, duration: float, **kwargs) -> None:
        if "backend_compile" in event:
            events.append(event)

    jax.monitoring.register_event_duration_secs_listener(listener)
    return events


class Generator:
    """A CausalLM with decoding settings fixed once, so its compiled functions are reused.

    Greedy decoding of a Gemma 3 model on JAX runs prompt-lookup decoding (``lookup``);
    sampling and other families run KerasHub's ``generate``.
    """

    def __init__(self, causal_lm, decoding: DecodingConfig = DecodingConfig(), lookup: bool = True):
        import keras_hub

        self.causal_lm = causal_lm
        self.decoding = decoding
        self.tokenizer = causal_lm.preprocessor.tokenizer
        self.stop_ids = tuple(
            sorted({stop_token_id(self.tokenizer), int(self.tokenizer.end_token_id)})
        )
        self.lookup = (
            lookup
            and decoding.temperature <= 0
            and keras.backend.backend() == "jax"
            and isinstance(causal_lm, keras_hub.models.Gemma3CausalLM)
        )
        self._jitted = None
        if decoding.temperature > 0:
            sampler = keras_hub.samplers.TopPSampler(
                p=decoding.top_p,
                k=decoding.top_k or None,
                temperature=decoding.temperature,
                seed=decoding.seed,
            )
        else:
            sampler = "greedy"
        causal_lm.compile(sampler=sampler)

    def prompt_length(self, prompt: str) -> int:
        return len(np.asarray(self.tokenizer.tokenize(prompt)).reshape(-1)) + 1

    def generate(self, prompt: str, max_new_tokens: int | None = None) -> Generation:
        limit = max_new_tokens or self.decoding.max_new_tokens
        if self.lookup:
            return self._generate_lookup(prompt, limit)
        start = time.perf_counter()
        length = self.prompt_length(prompt)
        bucket = -(-(length + limit) // LENGTH_BUCKET) * LENGTH_BUCKET
        inputs = self.causal_lm.preprocessor.generate_preprocess([prompt], sequence_length=bucket)
        generate = self.causal_lm.make_generate_function()
        output = generate(inputs, stop_token_ids=self.stop_ids or None)
        ids = np.asarray(output["token_ids"])[0, length:]
        new = ids[np.asarray(output["padding_mask"])[0, length:].astype(bool)].tolist()
        return self._finish(new, limit, time.perf_counter() - start, len(new))

    def _finish(self, new: list[int], limit: int, seconds: float, passes: int) -> Generation:
        """Text of the new token ids, up to a stop token or ``limit``, repetition cut."""
        stops = [i for i, token in enumerate(new) if token in self.stop_ids]
        stopped = bool(stops) and stops[0] < limit
        new = new[: stops[0]] if stopped else new[:limit]
        text = self.tokenizer.detokenize(np.asarray(new, "int32"))
        text = text if isinstance(text, str) else np.asarray(text).item().decode()
        text, looped = cut_repetition(text)
        return Generation(text, len(new), stopped, looped, seconds, passes, tuple(new))

    def _forward(self):
        """The cached model's forward pass, jitted once (JAX compiles once per shape)."""
        if self._jitted is None:
            import jax

            lm = self.causal_lm

            def forward(state, token_ids, cache, index):
                trainable, non_trainable = state
                mapping = [
                    *zip(lm.trainable_variables, trainable, strict=True),
                    *zip(lm.non_trainable_variables, non_trainable, strict=True),
                ]
                with keras.StatelessScope(state_mapping=mapping):
                    _, hidden, cache = lm.call_with_cache(token_ids, cache, index)
                    return greedy_tokens(lm, hidden), cache

            self._jitted = jax.jit(forward, donate_argnums=(2,))
        return self._jitted

    def _generate_lookup(self, prompt: str, limit: int) -> Generation:
        """Greedy decoding that checks drafted tokens from the prompt in one forward pass."""
        lm = self.causal_lm
        start = time.perf_counter()
        state = (
            [v.value for v in lm.trainable_variables],
            [v.value for v in lm.non_trainable_variables],
        )
        inputs = lm.preprocessor.generate_preprocess(
            [prompt], sequence_length=self.prompt_length(prompt)
        )
        mask = np.asarray(inputs["padding_mask"]).reshape(-1).astype(bool)
        history = np.asarray(inputs["token_ids"]).reshape(-1)[mask].tolist()
        length = len(history)
        chunked = -(-length // PREFILL_CHUNK) * PREFILL_CHUNK
        max_length = -(-max(chunked, length + limit + LOOKUP_TOKENS) // LENGTH_BUCKET)
        max_length *= LENGTH_BUCKET
        padded = np.zeros((1, chunked), "int32")
        padded[0, :length] = history
        backbone = lm.backbone
        shape = (1, max_length, backbone.num_key_value_heads, backbone.head_dim)
        cache = tuple(
            (ops.zeros(shape, lm.compute_dtype), ops.zeros(shape, lm.compute_dtype))
            for _ in range(backbone.num_layers)
        )
        forward = self._forward()
        for begin in range(0, chunked, PREFILL_CHUNK):  # the cache, a chunk at a time
            chunk = padded[:, begin : begin + PREFILL_CHUNK]
            ids, cache = forward(state, chunk, cache, np.int32(begin))
        first = np.asarray(ids)[0, length - 1 - begin].tolist()

        def step(tokens: list[int], index: int) -> list[list[int]]:
            nonlocal cache
            row = np.asarray([tokens], "int32")
            if 1 < len(tokens) < LOOKUP_TOKENS:  # pad drafts to the compiled width
                row = np.pad(row, ((0, 0), (0, LOOKUP_TOKENS - len(tokens))))
            ids, cache = forward(state, row, cache, np.int32(index))
            return np.asarray(ids)[0].tolist()

        new, passes = lookup_decode(history, first, step, limit, self.stop_ids)
        return self._finish(new, limit, time.perf_counter() - start, passes)
