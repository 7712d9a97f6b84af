"""Latency and throughput of a build: PyTorch vs ONNX Runtime vs Triton, stage by stage, on the
same inputs, with the memory-bandwidth ceiling beside the decode figures (issue 6)."""
from .report import markdown, write_reports
from .run import BACKENDS, BenchOptions, parse_csv, run_bench

__all__ = ["BACKENDS", "BenchOptions", "markdown", "parse_csv", "run_bench", "write_reports"]
