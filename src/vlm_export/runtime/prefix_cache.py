"""A prefix cache: the decoder state (self-attention K/V) of prompts already prefilled, so a new
prompt that starts as one of them prefills only the rest.

Every chat prompt starts with its template's system turn (SmolLM2's is 24 tokens of the demo's
~100), and each turn of a conversation starts with the whole previous prompt, images included:
the state after those tokens is the same every time, and on a CPU a prefill's cost is linear in
its tokens. vLLM (automatic prefix caching), TensorRT-LLM (KV cache reuse) and llama.cpp
(``cache_prompt``) keep it for the same reason.

What a position holds is the decoding scheme's ``prefix_keys``: the token id, or a digest of the
image row a placeholder takes, so two prompts with the same text and different pictures share only
the text before the first picture. An entry is one prompt's keys and its K/V (``DecodeBatch.row_caches``);
a lookup finds the entry with the longest common prefix and reuses that many positions (at most
all but the prompt's last token, whose logits the prefill must still give). The decoder computes
the rest from exactly the state a full prefill would have had there, so the answer is the same
(bit for bit on ONNX Runtime's CPU kernels for the demo's fp32, int8 and w4 decoders, checked by
hand; the tests hold logits and K/V to 1e-5 and greedy answers to equal). Bounded in bytes, least recently used out first; an entry that a newer prompt extends
is replaced by it (no K/V kept twice along one conversation). The scheduler also stores a finished
row's prompt with its answer's decoded tokens (``DecodingScheme.generated_keys``), whose K/V came
from decode steps: equal to a prefill's within float rounding, not bit for bit.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Mapping

import numpy as np

#: shorter common prefixes are not reused: a row that continues a prefix is prefilled alone, which
#: for a few tokens costs more than the batched prefill it leaves
MIN_REUSED_TOKENS = 8


@dataclass(frozen=True)
class PrefixHit:
    length: int  # positions reused
    caches: Mapping[str, np.ndarray]  # the entry's K/V by past name, [heads, >= length, head_dim]


@dataclass
class _Entry:
    keys: np.ndarray
    caches: dict[str, np.ndarray]

    @property
    def nbytes(self) -> int:
        return sum(v.nbytes for v in self.caches.values()) + self.keys.nbytes


class PrefixCache:
    """Thread-safe LRU of prompts' K/V, at most ``max_bytes`` of them (keys included)."""

    def __init__(self, max_bytes: int, min_reused: int = MIN_REUSED_TOKENS):
        if max_bytes < 0:
            raise ValueError(f"the prefix cache size must be >= 0 bytes, got {max_bytes}")
        self.max_bytes, self.min_reused = max_bytes, max(1, min_reused)
        self._entries: OrderedDict[int, _Entry] = OrderedDict()
        self._next = 0
        self._lock = threading.Lock()
        self.bytes = self.hits = self.misses = self.reused_tokens = 0

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, keys: np.ndarray) -> PrefixHit | None:
        """The longest cached prefix of a prompt with these keys (None: none of ``min_reused`` tokens)."""
        limit = len(keys) - 1  # the last token is always prefilled: its logits are the first pick
        best, best_id = 0, None
        with self._lock:
            for entry_id, entry in self._entries.items():
                n = min(limit, len(entry.keys))
                if n <= best:
                    continue
                differ = np.flatnonzero(entry.keys[:n] != keys[:n])
                common = int(differ[0]) if differ.size else n
                if common > best:
                    best, best_id = common, entry_id
            if best_id is None or best < self.min_reused:
                self.misses += 1
                return None
            self._entries.move_to_end(best_id)
            self.hits += 1
            self.reused_tokens += best
            return PrefixHit(best, self._entries[best_id].caches)

    def admits(self, positions: int, position_nbytes: int) -> bool:
        """Whether an entry of ``positions`` positions, ``position_nbytes`` of K/V each, would be kept:
        asked before its K/V are copied out of a batch (a large model's prompt can outgrow the cache)."""
        return positions >= self.min_reused and positions * (position_nbytes + 8) <= self.max_bytes

    def store(self, keys: np.ndarray, caches: Mapping[str, np.ndarray]) -> None:
        """Keep one prompt's K/V (``caches[name]``: [heads, len(keys), head_dim]); the cache owns them."""
        entry = _Entry(np.asarray(keys, dtype=np.int64), dict(caches))
        if not self.admits(len(entry.keys), (entry.nbytes - entry.keys.nbytes) // max(len(entry.keys), 1)):
            return
        with self._lock:
            for entry_id, old in list(self._entries.items()):
                if len(old.keys) >= len(entry.keys) and np.array_equal(old.keys[:len(entry.keys)], entry.keys):
                    self._entries.move_to_end(entry_id)  # already held, within a longer prompt
                    return
                if np.array_equal(entry.keys[:len(old.keys)], old.keys):  # the new prompt extends it
                    self.bytes -= self._entries.pop(entry_id).nbytes
            self._entries[self._next] = entry
            self._next += 1
            self.bytes += entry.nbytes
            while self.bytes > self.max_bytes:
                _, old = self._entries.popitem(last=False)
                self.bytes -= old.nbytes
