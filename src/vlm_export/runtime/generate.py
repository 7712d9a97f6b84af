"""The one generation loop: prefill, then KV-cache decode one token at a time, with greedy or
temperature/top-p sampling, stop on EOS or stop strings, and max new tokens. The CLI's
``generate``, parity checks, evaluation and the Triton ``vlm`` model all run this code."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Callable, Iterator, Sequence

import numpy as np

from ..errors import InputError
from .pipeline import ImageInput, VLMPipeline

MAX_NEW_TOKENS_CAP = 4096


@dataclass(frozen=True)
class GenerationConfig:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not (isinstance(self.max_new_tokens, (int, np.integer)) and 1 <= self.max_new_tokens <= MAX_NEW_TOKENS_CAP):
            raise InputError(f"max_tokens must be an integer in 1..{MAX_NEW_TOKENS_CAP}, got {self.max_new_tokens!r}")
        if not (0.0 <= float(self.temperature) <= 10.0):
            raise InputError(f"temperature must be in [0, 10], got {self.temperature!r}")
        if not (0.0 < float(self.top_p) <= 1.0):
            raise InputError(f"top_p must be in (0, 1], got {self.top_p!r}")


@dataclass
class TokenEvent:
    """One generated token; ``text`` is the new printable text (may be empty mid-character)."""

    token_id: int
    text: str


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    finish_reason: str  # "eos" | "stop" | "length"
    prompt_tokens: int
    completion_tokens: int = field(init=False)

    def __post_init__(self) -> None:
        self.completion_tokens = len(self.token_ids)

    def to_dict(self) -> dict:
        return asdict(self)


class Sampler:
    def __init__(self, config: GenerationConfig):
        self.config = config
        self.rng = np.random.default_rng(config.seed)

    def __call__(self, logits: np.ndarray) -> int:
        if self.config.temperature == 0.0:
            return int(np.argmax(logits))
        z = logits.astype(np.float64) / self.config.temperature
        p = np.exp(z - z.max())
        p /= p.sum()
        if self.config.top_p < 1.0:
            order = np.argsort(-p)
            keep = np.cumsum(p[order]) - p[order] < self.config.top_p  # always keeps the top token
            mask = np.zeros_like(p, dtype=bool)
            mask[order[keep]] = True
            p = np.where(mask, p, 0.0)
            p /= p.sum()
        return int(self.rng.choice(len(p), p=p))


def generate_tokens(pipe: VLMPipeline, input_ids: Sequence[int], image_embeds: np.ndarray,
                    config: GenerationConfig) -> Iterator[int]:
    """Token ids, one at a time, until EOS (not yielded) or max_new_tokens.

    ``image_embeds`` is the flat table [placeholders, hidden] (``pipe.image_embeds(pixel_values)``,
    or what a served image encoder returned).
    """
    pipe.check_length(len(input_ids), config.max_new_tokens)
    n_placeholders = sum(1 for i in input_ids if i == pipe.layout.image_token_id)
    if n_placeholders != image_embeds.shape[0]:
        raise InputError(f"the prompt has {n_placeholders} image placeholders but the images give "
                         f"{image_embeds.shape[0]} embeddings")
    sample = Sampler(config)
    ids = np.asarray([input_ids], dtype=np.int64)
    logits, past = pipe.decode(ids, image_embeds, pipe.empty_past(), 0)
    past_len = ids.shape[1]
    no_images = image_embeds[:0]
    for step in range(config.max_new_tokens):
        token = sample(logits[0, -1])
        if token in pipe.eos_token_ids:
            return
        yield token
        if step + 1 == config.max_new_tokens:
            return
        logits, past = pipe.decode(np.asarray([[token]], dtype=np.int64), no_images, past, past_len)
        past_len += 1


ImageEncoder = Callable[[Sequence[ImageInput]], np.ndarray]


def stream(pipe: VLMPipeline, prompt: str, images: Sequence[ImageInput] = (),
           config: GenerationConfig = GenerationConfig(),
           encode_images: ImageEncoder | None = None) -> Iterator[TokenEvent | GenerationResult]:
    """TokenEvents as text appears, then one GenerationResult (the final message).

    Text that might be the start of a stop string, or a partial UTF-8 character, is held back
    until the next token settles it, so the streamed pieces always add up to the final text.
    ``encode_images`` replaces the in-process vision path (the Triton model calls its ensemble).
    """
    input_ids = pipe.prompt_ids(prompt, len(images))
    pipe.check_length(len(input_ids), config.max_new_tokens)  # before any image work
    if not images:
        image_embeds = pipe.image_embeds(None)
    else:
        image_embeds = encode_images(images) if encode_images else pipe.image_embeds(pipe.pixel_values(images))
    tokens: list[int] = []
    emitted = ""
    finish = "length"
    text = ""
    for token in generate_tokens(pipe, input_ids, image_embeds, config):
        tokens.append(token)
        text = pipe.tokenizer.decode(tokens, skip_special_tokens=True)
        cut = _stop_index(text, config.stop)
        if cut is not None:
            text, finish = text[:cut], "stop"
            break
        settled = len(text) - _pending(text, config.stop)
        if settled > len(emitted):
            yield TokenEvent(token, text[len(emitted):settled])
            emitted = text[:settled]
    else:
        finish = "eos" if len(tokens) < config.max_new_tokens else "length"
    if len(text) > len(emitted):
        yield TokenEvent(tokens[-1], text[len(emitted):])
    yield GenerationResult(text, tokens, finish, len(input_ids))


def _stop_index(text: str, stops: Sequence[str]) -> int | None:
    hits = [text.find(s) for s in stops if s and s in text]
    return min(hits) if hits else None


def _pending(text: str, stops: Sequence[str]) -> int:
    """How many trailing characters must wait: a partial character, or a possible stop-string start."""
    hold = 1 if text.endswith("\ufffd") else 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), hold, -1):
            if text.endswith(stop[:n]):
                hold = n
                break
    return hold


def generate(pipe: VLMPipeline, prompt: str, images: Sequence[ImageInput] = (),
             config: GenerationConfig = GenerationConfig(),
             encode_images: ImageEncoder | None = None) -> GenerationResult:
    for event in stream(pipe, prompt, images, config, encode_images):
        if isinstance(event, GenerationResult):
            return event
    raise AssertionError("stream() always ends with a GenerationResult")
