"""Bench a build and record the results in benchmarks/results/<name>/ (bench.json, bench.md, PNGs).

    python benchmarks/run_bench.py build/demo --name demo
    python benchmarks/run_bench.py /tmp/builds/realistic --name realistic-fp32 --concurrency 1,4,16

The same measurement as ``vlm-export bench`` (vlm_export.bench.run_bench); this script only
fixes where recorded results go. Run it on a machine nobody else is using if you can: the
report marks a run that started on a busy machine.
"""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def _wait_idle(seconds: float) -> None:
    """On a shared machine, start when others are quiet: the report marks a run that was not."""
    deadline = time.monotonic() + seconds
    while os.getloadavg()[0] > 0.5 * len(os.sched_getaffinity(0)) and time.monotonic() < deadline:
        time.sleep(10)


def main() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from vlm_export.bench import BenchOptions, parse_csv, run_bench
    from vlm_export.progress import RichProgress

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("build", type=Path)
    p.add_argument("--name", default=None, help="results folder name (default: the build folder's name)")
    p.add_argument("--backends", default="torch,onnxruntime,triton")
    p.add_argument("--batch", default="1,4")
    p.add_argument("--concurrency", default="1,2,4,8,16")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--iterations", type=int, default=20)
    p.add_argument("--requests", type=int, default=6)
    p.add_argument("--no-prefix-cache", action="store_true",
                   help="skip the prefix-cache section (the served model keeps its cache)")
    p.add_argument("--wait-idle", type=float, default=0, metavar="SECONDS",
                   help="first wait up to this long for the 1-minute load to fall below half the cores")
    args = p.parse_args()
    _wait_idle(args.wait_idle)
    name = args.name or args.build.name
    options = BenchOptions(backends=parse_csv(args.backends, "--backends"),
                           batch=parse_csv(args.batch, "--batch", int),
                           concurrency=parse_csv(args.concurrency, "--concurrency", int), new_tokens=args.new_tokens,
                           threads=args.threads, iterations=args.iterations, requests=args.requests,
                           prefix_cache=not args.no_prefix_cache, out=RESULTS / name, name=name)
    results = run_bench(args.build, options, RichProgress())
    print((RESULTS / name / "bench.md").read_text())
    print(f"recorded in {RESULTS / name}: " + ", ".join(Path(f).name for f in results["files"].values()))


if __name__ == "__main__":
    main()
