"""GPTQ rounding for weight-only blocks (Frantar et al., "GPTQ: Accurate Post-Training Quantization
for Generative Pre-trained Transformers", 2023).

Round-to-nearest (RTN) picks each weight's code alone. GPTQ picks them one input row at a time and
pushes each rounding error onto the rows not yet rounded, weighted by the inverse of the layer
input's second-moment matrix ``H = E[x xᵀ]`` (measured on the calibration pairs), so the errors of a
block cancel in ``x @ W`` where the inputs are correlated instead of adding up. Same codes format,
same kernels, same bytes: only which codes. Choices, each the field's usual one:

* **Static groups**: each block's scale and zero point are RTN's, from the original weights
  (``weight_only.quantize_blocks``), so the block layout MatMulNBits and TensorRT read is untouched
  while the rows are visited out of order.
* **Activation order**: rows with the largest ``H`` diagonal (the inputs that carry the most energy)
  are rounded first, while the most rows are left to absorb their errors.
* **Dampening**: ``1%`` of the mean diagonal is added to ``H``; fewer calibration tokens than input
  channels (a 1536-wide MLP input and a few thousand tokens) leave it singular otherwise.

Measured on the demo (SmolLM2-135M, whose weights already lie on GGUF Q4_1 grids, so any other 4-bit
grid re-rounds them), 60 easy-vqa questions, PyTorch 54/60: zero-point w4 with RTN 28/60, with GPTQ
52-54/60; symmetric w4 (w4 head) with RTN 17/60, with GPTQ 52/60 (README.md, "Precision per stage").
"""
from __future__ import annotations

from typing import Iterable, Mapping

import numpy as np
import onnx

from ..errors import ExportError
from .probe import activations
from .weight_only import BlockQuantized, quantize_blocks

#: share of H's mean diagonal added to its diagonal (GPTQ's ``percdamp`` default)
DAMP = 0.01
#: rows updated together before the rest of the matrix is (GPTQ's lazy batch); speed only
LAZY_BATCH = 128


def input_hessians(model: onnx.ModelProto, tensors: list[str], feeds: Iterable[Mapping[str, np.ndarray]],
                   threads: int = 2) -> tuple[dict[str, np.ndarray], int]:
    """``E[x xᵀ]`` over every token of every feed for each of ``tensors`` (a MatMul's input, its last
    axis the channels), and the number of tokens it was measured on."""
    sums: dict[str, np.ndarray] = {}
    tokens = 0
    for values in activations(model, tensors, feeds, threads):
        for name, value in values.items():
            x = value.reshape(-1, value.shape[-1]).astype(np.float64)
            sums[name] = sums.get(name, 0) + x.T @ x
        tokens += x.shape[0]
    if not tokens:
        raise ExportError("GPTQ needs calibration inputs to measure the layer inputs; none were given")
    return {name: s / tokens for name, s in sums.items()}, tokens


def gptq_blocks(weight: np.ndarray, hessian: np.ndarray, bits: int, block_size: int, scheme: str,
                scale_dtype=np.float32, act_order: bool = True) -> BlockQuantized:
    """``weight`` [K, N] (``x @ weight``) quantized like ``quantize_blocks`` (same scales, zero points
    or offsets) with its codes chosen by GPTQ against ``hessian`` [K, K]."""
    k, n = weight.shape
    if hessian.shape != (k, k):
        raise ExportError(f"GPTQ: the input's second moments are {hessian.shape}, the weight has K={k}")
    rtn = quantize_blocks(weight, bits, block_size, scheme, scale_dtype)
    blocks = rtn.scales.shape[1]
    width = blocks * block_size  # MatMulNBits pads K to whole blocks; the padded rows stay zero
    w = np.zeros((n, width), np.float64)
    w[:, :k] = weight.T
    h = np.zeros((width, width), np.float64)
    h[:k, :k] = hessian
    dead = np.diag(h) == 0  # an input that never fired (or padding): its row cannot matter
    h[dead, dead] = 1
    w[:, dead] = 0
    scales = np.repeat(rtn.scales.astype(np.float64), block_size, axis=1)  # [N, width], per row
    zero = (rtn.offsets if rtn.offsets is not None else rtn.zero_points if rtn.zero_points is not None
            else np.full(rtn.scales.shape, 2 ** (bits - 1)))
    zero = np.repeat(zero.astype(np.float64), block_size, axis=1)
    low, top = (1 if scheme == "symmetric" else 0), 2 ** bits - 1  # symmetric codes never use 0
    order = np.argsort(-np.diag(h), kind="stable") if act_order else np.arange(width)
    w, h, scales, zero = w[:, order], h[np.ix_(order, order)], scales[:, order], zero[:, order]
    h[np.diag_indices(width)] += DAMP * np.mean(np.diag(h))
    try:
        hinv = np.linalg.cholesky(np.linalg.inv(h)).T  # upper: row i holds what row i's error feeds forward
    except np.linalg.LinAlgError:
        raise ExportError("GPTQ: the layer input's second moments are not positive definite even dampened; "
                          "use more calibration pairs or --weight-rounding rtn") from None
    codes = np.zeros((n, width), np.float64)
    for start in range(0, width, LAZY_BATCH):
        stop = min(start + LAZY_BATCH, width)
        part, errors, hpart = w[:, start:stop].copy(), np.zeros((n, stop - start)), hinv[start:stop, start:stop]
        for i in range(stop - start):
            col, s, z = part[:, i], scales[:, start + i], zero[:, start + i]
            q = np.clip(np.rint(col / s + z), low, top)
            codes[:, start + i] = q
            errors[:, i] = (col - (q - z) * s) / hpart[i, i]
            part[:, i:] -= np.outer(errors[:, i], hpart[i, i:])
        w[:, stop:] -= errors @ hinv[start:stop, stop:]
    codes[:, order] = codes.copy()
    return BlockQuantized(codes.astype(np.uint8).reshape(n, blocks, block_size), rtn.scales, bits, block_size, k,
                          zero_points=rtn.zero_points, offsets=rtn.offsets)


def rounding(hessians: Mapping[str, np.ndarray], act_order: bool = True):
    """A ``blocks`` function for ``weight_only.quantize_weights``: GPTQ for each MatMul with a
    measured input, round to nearest for any other; its ``gptq`` attribute lists the MatMuls it
    rounded with GPTQ (so a caller can tell that none fell back unnoticed)."""
    def blocks(matmul: str, weight: np.ndarray, bits: int, block_size: int, scheme: str, scale_dtype=np.float32):
        if matmul not in hessians:
            return quantize_blocks(weight, bits, block_size, scheme, scale_dtype)
        blocks.gptq.append(matmul)
        return gptq_blocks(weight, hessians[matmul], bits, block_size, scheme, scale_dtype, act_order)

    blocks.gptq = []
    return blocks
