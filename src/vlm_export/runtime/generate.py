"""The one generation loop, as a step scheduler over a batch of sequences.

New sequences are prefilled together (their prompts and images, from an empty state, in ONE
decoder call; the scheme left-pads prompts of different lengths) and join the running batch;
every step samples one token per running row from its own logits with its own settings, lets
rows that hit EOS, a stop string or their length leave, and decodes the remaining rows' tokens in
ONE decoder call. ``stream``/``generate`` are a batch of one;
``generate_batch`` runs many requests together. The CLI's ``generate``, parity checks,
evaluation, the bench and the Triton ``vlm`` model all run this code; the decoding scheme
(contract) says how the decoder is fed, so nothing here knows how images reach the LM.
"""
from __future__ import annotations

import collections
import itertools
import weakref
from dataclasses import asdict, dataclass, field, replace
from typing import Callable, Iterator, Mapping, Sequence

import numpy as np

from ..contract import DecodeBatch
from ..contract.scheme import SlotBatch
from ..errors import InputError, VlmExportError
from .chat import Prompt
from .pipeline import ImageInput, VLMPipeline
from .prefix_cache import PrefixHit

MAX_NEW_TOKENS_CAP = 4096
MAX_TOP_LOGPROBS = 20  # OpenAI's limit
MAX_LOGIT_BIAS = 100.0  # OpenAI's range for logit_bias: [-100, 100]
#: a request's bad_words: at most this many words, spelt in at most this many token ids in all (each word
#: is matched at every step of every row that carries it)
MAX_BAD_WORDS = 128
MAX_BAD_WORD_TOKENS = 1024
MAX_TOP_K = 2**31 - 1  # any vocabulary; a k past the vocabulary keeps every token
#: the most prompt tokens prefilled in one step (every prefill call of the step together): the
#: running rows wait for those calls, so this bounds the pause a burst of new requests puts on them
#: (vLLM's max_num_batched_tokens). The rest wait for the next step; a longer prompt still goes, alone.
DEFAULT_MAX_PREFILL_TOKENS = 2048
#: the largest share of one prefill call's slots (rows x longest prompt) that may be padding. Padded
#: slots cost compute like real ones: on the CPU (2 cores) one call for 4 equally long prompts took
#: ~0.84x the time of 4 calls, so a call ~16% padding breaks even; 0.15 keeps a batched prefill no
#: slower than one by one there. On a GPU a batched prefill costs about one row's time: raise it.
DEFAULT_MAX_PREFILL_PADDING = 0.15


