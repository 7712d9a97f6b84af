"""How much of a decode step is Python, not the decoder: each step's wall time against the time
spent inside ONNX Runtime's ``run_with_iobinding`` (timed around it), p50 over the steps, in two
loops on the build's in-place KV path:

* ``pipeline``: ``VLMPipeline.step`` and a greedy argmax (what the bench's peer table times);
* ``scheduler``: ``runtime.generate.Scheduler`` on one image request (what a user's ``generate`` /
  ``stream`` and the served model run: sampling, text streaming and scheduling included).

Run it twice, once with ``PYTHONPATH=OTHER_CHECKOUT/src``, to compare two versions of the code on
the same build (decode-step wall times move by 10% on a shared VM; the Python share moves less).

    .venv/bin/python benchmarks/step_python.py BUILD [--steps 150] [--rounds 3]
"""
import argparse
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from PIL import Image

from vlm_export.adapters.reference import open_pipeline
from vlm_export.runtime.generate import GenerationConfig, Scheduler, prepare_request

runs: list[int] = []
_run = ort.InferenceSession.run_with_iobinding


def _timed_run(self, *args, **kwargs):
    t = time.perf_counter_ns()
    try:
        return _run(self, *args, **kwargs)
    finally:
        runs.append(time.perf_counter_ns() - t)


ort.InferenceSession.run_with_iobinding = _timed_run


def pipeline_loop(pipe, steps: int) -> tuple[np.ndarray, np.ndarray]:
    ids = pipe.prompt_ids("What animal is in the picture?", 0)
    logits, prefilled = pipe.prefill(list(ids), pipe.scheme.empty_image_input())
    state = pipe.running(prefilled, [len(ids) + steps + 1])
    token, walls = int(np.argmax(logits)), []
    runs.clear()
    for _ in range(steps):
        t = time.perf_counter_ns()
        logits, state = pipe.step(state, np.asarray([token]))
        token = int(np.argmax(logits[0]))
        walls.append(time.perf_counter_ns() - t)
    return np.asarray(walls), np.asarray(runs)


def scheduler_loop(pipe, steps: int) -> tuple[np.ndarray, np.ndarray]:
    image = Image.fromarray((np.random.default_rng(0).random((64, 64, 3)) * 255).astype("uint8"))
    config = GenerationConfig(max_new_tokens=steps + 1, ignore_eos=True)
    scheduler = Scheduler(pipe, max_batch=1)
    scheduler.submit(*prepare_request(pipe, "What is in the picture?", [image], config), config)
    scheduler.step()  # the prefill, and the first token
    walls = []
    runs.clear()
    while not scheduler.idle:
        t = time.perf_counter_ns()
        scheduler.step()
        walls.append(time.perf_counter_ns() - t)
    return np.asarray(walls[:len(runs)]), np.asarray(runs[:len(walls)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("build", type=Path)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    pipe = open_pipeline(args.build, threads=args.threads, check_hashes=False)
    if not pipe.kv_in_place:
        raise SystemExit(f"{args.build}: its decoder has no in-place KV form on this backend; nothing to time")
    for name, loop in (("pipeline", pipeline_loop), ("scheduler", scheduler_loop)):
        loop(pipe, 20)  # warm-up
        for _ in range(args.rounds):
            walls, inside = loop(pipe, args.steps)
            print(f"{name:9s} step p50 {np.median(walls) / 1e6:7.3f} ms  decoder call p50 {np.median(inside) / 1e6:7.3f} ms"
                  f"  Python p50 {np.median(walls - inside) / 1e3:5.0f} us")


if __name__ == "__main__":
    main()
