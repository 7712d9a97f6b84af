"""The text model's shape as the decoder's runtime sees it: KV-cache geometry and limits."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


#: ``DecoderGeometry.prefill_blocks`` values
PREFILL_BLOCKS = ("", "images", "prompt")


@dataclass(frozen=True)
class LayerState:
    """A fixed-size state one row carries from call to call that the decoder reads whole and returns replaced
    (not a cache that grows by a position per token): a linear-attention layer's convolution window or its
    recurrent matrix. ``shape`` leaves out the batch; the decoder's input is ``past_states.<name>``, its output
    ``present_states.<name>``."""

    name: str
    shape: tuple[int, ...]
    dtype: str = "float32"

    def __post_init__(self):
        object.__setattr__(self, "shape", tuple(int(n) for n in self.shape))  # JSON gives a list


@dataclass(frozen=True)
class DecoderGeometry:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    vocab_size: int
    max_position_embeddings: int | None  # None: no position table bounds the sequence (ALiBi)
    cache_dtype: str = "float32"
    # the shortest attention window of any layer (keys more than this many positions back are not
    # attended); None: every layer attends to the whole sequence
    sliding_window: int | None = None
    # the layers (0-based, in the order the decoder runs them) that attend through that window, which
    # the exported graph cannot show (it folds the window into a mask); empty with a window: not known
    windowed_layers: tuple[int, ...] = ()
    # rotary frequencies picked per call by the batch's largest position (longrope, as Hugging Face's
    # forward does): once a row passes this many positions, its batch-mates' rotary changes with it.
    # None: a row's answer does not depend on the rows batched with it
    batch_switched_positions: int | None = None
    # which tokens of a prefill attend to each other both ways (the attention is causal elsewhere): "" none;
    # "images" each image's placeholders, as one block (Gemma 3's); "prompt" the whole prompt, images and text
    # (PaliGemma's prefix-LM). Where any do, a kernel that masks causally (ONNX Runtime's GroupQueryAttention)
    # cannot run the prefill, and a prefill cannot continue after a cached prefix that ends inside a block
    prefill_blocks: str = ""
    # fixed-size states beside the K/V of ``num_layers`` attention layers (a hybrid LM's linear-attention layers,
    # Qwen3.5's gated delta-nets): the decoder replaces each whole every call, so a row's state after a prefill
    # depends on all of its prompt, and a prefill starts from zeros (empty: a transformer's KV cache alone)
    states: tuple[LayerState, ...] = ()
    # (KV heads, head size) of each of the ``num_layers`` cached layers where they differ from layer to layer (Gemma
    # 4's full-attention layers have fewer, wider heads than its sliding ones); empty: every layer's are
    # (``num_kv_heads``, ``head_dim``), which are otherwise layer 0's
    layer_kv: tuple[tuple[int, int], ...] = ()

    def __post_init__(self):
        object.__setattr__(self, "windowed_layers", tuple(int(i) for i in self.windowed_layers))  # JSON gives a list
        object.__setattr__(self, "layer_kv", tuple((int(h), int(d)) for h, d in self.layer_kv))
        if self.layer_kv and (len(self.layer_kv) != self.num_layers
                              or self.layer_kv[0] != (self.num_kv_heads, self.head_dim)):
            raise ValueError(f"layer_kv {self.layer_kv} is not one (KV heads, head size) per layer of {self.num_layers} "
                             f"starting with layer 0's ({self.num_kv_heads}, {self.head_dim})")
        object.__setattr__(self, "states", tuple(s if isinstance(s, LayerState) else LayerState(**s)
                                                 for s in self.states))
        if self.prefill_blocks not in PREFILL_BLOCKS:
            raise ValueError(f"prefill_blocks {self.prefill_blocks!r} is not one of {PREFILL_BLOCKS}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for name in ("prefill_blocks", "states", "layer_kv"):  # defaults left out: such manifests stay readable by earlier versions
            if not d[name]:
                del d[name]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "DecoderGeometry":
        return cls(**d)

    def layer_windows(self) -> tuple[int | None, ...] | None:
        """Each layer's attention window (None: the whole sequence), in the order the decoder runs
        them; None when there is a window but not which layers it applies to."""
        if self.sliding_window is None:
            return (None,) * self.num_layers
        if not self.windowed_layers:
            return None
        return tuple(self.sliding_window if i in self.windowed_layers else None for i in range(self.num_layers))

    def kv_shape(self, layer: int) -> tuple[int, int]:
        """(KV heads, head size) of cached layer ``layer``."""
        return self.layer_kv[layer] if self.layer_kv else (self.num_kv_heads, self.head_dim)

    def kv_bytes(self, sequence: int, batch: int = 1) -> int:
        """Bytes of the self-attention cache (keys and values of every layer) at ``sequence`` tokens."""
        import numpy as np

        item = np.dtype(self.cache_dtype).itemsize
        width = sum(heads * size for heads, size in map(self.kv_shape, range(self.num_layers)))
        return 2 * batch * sequence * width * item

    def state_bytes(self, batch: int = 1) -> int:
        """Bytes of the fixed-size states (``states``) of ``batch`` rows, whatever their length."""
        import numpy as np

        return batch * sum(int(np.prod(s.shape)) * np.dtype(s.dtype).itemsize for s in self.states)