@dataclass(frozen=True)
class GenerationConfig:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    #: the other sampling filters of vLLM and Hugging Face, in HF's order after the temperature: only the
    #: ``top_k`` most likely tokens (ties at the k-th kept; 0: all), then the nucleus (``top_p``), then only
    #: tokens at least ``min_p`` times as likely as the most likely one (0: all); greedy ignores them.
    #: vLLM v1 applies min_p before top-k and top-p, so combined they can keep other tokens than vLLM
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    #: generate exactly max_new_tokens, EOS or not (what benchmarks of LLM servers do)
    ignore_eos: bool = False
    #: Hugging Face's repetition penalty (CTRL's: a seen token's logit divided by it, or multiplied where
    #: negative) and no-repeat n-gram size (no n-gram twice), over the prompt and the answer so far as
    #: HF's generate applies them; None: the build's (its checkpoint's generation_config.json), as HF's
    #: generate defaults to that file
    repetition_penalty: float | None = None
    no_repeat_ngram_size: int | None = None
    #: no EOS before this many new tokens (vLLM's min_tokens: answer tokens; a checkpoint's min_new_tokens is
    #: recorded less the forced BOS HF's generate counts as new, DecodingScheme.forced_new_tokens), nor before
    #: the prompt and answer together are ``min_length`` long (Hugging Face's min_length: its input_ids, the
    #: prompt included); tokens never generated, and tokens not generated first. None: the build's, as the
    #: repetition settings
    min_new_tokens: int | None = None
    min_length: int | None = None
    suppress_tokens: tuple[int, ...] | None = None
    begin_suppress_tokens: tuple[int, ...] | None = None
    #: OpenAI's penalties (vLLM's semantics): a token's logit less ``frequency_penalty`` times the times
    #: it was generated so far, less ``presence_penalty`` once it was; over the answer only, the prompt
    #: not counted; negative values favour repeats. Both in [-2, 2], OpenAI's range; 0: off
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    #: each generated token's log-probability, and the ``top_logprobs`` most likely tokens' at its
    #: position (OpenAI's), from the decoder's logits before any penalty or temperature (vLLM's default)
    logprobs: bool = False
    top_logprobs: int = 0
    #: OpenAI's logit_bias: (token id, bias) pairs (or a mapping), each bias in [-100, 100] added to its
    #: token's logit before the penalties (vLLM's order); -100 all but bans the token, 100 all but forces it
    logit_bias: tuple[tuple[int, float], ...] = ()
    #: Hugging Face's sequence_bias ((ids, bias) pairs: the bias goes to the last id's logit where the ids
    #: before it end the prompt and answer so far; a one-id sequence's always) and bad_words_ids (id
    #: sequences never completed); None: the build's, as the repetition settings
    sequence_bias: tuple[tuple[tuple[int, ...], float], ...] | None = None
    bad_words_ids: tuple[tuple[int, ...], ...] | None = None
    #: vLLM's bad_words: text never generated, each word banned as the tokenizer writes it alone and, where
    #: that takes as many tokens, after a space (``bad_words_token_ids``); they join bad_words_ids, so HF's
    #: rule applies to them (matched over the prompt and the answer, a word that is EOS alone left out)
    bad_words: tuple[str, ...] = ()
    #: teacher forcing (parity's, not a serving option): the answer's first tokens are these, whatever the
    #: logits say; ``GenerationResult.departures`` says where the sampler would have chosen another token and
    #: by how much. An EOS id among them stands for every EOS id (the answer ends there)
    forced_tokens: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        self._normalize_biases()
        if not (isinstance(self.max_new_tokens, (int, np.integer)) and 1 <= self.max_new_tokens <= MAX_NEW_TOKENS_CAP):
            raise InputError(f"max_tokens must be an integer in 1..{MAX_NEW_TOKENS_CAP}, got {self.max_new_tokens!r}")
        if not (0.0 <= float(self.temperature) <= 10.0):
            raise InputError(f"temperature must be in [0, 10], got {self.temperature!r}")
        if not (0.0 <= float(self.top_p) <= 1.0):  # 0: the top token only, as OpenAI's API takes it
            raise InputError(f"top_p must be in [0, 1], got {self.top_p!r}")
        if not (_non_negative_int(self.top_k) and self.top_k <= MAX_TOP_K):
            raise InputError(f"top_k must be an integer in 0..{MAX_TOP_K} (0: every token), got {self.top_k!r}")
        if not (0.0 <= float(self.min_p) <= 1.0):
            raise InputError(f"min_p must be in [0, 1] (0: none), got {self.min_p!r}")
        if self.seed is not None and not (isinstance(self.seed, (int, np.integer)) and 0 <= self.seed < 2**63):
            raise InputError(f"seed must be an integer in 0..2^63-1 (or absent), got {self.seed!r}")
        if any(not isinstance(s, str) or not s for s in self.stop):  # "" would end every answer at once
            raise InputError(f"stop strings must be non-empty text, got {list(self.stop)!r}")
        if isinstance(self.bad_words, str):  # one string would be read as its characters
            raise InputError(f"bad_words takes a list of words, got the string {self.bad_words!r}")
        object.__setattr__(self, "bad_words", tuple(self.bad_words))
        if any(not isinstance(s, str) or not s.strip() for s in self.bad_words):  # no tokens: nothing to ban
            raise InputError(f"bad_words must be non-blank text, got {list(self.bad_words)!r}")
        if len(self.bad_words) > MAX_BAD_WORDS:
            raise InputError(f"bad_words holds {len(self.bad_words)} words; at most {MAX_BAD_WORDS}")
        if self.repetition_penalty is not None and not (0.0 < float(self.repetition_penalty) <= 10.0):
            raise InputError(f"repetition_penalty must be in (0, 10] (1: none), got {self.repetition_penalty!r}")
        n = self.no_repeat_ngram_size
        if n is not None and not _non_negative_int(n):
            raise InputError(f"no_repeat_ngram_size must be an integer >= 0 (0: none), got {n!r}")
        for name in ("min_new_tokens", "min_length"):
            n = getattr(self, name)
            if n is not None and not _non_negative_int(n):
                raise InputError(f"{name} must be an integer >= 0 (0: none), got {n!r}")
        for name in ("suppress_tokens", "begin_suppress_tokens"):
            ids = getattr(self, name)
            if ids is not None and not all(map(_non_negative_int, ids)):
                raise InputError(f"{name} must be token ids (integers >= 0), got {ids!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not (-2.0 <= float(getattr(self, name)) <= 2.0):  # NaN too
                raise InputError(f"{name} must be in [-2, 2] (0: none), got {getattr(self, name)!r}")
        k = self.top_logprobs
        if not (isinstance(k, (int, np.integer)) and not isinstance(k, bool) and 0 <= k <= MAX_TOP_LOGPROBS):
            raise InputError(f"top_logprobs must be an integer in 0..{MAX_TOP_LOGPROBS}, got {k!r}")
        if k and not self.logprobs:
            raise InputError("top_logprobs needs logprobs: ask for logprobs too")
        ids = [token for token, _ in self.logit_bias]
        if not all(map(_non_negative_int, ids)):
            raise InputError(f"logit_bias keys must be token ids (integers >= 0), got {ids!r}")
        if len(set(ids)) < len(ids):
            twice = sorted(i for i, n in collections.Counter(ids).items() if n > 1)
            raise InputError(f"logit_bias names a token twice: {twice[:5]}")
        if not all(-MAX_LOGIT_BIAS <= bias <= MAX_LOGIT_BIAS for _, bias in self.logit_bias):  # NaN too
            raise InputError(f"logit_bias values must be in [-{MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}], "
                             f"got {[bias for _, bias in self.logit_bias]!r}")
        for seq, bias in self.sequence_bias or ():
            if not seq or not all(map(_non_negative_int, seq)) or bias != bias:
                raise InputError(f"sequence_bias must hold (token ids, bias) pairs, got {(list(seq), bias)!r}")
        if any(not seq or not all(map(_non_negative_int, seq)) for seq in self.bad_words_ids or ()):
            raise InputError(f"bad_words_ids must be sequences of token ids, got {self.bad_words_ids!r}")
        object.__setattr__(self, "forced_tokens", tuple(self.forced_tokens))
        if not all(map(_non_negative_int, self.forced_tokens)):
            raise InputError(f"forced_tokens must be token ids (integers >= 0), got {list(self.forced_tokens)!r}")
        if len(self.forced_tokens) > self.max_new_tokens:
            raise InputError(f"{len(self.forced_tokens)} forced tokens do not fit in max_tokens {self.max_new_tokens}")

    def _normalize_biases(self) -> None:
        """The bias settings as hashable tuples (a mapping or lists given, JSON's form)."""
        try:
            bias = self.logit_bias.items() if isinstance(self.logit_bias, Mapping) else self.logit_bias
            object.__setattr__(self, "logit_bias", tuple((token, float(value)) for token, value in bias))
            if self.sequence_bias is not None:
                pairs = self.sequence_bias.items() if isinstance(self.sequence_bias, Mapping) else self.sequence_bias
                object.__setattr__(self, "sequence_bias", tuple((tuple(seq), float(value)) for seq, value in pairs))
            if self.bad_words_ids is not None:
                object.__setattr__(self, "bad_words_ids", tuple(tuple(seq) for seq in self.bad_words_ids))
        except (TypeError, ValueError):
            raise InputError("logit_bias takes (token id, bias) pairs or a mapping, sequence_bias (token ids, bias) "
                             "pairs, bad_words_ids sequences of token ids") from None

    def check_vocabulary(self, vocab_size: int) -> None:
        """InputError where logit_bias or forced_tokens name a token the model does not have (its logits' width)."""
        for name, ids in (("logit_bias", [token for token, _ in self.logit_bias]), ("forced_tokens", self.forced_tokens)):
            outside = [token for token in ids if token >= vocab_size]
            if outside:
                raise InputError(f"{name} names token id(s) {outside[:5]} outside this model's vocabulary "
                                 f"(ids 0..{vocab_size - 1})")

    def with_defaults(self, defaults: Mapping) -> "GenerationConfig":
        """The settings left None filled from ``defaults`` (a build's ``generation`` section), else off."""
        def pick(name, off, kind):
            value = getattr(self, name)
            return kind(value if value is not None else defaults.get(name, off))

        return replace(self, repetition_penalty=pick("repetition_penalty", 1.0, float),
                       no_repeat_ngram_size=pick("no_repeat_ngram_size", 0, int),
                       min_new_tokens=pick("min_new_tokens", 0, int), min_length=pick("min_length", 0, int),
                       suppress_tokens=pick("suppress_tokens", (), tuple),
                       begin_suppress_tokens=pick("begin_suppress_tokens", (), tuple),
                       sequence_bias=pick("sequence_bias", (), tuple), bad_words_ids=pick("bad_words_ids", (), tuple))


def bad_words_token_ids(tokenizer, words: Sequence[str]) -> tuple[tuple[int, ...], ...]:
    """The id sequences that spell ``words`` (vLLM's bad_words rule): each word, its leading spaces
    stripped, tokenized without special tokens; and again after one space where that spelling starts
    with another token and has as many (a word inside a sentence, for a tokenizer whose words carry
    their space). InputError for a word the tokenizer writes as no tokens, or too many ids in all."""
    found: list[tuple[int, ...]] = []
    for word in words:
        bare = tuple(tokenizer.encode(word.lstrip(), add_special_tokens=False))
        if not bare:
            raise InputError(f"bad_words: {word!r} is no tokens for this model's tokenizer; leave it out")
        spaced = tuple(tokenizer.encode(" " + word.lstrip(), add_special_tokens=False))
        found.append(bare)
        if spaced and spaced[0] != bare[0] and len(spaced) == len(bare):
            found.append(spaced)
    if sum(map(len, found)) > MAX_BAD_WORD_TOKENS:
        raise InputError(f"bad_words are {sum(map(len, found))} tokens in all; at most {MAX_BAD_WORD_TOKENS}")
    return tuple(found)


def resolved_config(config: GenerationConfig, defaults: Mapping, tokenizer) -> GenerationConfig:
    """``config`` as a row runs it: its unset settings the build's ``defaults``, its bad_words spelt
    in token ids and joined to bad_words_ids (then cleared: resolving twice changes nothing). The
    engine calls it on its preparation workers, so a long word list never holds up the decode loop."""
    config = config.with_defaults(defaults)
    if not config.bad_words:
        return config
    return replace(config, bad_words=(),
                   bad_words_ids=(*config.bad_words_ids, *bad_words_token_ids(tokenizer, config.bad_words)))


def _non_negative_int(value) -> bool:
    """An integer >= 0 (a count, or a token id), numpy's included, not a bool."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value >= 0


@dataclass(frozen=True)
class TokenText:
    """A token decoded alone, and its bytes: part of a character where the text shows U+FFFD (None
    where the tokenizer's kind does not say which bytes)."""

    token_id: int
    text: str
    bytes: tuple[int, ...] | None

    def to_dict(self) -> dict:
        return {"token_id": self.token_id, "token": self.text,
                "bytes": None if self.bytes is None else list(self.bytes)}


@dataclass(frozen=True)
class TokenLogprob:
    """A generated token's log-probability and, most likely first, the ``top_logprobs`` alternatives'
    at its position, each ``(TokenText, logprob)``."""

    token: TokenText
    logprob: float
    top: tuple[tuple[TokenText, float], ...] = ()

    @property
    def token_id(self) -> int:
        return self.token.token_id

    def to_dict(self) -> dict:
        return {**self.token.to_dict(), "logprob": self.logprob,
                "top_logprobs": [{**t.to_dict(), "logprob": p} for t, p in self.top]}


@dataclass
class TokenEvent:
    """One generated token; ``text`` is the new printable text (may be empty mid-character).
    ``logprobs``: where the request asked for them, one per token since the previous event (text
    held back, a stop string's start or part of a character, sends its tokens' later)."""

    token_id: int
    text: str
    logprobs: tuple[TokenLogprob, ...] = ()


@dataclass(frozen=True)
class Departure:
    """A teacher-forced step (``GenerationConfig.forced_tokens``) where the sampler would have chosen another
    token: the answer's position (0: its first token), that token, the forced one, and how far the chosen
    token's logit led the forced one's after the request's penalties and biases (their log-probabilities'
    difference; inf where the forced token was banned there)."""

    index: int
    chosen: int
    forced: int
    margin: float


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    finish_reason: str  # "eos" | "stop" | "length"
    prompt_tokens: int
    completion_tokens: int = field(init=False)
    #: one per token of ``token_ids`` where the request asked for them (``GenerationConfig.logprobs``)
    logprobs: list[TokenLogprob] | None = None
    #: where the request forced tokens (``GenerationConfig.forced_tokens``): each forced step at which the
    #: sampler would have chosen otherwise
    departures: list[Departure] | None = None

    def __post_init__(self) -> None:
        self.completion_tokens = len(self.token_ids)

    def to_dict(self) -> dict:
        out = asdict(self)
        if self.logprobs is not None:
            out["logprobs"] = [entry.to_dict() for entry in self.logprobs]
        if self.departures is None:  # only where tokens were forced (parity's): answers elsewhere keep their form
            del out["departures"]
        return out


@dataclass(frozen=True)
class GenerationRequest:
    """One prompt (or conversation) with its images, for ``generate_batch``."""

    prompt: Prompt
    images: tuple = ()
    config: GenerationConfig = GenerationConfig()


class SequenceMatch:
    """Id sequences matched against the end of one row's ids (``context``, then each token recorded):
    the sequences whose ids before the last end the row complete with their last id at the next
    token; a one-id sequence always does. Hugging Face's SequenceBiasLogitsProcessor and
    NoBadWordsLogitsProcessor match so."""

    def __init__(self, sequences: Sequence[tuple[tuple[int, ...], float]], context: Sequence[int] = ()):
        self.single = [(seq[0], value) for seq, value in sequences if len(seq) == 1]
        self._always: tuple[int, np.ndarray, np.ndarray] | None = None  # (vocab, ids, values) of the one-id ones
        self.by_prefix: dict[tuple[int, ...], list[tuple[int, float]]] = {}
        for seq, value in sequences:
            if len(seq) > 1:
                self.by_prefix.setdefault(tuple(seq[:-1]), []).append((seq[-1], value))
        self.prefix_lengths = sorted({len(prefix) for prefix in self.by_prefix})
        self.keep = max(self.prefix_lengths, default=0)
        self.tail = [int(t) for t in context][-self.keep:] if self.keep else []

    def __bool__(self) -> bool:
        return bool(self.single or self.by_prefix)

    def next(self, vocab: int) -> tuple[np.ndarray, np.ndarray]:
        """(ids, values) of the sequences the next token would complete, one entry per id (values of
        the same id summed in float32, as HF sums its biases), ids past ``vocab`` left out. The one-id
        sequences' are summed once (a request may bias thousands of tokens: not Python work per step)."""
        if self._always is None or self._always[0] != vocab:
            self._always = (vocab, *_summed(self.single, vocab))
        found = []
        for length in self.prefix_lengths:
            if len(self.tail) >= length:
                found += self.by_prefix.get(tuple(self.tail[-length:]), ())
        if not found:
            return self._always[1], self._always[2]
        ids, values = _summed(found, vocab)
        return _summed_arrays(np.concatenate([self._always[1], ids]), np.concatenate([self._always[2], values]))

    def record(self, token: int) -> None:
        if self.keep:
            self.tail.append(token)
            del self.tail[:-self.keep]


def _summed(pairs: Sequence[tuple[int, float]], vocab: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids, values) pairs as sorted unique ids below ``vocab`` with their values summed in float32."""
    ids = np.fromiter((t for t, _ in pairs), np.int64, count=len(pairs))
    values = np.fromiter((v for _, v in pairs), np.float32, count=len(pairs))
    inside = ids < vocab
    return _summed_arrays(ids[inside], values[inside])


def _summed_arrays(ids: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    unique, where = np.unique(ids, return_inverse=True)
    total = np.zeros(len(unique), np.float32)
    np.add.at(total, where, values)
    return unique, total


class Sampler:
    """One row's next token from its logits: the sequence and logit biases, the repetition penalty and
    the no-repeat n-gram rule over ``context`` (what Hugging Face's logits processors see:
    ``DecodingScheme.penalty_context``) and the tokens sampled since, the bad words, the presence and
    frequency penalties over the tokens sampled, EOS (``eos_token_ids``) held off until the minimum
    lengths and the suppressed tokens, then greedy, or temperature, top-k, top-p and min-p."""

    def __init__(self, config: GenerationConfig, context: Sequence[int] = (), eos_token_ids: Sequence[int] = ()):
        self.config = config
        self.eos = np.asarray(list(eos_token_ids), dtype=np.int64)
        self.sampled = 0
        self.suppress = np.asarray(list(config.suppress_tokens or ()), dtype=np.int64)
        self.begin_suppress = np.asarray(list(config.begin_suppress_tokens or ()), dtype=np.int64)
        self.rng = np.random.default_rng(config.seed)
        self.penalty = float(config.repetition_penalty or 1.0)
        self.ngram = int(config.no_repeat_ngram_size or 0)
        self.seen = {int(t) for t in context} if self.penalty != 1.0 else set()
        self.followers: dict[tuple[int, ...], set[int]] = {}  # each (n-1)-gram -> the tokens that followed it
        self.recent: list[int] = []  # the last n-1 ids
        for token in context if self.ngram else ():
            self._record_ngram(int(token))
        self.length = len(context)  # ids so far: an n-gram ban starts once n-1 of them precede the next
        self.presence, self.frequency = float(config.presence_penalty), float(config.frequency_penalty)
        self.counts: dict[int, int] = {}  # each sampled token -> how often, where either penalty is on
        # the request's logit bias joins the checkpoint's one-token sequence biases (summed where both name a token)
        self.bias = SequenceMatch([*(config.sequence_bias or ()), *(((t,), b) for t, b in config.logit_bias)], context)
        # HF leaves out a bad word that is EOS alone (EOS would be banned for good)
        eos = {int(t) for t in self.eos}
        self.bad_words = SequenceMatch([(seq, -np.inf) for seq in config.bad_words_ids or ()
                                        if not (len(seq) == 1 and seq[0] in eos)], context)

    def __call__(self, logits: np.ndarray) -> int:
        token = self._pick(self._processed(logits))
        self._record(token)
        return token

    def follow(self, logits: np.ndarray, forced: int, alike: Sequence[int]) -> tuple[int, float]:
        """Teacher forcing: ``forced`` is the next token (the penalties and bans go on from it). Returns the token
        this sampler would have chosen, and how far its processed logit led the best of ``alike`` (``forced`` and
        the tokens that count as it; 0 where the choice is one of them)."""
        processed = self._processed(logits)
        chosen = self._pick(processed)
        self._record(forced)
        if chosen in alike:
            return chosen, 0.0
        return chosen, float(processed[chosen] - max((processed[t] for t in alike if t < processed.shape[-1]),
                                                     default=-np.inf))

    def _processed(self, logits: np.ndarray) -> np.ndarray:
        early = self.sampled < (self.config.min_new_tokens or 0) or self.length < (self.config.min_length or 0)
        blocked = [ids for ids, on in ((self.eos, early), (self.suppress, True), (self.begin_suppress, not self.sampled))
                   if on and ids.size]
        vocab = logits.shape[-1]
        banned = self.bad_words.next(vocab)[0] if self.bad_words else ()
        if len(banned):
            blocked.append(banned)
        if self.penalty == 1.0 and not self.ngram and not self.counts and not blocked and not self.bias:
            return logits
        logits = np.array(logits, dtype=np.float32)  # a copy: the batch's logits stay as the decoder made them
        if self.bias:  # first, as HF's sequence bias and vLLM's logit bias: the penalties see the biased logits
            ids, values = self.bias.next(vocab)
            logits[ids] += values
        for ids in blocked:
            logits[ids[ids < logits.shape[-1]]] = -np.inf
        if self.seen:
            seen = np.fromiter((t for t in self.seen if 0 <= t < logits.shape[-1]), dtype=np.int64)
            picked = logits[seen]
            logits[seen] = np.where(picked < 0, picked * self.penalty, picked / self.penalty)
        if self.ngram and self.length + 1 >= self.ngram:  # the next token would end an n-gram: not one seen
            banned = [t for t in self.followers.get(tuple(self.recent), ()) if 0 <= t < logits.shape[-1]]
            logits[banned] = -np.inf
        if self.counts:  # after the repetition penalty, as vLLM applies them
            ids = np.fromiter(self.counts, dtype=np.int64, count=len(self.counts))
            times = np.fromiter(self.counts.values(), dtype=np.float32, count=len(self.counts))
            inside = ids < logits.shape[-1]
            logits[ids[inside]] -= self.frequency * times[inside] + self.presence
        return logits

    def _record(self, token: int) -> None:
        self.bias.record(token)
        self.bad_words.record(token)
        if self.penalty != 1.0:
            self.seen.add(token)
        if self.ngram:
            self._record_ngram(token)
        if self.presence or self.frequency:
            self.counts[token] = self.counts.get(token, 0) + 1
        self.length += 1
        self.sampled += 1

    def _record_ngram(self, token: int) -> None:
        if len(self.recent) == self.ngram - 1:  # an n-gram ends at this token
            self.followers.setdefault(tuple(self.recent), set()).add(token)
        if self.ngram > 1:
            self.recent = (self.recent + [token])[1 - self.ngram:]

    def _pick(self, logits: np.ndarray) -> int:
        if self.config.temperature == 0.0:
            return int(np.argmax(logits))
        p = self.distribution(logits)
        return int(self.rng.choice(len(p), p=p))

    def distribution(self, logits: np.ndarray) -> np.ndarray:
        """What a sampled token is drawn from (float64, sums to 1): the processed logits' softmax at the
        temperature, then top-k, top-p and min-p, each renormalising, as Hugging Face's warpers in its
        generate's order (vLLM v1 applies min-p before top-k and top-p; with more than one of them set, the
        two can keep different tokens)."""
        config = self.config
        z = logits.astype(np.float64) / config.temperature
        if 0 < config.top_k < z.size:  # every token whose logit reaches the k-th largest (HF keeps ties)
            z = np.where(z >= np.partition(z, -config.top_k)[-config.top_k], z, -np.inf)
        p = np.exp(z - z.max())
        p /= p.sum()
        if config.top_p < 1.0:
            # stable: where the nucleus ends inside a tie, the lower ids stay, on every CPU (numpy's default
            # sort orders ties by its SIMD kernel; Hugging Face's by torch's unstable sort)
            order = np.argsort(-p, kind="stable")
            keep = np.cumsum(p[order]) - p[order] < config.top_p
            keep[0] = True  # the nucleus always holds the top token (top_p 0: nothing else)
            mask = np.zeros_like(p, dtype=bool)
            mask[order[keep]] = True
            p = np.where(mask, p, 0.0)
            p /= p.sum()
        if config.min_p > 0.0:  # the top token always stays (min_p 1: it alone, and its ties)
            p = np.where(p >= config.min_p * p.max(), p, 0.0)
            p /= p.sum()
        return p


def token_logprob(tokenizer, logits: np.ndarray, token: int, top: int) -> TokenLogprob:
    """``token``'s log-probability under ``logits`` (a log-softmax in float64) and the ``top`` most
    likely tokens', each with its text decoded alone."""
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max()
    logp = z - np.log(np.exp(z).sum())
    best: tuple[tuple[TokenText, float], ...] = ()
    if top:
        ids = np.argpartition(-logp, top - 1)[:top]
        best = tuple((token_text(tokenizer, int(i)), float(logp[i]))
                     for i in ids[np.argsort(-logp[ids], kind="stable")])
    return TokenLogprob(token_text(tokenizer, int(token)), float(logp[token]), best)


def token_text(tokenizer, token: int) -> TokenText:
    """One token's text and bytes. A token that is part of a character decodes to U+FFFD; its bytes
    are then read from the vocabulary: a byte-fallback tokenizer's ``<0xNN>`` token is that byte, a
    byte-level BPE's (GPT-2's, SmolLM2's) token is its bytes written as GPT-2's printable characters.
    Decoded after an anchor token, as TextStream decodes: a SentencePiece tokenizer would otherwise drop
    the space that starts the token (its start-of-text rule)."""
    anchor, before = _anchor(tokenizer)
    text = tokenizer.decode([anchor, token], skip_special_tokens=False)
    text = text[len(before):] if text.startswith(before) else tokenizer.decode([token], skip_special_tokens=False)
    if "\ufffd" not in text:
        return TokenText(token, text, tuple(text.encode("utf-8")))
    if token in byte_fallback_ids(tokenizer):
        return TokenText(token, text, (int(tokenizer.convert_ids_to_tokens(token)[3:5], 16),))
    piece = tokenizer.convert_ids_to_tokens(token)
    decoder = _byte_level_decoder(tokenizer)
    if decoder is not None and isinstance(piece, str) and all(c in decoder for c in piece):
        return TokenText(token, text, tuple(decoder[c] for c in piece))
    return TokenText(token, text, None)


_ANCHORS: "weakref.WeakKeyDictionary[object, tuple[int, str]]" = weakref.WeakKeyDictionary()


def _anchor(tokenizer) -> tuple[int, str]:
    """A plain token ("a") to decode others after, and its text."""
    if tokenizer not in _ANCHORS:
        anchor = tokenizer.encode("a", add_special_tokens=False)[-1]
        _ANCHORS[tokenizer] = anchor, tokenizer.decode([anchor], skip_special_tokens=False)
    return _ANCHORS[tokenizer]


def _gpt2_byte_map() -> dict[str, int]:
    """GPT-2's printable character -> byte: bytes that print as themselves keep their character, the
    others take the characters from U+0100 on, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{chr(b): b for b in printable}, **{chr(256 + n): b for n, b in enumerate(others)}}


_GPT2_BYTES = _gpt2_byte_map()


def _byte_level_decoder(tokenizer) -> dict[str, int] | None:
    """GPT-2's character -> byte map, where the tokenizer's decoder is byte-level."""
    decoder = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)
    return _GPT2_BYTES if decoder is not None and "ByteLevel" in repr(decoder) else None


class TextStream:
    """A row's text as its tokens arrive. Text that might be the start of a stop string, or a
    partial UTF-8 character, is held back until the next token settles it, so the streamed
    pieces always add up to the final text.

    Decoded incrementally, as vLLM's and TGI's detokenizers do: each token decodes the tokens not yet
    in the text with the ones just before them as context (a SentencePiece tokenizer strips the space
    that starts a sequence: without the context a word would lose its space), not the whole answer
    again (0.7 ms per row and token at 2048 tokens with SmolLM2's tokenizer, so 6 ms of every batch-8
    step). A partial character decodes to U+FFFD - one per byte so far with a byte-fallback tokenizer
    (Llama 2's, LLaVA-1.5's), one in all with a byte-level one (GPT-2's) - and waits for the bytes
    that complete it. A byte-fallback tokenizer decodes a run of byte tokens (``<0x07><0xB2>``) as one,
    every byte of it a U+FFFD where the run is not valid UTF-8 (a valid ``\x07`` included), so text is
    settled only where such a run has ended: the streamed text is the whole decode's, bytes that never
    make a character included."""

    def __init__(self, tokenizer, stop: Sequence[str]):
        self.tokenizer, self.stop = tokenizer, tuple(stop)
        self._byte_tokens = byte_fallback_ids(tokenizer)
        self._longest_stop = max((len(s) for s in self.stop), default=0)
        self.tokens: list[int] = []
        self.text = ""
        self.stopped = False
        self._sent = 0  # characters of text already streamed
        self._context = self._read = 0  # tokens[_context:_read] are in text (the context), tokens[_read:] not yet

    def _unread(self) -> str:
        """The text of tokens[_read:], decoded after their context."""
        context = self.tokenizer.decode(self.tokens[self._context:self._read], skip_special_tokens=True)
        both = self.tokenizer.decode(self.tokens[self._context:], skip_special_tokens=True)
        return both[len(context):]

    def _append(self, piece: str) -> None:
        before = len(self.text)
        self.text += piece
        cut = _stop_index(self.text, self.stop, max(0, before - self._longest_stop + 1))
        if cut is not None:
            self.text, self.stopped = self.text[:cut], True

    def push(self, token: int) -> TokenEvent | None:
        self.tokens.append(token)
        if token in self._byte_tokens:  # a run of byte tokens is decoded whole, once it has ended
            return None
        piece = self._unread()
        if not piece or piece.endswith("\ufffd"):  # nothing visible yet, or a partial character
            return None
        self._context, self._read = self._read, len(self.tokens)
        self._append(piece)
        if self.stopped:
            return None
        settled = len(self.text) - _pending(self.text, self.stop)
        if settled > self._sent:
            event = TokenEvent(token, self.text[self._sent:settled])
            self._sent = settled
            return event
        return None

    def flush(self) -> TokenEvent | None:
        """What was held back, once the row has ended (a partial character left as the tokenizer
        writes it)."""
        if not self.stopped and self._read < len(self.tokens):
            piece = self._unread()
            self._context, self._read = self._read, len(self.tokens)
            self._append(piece)
        if len(self.text) > self._sent:
            event = TokenEvent(self.tokens[-1], self.text[self._sent:])
            self._sent = len(self.text)
            return event
        return None


_BYTE_FALLBACK_IDS: "weakref.WeakKeyDictionary[object, frozenset[int]]" = weakref.WeakKeyDictionary()


def byte_fallback_ids(tokenizer) -> frozenset[int]:
    """The ids of a byte-fallback tokenizer's 256 byte tokens (``<0x00>`` .. ``<0xFF>``: SentencePiece's,
    Llama 2's); none for others (a byte-level BPE's tokens are not bytes on their own)."""
    if tokenizer not in _BYTE_FALLBACK_IDS:
        names = [f"<0x{b:02X}>" for b in range(256)]
        ids = tokenizer.convert_tokens_to_ids(names)
        unknown = getattr(tokenizer, "unk_token_id", None)
        _BYTE_FALLBACK_IDS[tokenizer] = frozenset(i for i in ids if i is not None and i != unknown)
    return _BYTE_FALLBACK_IDS[tokenizer]


def _stop_index(text: str, stops: Sequence[str], start: int = 0) -> int | None:
    """Where the first stop string in ``text`` begins, looking from ``start`` (the text before it was
    searched already)."""
    hits = [i for i in (text.find(s, start) for s in stops if s) if i >= 0]
    return min(hits) if hits else None


def _pending(text: str, stops: Sequence[str]) -> int:
    """How many trailing characters must wait: a possible stop-string start."""
    hold = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), hold, -1):
            if text.endswith(stop[:n]):
                hold = n
                break
    return hold


@dataclass
class _Row:
    id: int
    prompt_ids: list[int]
    image_input: np.ndarray
    config: GenerationConfig
    sampler: Sampler
    text: TextStream
    finish: str | None = None
    keys: np.ndarray | None = None  # what its prompt positions hold, for the prefix cache (None: not cached)
    logprobs: list[TokenLogprob] = field(default_factory=list)  # where the request asked for them
    logprobs_sent: int = 0  # how many of them went out with its events
    departures: list[Departure] = field(default_factory=list)  # where it forces tokens


Event = tuple[int, "TokenEvent | GenerationResult | VlmExportError"]


class Scheduler:
    """Steps a batch of sequences on one pipeline (see the module docstring).

    ``submit`` queues a sequence; ``step`` decodes the tokens sampled at the previous step (one
    decoder call for every running row), admits queued sequences, samples one token per row and
    returns this step's events as ``(row id, TokenEvent | GenerationResult | VlmExportError)``; a
    row's GenerationResult, or the error that ended it alone (its prefill failed), is its last event.
    A token's event goes out before the decoder call that consumes it, so streaming clients see
    it as soon as it is sampled.

    Admission, once per step: queued sequences, first come first served, while the batch has
    room (``max_batch``, default the build's limit) and their prompts total at most
    ``max_prefill_tokens`` (the first always goes; the rest wait for the next step, after the
    running rows have had theirs). They are prefilled in as few decoder calls as padding allows:
    longest first, a call takes the next row while at most ``max_prefill_padding`` of its slots are
    padding (the scheme left-pads shorter prompts). If a call fails, its rows are prefilled one by
    one, so the error ends only the row that causes it.

    The running rows' KV: where the pipeline can (``VLMPipeline.kv_in_place``: the fused decoder on
    ONNX Runtime's CPU provider) and ``kv_in_place`` is not False, one preallocated buffer per cache
    that each decode step writes in place (``contract.scheme.SlotBatch``: a prefilled row is copied
    into a free slot once, sized for its prompt + max new tokens; a leaving row frees its slot);
    otherwise a ``DecodeBatch`` of numpy caches that every step replaces with the decoder's present.

    Where the pipeline has a prefix cache (``VLMPipeline.prefix_cache``), a queued row whose prompt
    starts as a cached one did (its template's system turn, or a conversation's previous turn with
    its images) is prefilled alone on that prefix's K/V, only its other tokens computed; every
    prefilled prompt's K/V goes into the cache (``runtime.prefix_cache``), and when its row finishes,
    the prompt's and the answer's together (a cancelled row's is not kept).
    """

    def __init__(self, pipe: VLMPipeline, max_batch: int | None = None, max_prefill_tokens: int | None = None,
                 max_prefill_padding: float | None = None, kv_in_place: bool | None = None):
        self.pipe = pipe
        self.max_batch = max_batch or pipe.limits.max_batch
        if self.max_batch < 1:
            raise InputError(f"max_batch must be at least 1, got {self.max_batch}")
        self.max_prefill_tokens = DEFAULT_MAX_PREFILL_TOKENS if max_prefill_tokens is None else max_prefill_tokens
        if self.max_prefill_tokens < 1:
            raise InputError(f"max_prefill_tokens must be at least 1, got {self.max_prefill_tokens}")
        self.max_prefill_padding = DEFAULT_MAX_PREFILL_PADDING if max_prefill_padding is None else max_prefill_padding
        if not 0.0 <= self.max_prefill_padding <= 1.0:
            raise InputError(f"max_prefill_padding must be in [0, 1], got {self.max_prefill_padding}")
        self.kv_in_place = pipe.kv_in_place and kv_in_place is not False
        self._ids = itertools.count()
        self.queued: list[_Row] = []
        self.running: list[_Row] = []
        self.batch: DecodeBatch | SlotBatch | None = None
        self.logits: np.ndarray | None = None  # [running rows, vocab]: each row's next-token logits
        self._pending: np.ndarray | None = None  # tokens sampled for the running rows, not yet decoded
        self._failed: list[Event] = []  # rows whose own prefill failed, reported at the next step
        self.prefill_calls = 0  # decoder calls made by prefills (tests and benchmarks read it)

    @property
    def idle(self) -> bool:
        return not self.queued and not self.running

    def submit(self, prompt_ids: Sequence[int], image_input: np.ndarray, config: GenerationConfig,
               prefix_keys: np.ndarray | None = None) -> int:
        """Queue one sequence; InputError now (not at its turn) when it cannot run. ``prefix_keys``:
        the prompt's ``VLMPipeline.prefix_keys`` where the caller made them already (off this loop's
        thread: they read every image row); otherwise they are made when the row is admitted."""
        self.pipe.check_length(len(prompt_ids), config.max_new_tokens)
        self.pipe.scheme.check_prompt(prompt_ids, image_input)
        config.check_vocabulary(self.pipe.scheme.geometry.vocab_size)
        config = resolved_config(config, self.pipe.generation_defaults, self.pipe.tokenizer)
        row = _Row(next(self._ids), list(prompt_ids), image_input, config,
                   Sampler(config, self.pipe.scheme.penalty_context(prompt_ids), self.pipe.eos_token_ids),
                   TextStream(self.pipe.tokenizer, config.stop), keys=prefix_keys)
        self.queued.append(row)
        return row.id

    def cancel(self, row_id: int) -> bool:
        """Drop a queued or running row at once (its place frees for the next step); False if unknown."""
        for i, row in enumerate(self.queued):
            if row.id == row_id:
                del self.queued[i]
                return True
        index = next((i for i, row in enumerate(self.running) if row.id == row_id), None)
        if index is None:
            return False
        self._retain([i for i in range(len(self.running)) if i != index])
        return True

    def _retain(self, keep: list[int]) -> None:
        """Keep only these running rows (their caches, logits and undecoded tokens)."""
        self.running = [self.running[i] for i in keep]
        self.batch = self.batch.keep(keep) if keep else None
        self.logits = self.logits[keep] if keep else None
        if self._pending is not None:
            self._pending = self._pending[keep] if keep else None

    def _decode_pending(self) -> None:
        if self._pending is None:
            return
        self.logits, self.batch = self.pipe.step(self.batch, self._pending)
        self._pending = None

    def _next_rows(self) -> list[_Row]:
        """The queued rows this step admits (see the class docstring)."""
        taken: list[_Row] = []
        tokens = 0
        while self.queued and len(self.running) + len(taken) < self.max_batch:
            tokens += len(self.queued[0].prompt_ids)
            if taken and tokens > self.max_prefill_tokens:
                break
            taken.append(self.queued.pop(0))
        return taken

    def _prefill_groups(self, rows: list[_Row]) -> list[list[_Row]]:
        """``rows`` split into prefill calls: longest first, each call within the padding share."""
        groups: list[list[_Row]] = []
        real = 0
        for row in sorted(rows, key=lambda r: -len(r.prompt_ids)):  # stable: equal lengths keep their order
            if groups:
                group = groups[-1]
                width = len(group[0].prompt_ids)  # the call's longest row
                slots = width * (len(group) + 1)
                if (slots - real - len(row.prompt_ids)) <= self.max_prefill_padding * slots:
                    group.append(row)
                    real += len(row.prompt_ids)
                    continue
            groups.append([row])
            real = len(row.prompt_ids)
        return groups

    def _prefill(self, group: list[_Row]) -> None:
        try:
            self.prefill_calls += 1
            logits, state = self.pipe.prefill_batch([r.prompt_ids for r in group], [r.image_input for r in group])
        except VlmExportError as e:
            if len(group) == 1:  # this request ends alone; the running batch goes on
                self._failed.append((group[0].id, e))
            else:  # which row? each alone: only the one at fault fails
                for row in group:
                    self._prefill([row])
            return
        self._join(group, logits, state)

    def _prefill_continuing(self, row: _Row, hit: PrefixHit) -> None:
        """One row whose prompt starts as a cached one did: only the rest is prefilled."""
        try:
            self.prefill_calls += 1
            prefix = self.pipe.scheme.prefix_state(hit.caches, hit.length)
            logits, state = self.pipe.prefill_continuing(prefix, row.prompt_ids, row.image_input)
        except VlmExportError as e:
            self._failed.append((row.id, e))
            return
        self._join([row], logits, state)

    def _join(self, group: list[_Row], logits: np.ndarray, state: DecodeBatch) -> None:
        """A prefill's rows join the running batch (and their prompts' K/V the prefix cache)."""
        for i, row in enumerate(group):
            row.image_input = None  # consumed: its rows live in the cache now
            self._remember(row.keys, state, i)
        reserve = [len(r.prompt_ids) + r.config.max_new_tokens for r in group]
        self.batch = self.pipe.running(state, reserve, self.batch, in_place=self.kv_in_place)
        self.logits = logits if self.logits is None else np.concatenate([self.logits, logits])
        self.running.extend(group)

    def _keep_conversation(self, index: int, row: _Row) -> None:
        """A finished row's prompt and the tokens decoded after it go into the prefix cache (replacing
        its prompt's entry): a conversation's next turn starts with both, its answer re-tokenized -
        as the model wrote it, mostly; the lookup takes whatever prefix agrees."""
        if self.pipe.prefix_cache is None or row.keys is None:
            return
        decoded = int(self.batch.positions[index]) - len(row.prompt_ids)  # this step's token is not yet
        answer = self.pipe.scheme.generated_keys(row.text.tokens[:decoded])
        if decoded > 0 and answer is not None:
            self._remember(np.concatenate([row.keys, answer]), self.batch, index)

    def _remember(self, keys: np.ndarray | None, state: "DecodeBatch | SlotBatch", index: int) -> None:
        """Row ``index`` of ``state`` into the prefix cache under ``keys``, its K/V copied only if kept."""
        cache = self.pipe.prefix_cache
        if cache is not None and keys is not None and cache.admits(len(keys), state.position_nbytes):
            cache.store(keys, state.row_caches(index))

    def _admit(self) -> None:
        """Rows whose prompts start as a cached one continue from it, one call each; the rest are
        prefilled together (``_prefill_groups``)."""
        fresh, cache = [], self.pipe.prefix_cache
        for row in self._next_rows():
            if row.keys is None:
                row.keys = self.pipe.prefix_keys(row.prompt_ids, row.image_input)
            hit = cache.lookup(row.keys) if cache is not None and row.keys is not None else None
            if hit is None:
                fresh.append(row)
            else:
                self._prefill_continuing(row, hit)
        for group in self._prefill_groups(fresh):
            self._prefill(group)

    def _sample(self, row: _Row, logits: np.ndarray, events: list[Event]) -> int:
        at, forced = len(row.text.tokens), row.config.forced_tokens
        if at < len(forced):
            token = forced[at]
            alike = self.pipe.eos_token_ids if token in self.pipe.eos_token_ids else (token,)
            chosen, margin = row.sampler.follow(logits, token, alike)
            if chosen not in alike:
                row.departures.append(Departure(at, chosen, token, margin))
        else:
            token = row.sampler(logits)
        if token in self.pipe.eos_token_ids and not row.config.ignore_eos:
            row.finish = "eos"
            return token
        if row.config.logprobs:
            row.logprobs.append(token_logprob(self.pipe.tokenizer, logits, token, row.config.top_logprobs))
        event = row.text.push(token)
        if event is not None:
            events.append((row.id, self._with_logprobs(row, event)))
        if row.text.stopped:
            row.finish = "stop"
        elif len(row.text.tokens) == row.config.max_new_tokens:
            row.finish = "length"
        return token

    @staticmethod
    def _with_logprobs(row: _Row, event: TokenEvent) -> TokenEvent:
        """The event with the row's log-probabilities not yet sent (none unless it asked for them)."""
        if row.logprobs_sent < len(row.logprobs):
            event = replace(event, logprobs=tuple(row.logprobs[row.logprobs_sent:]))
            row.logprobs_sent = len(row.logprobs)
        return event

    def step(self) -> list[Event]:
        self._decode_pending()
        self._admit()
        events, self._failed = self._failed, []
        if not self.running:
            return events
        tokens = np.asarray([self._sample(row, logits, events) for row, logits in zip(self.running, self.logits)])
        for index, row in enumerate(self.running):
            if row.finish is not None:
                self._keep_conversation(index, row)
                tail = row.text.flush()
                if tail is None and row.logprobs_sent < len(row.logprobs):  # tokens whose text never went out
                    tail = TokenEvent(row.text.tokens[-1], "")
                if tail is not None:
                    events.append((row.id, self._with_logprobs(row, tail)))
                events.append((row.id, GenerationResult(row.text.text, row.text.tokens, row.finish,
                                                        len(row.prompt_ids),
                                                        row.logprobs if row.config.logprobs else None,
                                                        row.departures if row.config.forced_tokens else None)))
        self._pending = tokens
        keep = [i for i, row in enumerate(self.running) if row.finish is None]
        if len(keep) < len(self.running):  # finished rows leave before the next decoder call
            self._retain(keep)
        return events

    def run(self) -> Iterator[Event]:
        """Step until every submitted sequence has finished."""
        while not self.idle:
            yield from self.step()

    def run_raising(self) -> Iterator[Event]:
        """``run``, raising a row's error instead of yielding it (in-process callers, who want the
        exception, not a message to forward)."""
        for row, event in self.run():
            if isinstance(event, VlmExportError):
                raise event
            yield row, event


#: (a request's images, its prompt) -> the decoder's image input; the prompt matters only to builds
#: whose image path reads it (``VLMPipeline.reads_prompt``)
ImageEncoder = Callable[[Sequence[ImageInput], Prompt], np.ndarray]


def image_input_for(pipe: VLMPipeline, images: Sequence[ImageInput], prompt: Prompt,
                    encode_images: ImageEncoder | None = None) -> np.ndarray:
    """The decoder's image input for a request's images: in-process (one image per call where the pipeline
    ``encodes_images_alone``), or through ``encode_images``."""
    if not images:
        return pipe.scheme.empty_image_input()
    if encode_images:
        return encode_images(images, prompt)
    if _one_per_call(pipe, images):
        return pipe.scheme.join_image_inputs([pipe.encode_images(pipe.pixel_values([image]), prompt=prompt)
                                              for image in images])
    return pipe.encode_images(pipe.pixel_values(images), prompt=prompt)


def _one_per_call(pipe: VLMPipeline, images: Sequence[ImageInput]) -> bool:
    return pipe.encodes_images_alone and len(images) > 1 and not pipe.layout.images_together


def prepare_request(pipe: VLMPipeline, prompt: Prompt, images: Sequence[ImageInput], config: GenerationConfig,
                    encode_images: ImageEncoder | None = None) -> tuple[list[int], np.ndarray]:
    """(prompt ids, the decoder's image input) for one request; its length is checked before the image
    stages run, so an over-long prompt costs no vision pass (where images are cut into tiles, their
    preprocessing comes first: the prompt's length follows their grids)."""
    config.check_vocabulary(pipe.scheme.geometry.vocab_size)
    if images and pipe.layout.tiled and encode_images is None:
        # the ids follow each image's grid of tiles: one preprocessing gives the grids and the pixels
        pixels, grids = pipe.pixel_values_and_grids(images)
        ids = pipe.prompt_ids(prompt, images, grids)
        pipe.check_length(len(ids), config.max_new_tokens)
        if _one_per_call(pipe, images):
            return ids, image_input_for(pipe, images, prompt)
        return ids, pipe.encode_images(pixels, prompt=prompt)
    ids = pipe.prompt_ids(prompt, images)
    pipe.check_length(len(ids), config.max_new_tokens)
    return ids, image_input_for(pipe, images, prompt, encode_images)


def stream(pipe: VLMPipeline, prompt: Prompt, images: Sequence[ImageInput] = (),
           config: GenerationConfig = GenerationConfig(),
           encode_images: ImageEncoder | None = None) -> Iterator[TokenEvent | GenerationResult]:
    """TokenEvents as text appears, then one GenerationResult (the final message): a batch of one.
    ``encode_images`` replaces the in-process image stages (the Triton model calls its ensemble)."""
    scheduler = Scheduler(pipe, max_batch=1)
    scheduler.submit(*prepare_request(pipe, prompt, images, config, encode_images), config)
    for _, event in scheduler.run_raising():
        yield event


def generate(pipe: VLMPipeline, prompt: Prompt, images: Sequence[ImageInput] = (),
             config: GenerationConfig = GenerationConfig(),
             encode_images: ImageEncoder | None = None) -> GenerationResult:
    for event in stream(pipe, prompt, images, config, encode_images):
        if isinstance(event, GenerationResult):
            return event
    raise AssertionError("stream() always ends with a GenerationResult")


def generate_result(pipe: VLMPipeline, prompt_ids: Sequence[int], image_input: np.ndarray,
                    config: GenerationConfig) -> GenerationResult:
    """One generation from prompt ids already built: its result (token ids without EOS, logprobs where asked)."""
    scheduler = Scheduler(pipe, max_batch=1)
    scheduler.submit(prompt_ids, image_input, config)
    return next(e for _, e in scheduler.run_raising() if isinstance(e, GenerationResult))


def generate_ids(pipe: VLMPipeline, prompt_ids: Sequence[int], image_input: np.ndarray,
                 config: GenerationConfig) -> list[int]:
    """The new token ids for prompt ids already built (EOS not included)."""
    return generate_result(pipe, prompt_ids, image_input, config).token_ids


def generate_batch(pipe: VLMPipeline, requests: Sequence[GenerationRequest], max_batch: int | None = None,
                   on_result: Callable[[int, GenerationResult], None] | None = None,
                   max_prefill_tokens: int | None = None,
                   max_prefill_padding: float | None = None) -> list[GenerationResult]:
    """Many requests through one scheduler, up to ``max_batch`` (default: the build's limit)
    decoded together; results in request order. Every request is checked before any runs.
    ``on_result(index, result)`` is called as each finishes (progress bars); the prefill bounds
    are ``Scheduler``'s."""
    scheduler = Scheduler(pipe, max_batch, max_prefill_tokens, max_prefill_padding)
    index = {}
    for i, r in enumerate(requests):
        index[scheduler.submit(*prepare_request(pipe, r.prompt, r.images, r.config), r.config)] = i
    results: list[GenerationResult | None] = [None] * len(requests)
    for row, event in scheduler.run_raising():
        if isinstance(event, GenerationResult):
            results[index[row]] = event
            if on_result is not None:
                on_result(index[row], event)
    return results
