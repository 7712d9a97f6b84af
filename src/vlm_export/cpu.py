"""What this CPU can do that changes which kernels are exact or fast. ONNX Runtime's U8S8 integer
GEMM (uint8 activations x int8 weights) adds pairs of products in int16 on x86 CPUs with AVX2 only
(``vpmaddubsw``), which saturates on large codes (measured on an AMD EPYC: 22% error on a row); with
VNNI or AMX it accumulates each product in int32 and is exact (measured on a Xeon with AVX-512 VNNI
and AMX: no error on all-255 x all-127 codes) and about 2x faster than fp32 there."""
from __future__ import annotations

import functools
import platform

#: features with which ONNX Runtime's U8S8 kernels accumulate in int32 (exact)
INT8_DOT_PRODUCT = ("amx_int8", "avx512_vnni", "avx_vnni")
#: graph metadata naming those features, written into a graph whose kernels need one of them
#: (runtime.runners.OrtRunner refuses to open it on a CPU without)
INT8_DOT_PRODUCT_METADATA = "vlm_export.int8_dot_product"
#: graph metadata of an int8 Q/DQ graph that ONNX Runtime's CPU provider serves (an image stage): on
#: x86 it fuses the pairs into U8S8 kernels, exact only with INT8_DOT_PRODUCT; without them
#: runtime.runners.OrtRunner runs the pairs as written (exact, at about fp32's speed) instead
INT8_QDQ_METADATA = "vlm_export.int8_qdq"
#: ONNX Runtime's session option that runs QuantizeLinear/DequantizeLinear pairs as written (dequantize,
#: then the fp32 op) instead of fusing them into those CPU integer kernels: TensorRT's arithmetic (int8
#: products summed exactly), for judging a graph only TensorRT serves
QDQ_AS_WRITTEN = ("session.disable_quant_qdq", "1")


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (Linux /proc/cpuinfo; empty where it cannot be read)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def _x86() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64", "i686", "x86")


def int8_dot_product() -> str | None:
    """The x86 feature that makes U8S8 exact here, or None (an AVX2-only x86 CPU, or one whose
    flags cannot be read: the caller then takes the exact U8U8 kernels)."""
    if not _x86():
        return None
    flags = cpu_flags()
    return next((f for f in INT8_DOT_PRODUCT if f in flags), None)


def u8s8_saturates() -> bool:
    """Whether ONNX Runtime's U8S8 kernels add products pairwise in int16 here (an x86 CPU without
    VNNI/AMX, or whose flags cannot be read), so an int8 Q/DQ graph fused into them can saturate.
    Elsewhere they sum in int32: x86 with INT8_DOT_PRODUCT (measured), ARM, whose MLAS kernels
    widen each product first (its design; not measured here)."""
    return _x86() and int8_dot_product() is None
