"""What keeping a finished answer's K/V in the prefix cache buys a conversation's next turn, in
process: the second turn's time to first token with the cache off, with an entry of the first
prompt only (what the cache kept before answers were kept), and with the prompt and its answer.
Records benchmarks/results/<name>/answer_reuse.json and answer_reuse.md.

    python benchmarks/answer_reuse.py build/demo-int8 --name int8-answer-reuse-epyc --answer-tokens 64

The demo model answers in a word or two, so the first answer is ``--answer-tokens`` tokens with EOS
ignored, and the second turn's prompt is built from ids: the first prompt, the answer's tokens as
generated, then the follow-up question's tokens (a chat client's re-tokenized history would give
the same ids wherever the template re-tokenizes the answer alike). Every conversation has a new
image (a photo rolled sideways). The three settings take turns in mirrored order per conversation.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
QUESTION, FOLLOW_UP = "What animal is in the picture?", " Tell me more about it."
PHOTOS = ("chelsea", "coffee", "astronaut")
MODES = ("off", "prompt", "answer")


def main() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from PIL import Image
    from skimage import data

    from vlm_export.bench import measure
    from vlm_export.manifest import read_manifest
    from vlm_export.runtime.generate import GenerationConfig, generate_ids
    from vlm_export.runtime.load import open_build
    from vlm_export.runtime.prefix_cache import PrefixCache

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("build", type=Path)
    p.add_argument("--name", default=None)
    p.add_argument("--answer-tokens", type=int, default=64)
    p.add_argument("--conversations", type=int, default=24)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()

    pipe = open_build(args.build, threads=args.threads)
    photos = [Image.fromarray(np.roll(getattr(data, PHOTOS[i % len(PHOTOS)])(), 3 * (i // len(PHOTOS)) + 1, axis=1))
              .convert("RGB") for i in range(args.conversations + 1)]  # the first: a warm-up
    follow_up = pipe.tokenizer(FOLLOW_UP, add_special_tokens=False)["input_ids"]
    first_config = GenerationConfig(max_new_tokens=args.answer_tokens, ignore_eos=True)
    one = GenerationConfig(max_new_tokens=1)
    ttft: dict[str, list[float]] = {m: [] for m in MODES}
    reused: dict[str, list[int]] = {m: [] for m in MODES}
    for i, photo in enumerate(photos):
        ids = pipe.prompt_ids(QUESTION, 1)
        image = pipe.encode_images(pipe.pixel_values([photo]))
        caches = {"off": None, "prompt": PrefixCache(256 << 20), "answer": PrefixCache(256 << 20)}
        pipe.prefix_cache = caches["answer"]  # the first turn as served: its prompt and answer kept
        answer = generate_ids(pipe, ids, image, first_config)
        pipe.prefix_cache = caches["prompt"]  # the first prompt alone
        _, state = pipe.prefill(ids, image)
        caches["prompt"].store(pipe.prefix_keys(ids, image), state.row_caches(0))
        second = ids + answer[:-1] + follow_up  # the last answer token was sampled, never decoded
        for mode in (MODES if i % 2 == 0 else MODES[::-1]):
            cache = pipe.prefix_cache = caches[mode]
            before = cache.reused_tokens if cache else 0
            start = time.perf_counter()
            generate_ids(pipe, second, image, one)  # one token: the time to first token
            if i:
                ttft[mode].append(time.perf_counter() - start)
                reused[mode].append(cache.reused_tokens - before if cache else 0)
        pipe.prefix_cache = None

    rows = [{"cache": m, "ttft_ms": measure.summarize(ttft[m]), "reused_tokens": round(float(np.mean(reused[m])), 1)}
            for m in MODES]
    for r in rows:
        r["speedup_vs_off"] = round(rows[0]["ttft_ms"]["p50"] / r["ttft_ms"]["p50"], 3)
    out = {"created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "build": str(args.build),
           "machine": measure.machine(), "load_average": measure.load_average(),
           "decoder_precision": read_manifest(args.build)["graphs"][pipe.scheme.decoder_stage]["precision"],
           "backend": pipe.backend, "first_prompt_tokens": len(ids), "answer_tokens": args.answer_tokens,
           "second_prompt_tokens": len(second), "conversations": args.conversations,
           "threads": args.threads or "ONNX Runtime default (every core)", "rows": rows}
    folder = RESULTS / (args.name or args.build.name)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "answer_reuse.json").write_text(json.dumps(out, indent=2))
    lines = [f"# A conversation's second turn with the prefix cache: {args.build.name}", "",
             f"{out['created']}, {out['machine']['cpu']} ({out['machine']['usable_cores']} cores), load "
             f"{out['load_average']}, {pipe.backend}, decoder {out['decoder_precision']}. {args.conversations} "
             f"conversations, each with a new image: a {len(ids)}-token first prompt, a {args.answer_tokens}-token "
             f"answer (EOS ignored), then a {len(second)}-token second turn (the first prompt, the answer's tokens, "
             "the follow-up's), timed to its first token; settings in mirrored order per conversation.", "",
             "| cache | TTFT p50 / p90 (ms) | speed-up | tokens reused |", "|---|---:|---:|---:|"]
    names = {"off": "off", "prompt": "the first prompt only", "answer": "the first prompt and its answer"}
    for r in rows:
        lines.append(f"| {names[r['cache']]} | {r['ttft_ms']['p50']} / {r['ttft_ms']['p90']} | "
                     f"{r['speedup_vs_off']}x | {r['reused_tokens']} |")
    (folder / "answer_reuse.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
