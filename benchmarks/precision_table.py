"""One table for the demo's precision variants: per-stage error against the fp32 PyTorch
reference, first divergent greedy token, easy-vqa accuracy on the same questions with the gate's
verdict, weights read per token, and decode speed against PyTorch eager fp32 from the same run.

    python benchmarks/precision_table.py build/precision --variants fp32 w8 w4 int8 fp16

Reads each variant's report.json (``<root>/<variant>/`` or ``<root>/<variant>.failed/``) and its
bench.json (``results/precision/<variant>/``); writes ``results/precision/summary.{json,md}``.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "precision"


def _report(root: Path, variant: str) -> tuple[dict | None, bool]:
    for folder, shipped in ((root / variant, True), (root / f"{variant}.failed", False)):
        if (folder / "report.json").exists():
            return json.loads((folder / "report.json").read_text()), shipped
    return None, False


def _bench(variant: str) -> dict | None:
    path = RESULTS / variant / "bench.json"
    return json.loads(path.read_text()) if path.exists() else None


def _decode(bench: dict, backend: str) -> float | None:
    return next((r["latency_ms"]["p50"] for r in bench["stages"]
                 if r["stage"] == "decode_step" and r["backend"] == backend), None)


def summarize(report: dict, shipped: bool, bench: dict | None) -> dict:
    stages = {f"{stage}/{name}": {"cosine": m["cosine"], "max_abs": m["max_abs"], "passed": m["passed"]}
              for stage, outputs in report["stages"].items() for name, m in outputs.items()
              if name in ("image_features", "image_embeds", "logits")}
    runs = report["end_to_end"].get("onnxruntime", [])
    divergences = [r["first_divergence"] for r in runs if not r["identical"]]
    row = {
        "precision": {s: g["precision"] for s, g in report["graphs"].items()},
        "shipped": shipped, "failures": report["failures"], "stages": stages,
        "prompts_identical": f"{sum(r['identical'] for r in runs)}/{len(runs)}",
        "earliest_divergent_token": min(divergences) if divergences else None,
        "decoder_mb": round(report["graphs"]["lm_decoder"]["bytes"] / 1e6, 1),
    }
    acc = report.get("task_accuracy")
    if acc:
        by = {r["backend"]: r for r in acc["results"]}
        row["accuracy"] = {"dataset": acc["dataset"], "questions": acc["questions"],
                           "torch_fp32": by["torch"]["accuracy"], "variant": by["onnxruntime"]["accuracy"],
                           "answers_changed": len(acc["disagreements"]), "gate": acc.get("gate")}
    if bench:
        torch_ms, ort_ms = _decode(bench, "torch"), _decode(bench, "onnxruntime")
        ceiling = bench["ceiling"]
        row["speed"] = {
            "decode_step_ms": {"torch_fp32": torch_ms, "onnxruntime": ort_ms},
            "decode_speedup": round(torch_ms / ort_ms, 2) if torch_ms and ort_ms else None,
            "ttft_speedup": bench["ratios"]["end_to_end"].get("onnxruntime", {}).get("ttft_speedup_p50"),
            "read_per_token_mb": round(ceiling["bytes_per_token"] / 1e6, 1),
            "ceiling_fraction": ceiling["backends"].get("onnxruntime", {}).get("decode_step_fraction"),
            "bandwidth_gb_s": ceiling["bandwidth_gb_s"]["p50"],
            "machine": bench["machine"].get("cpu"), "threads": bench["threads"], "busy": bench["contention"]["busy"],
        }
    return row


def markdown(rows: dict[str, dict]) -> str:
    lines = ["# Demo precision variants (easy-vqa VLM, ONNX Runtime CPU)", "",
             "Every variant against the fp32 PyTorch reference: stage errors on the parity samples, greedy "
             "tokens vs HF generate, easy-vqa answers on the same test questions, and one decode step "
             "timed against PyTorch eager fp32 in the same run.", "",
             "| variant | shipped | prefill logits cos | vision cos | identical prompts (first divergent token) "
             "| easy-vqa fp32 -> variant (changed) | gate | decoder MB | read/token MB | decode ms torch -> ORT "
             "| decode speed-up | % of ceiling (bandwidth) | TTFT speed-up |",
             "|---|---|---:|---:|---|---|---|---:|---:|---|---:|---:|---:|"]
    for name, r in rows.items():
        st = r["stages"]
        acc, sp = r.get("accuracy"), r.get("speed")
        gate = "-" if not acc or not acc.get("gate") else ("pass" if acc["gate"]["passed"] else "**FAIL**")
        acc_text = "-" if not acc else (f"{100 * acc['torch_fp32']:.1f}% -> {100 * acc['variant']:.1f}% "
                                        f"({acc['answers_changed']})")
        first = r["earliest_divergent_token"]
        speed = ("-",) * 5 if not sp else (
            f"{sp['read_per_token_mb']}", f"{sp['decode_step_ms']['torch_fp32']:.1f} -> {sp['decode_step_ms']['onnxruntime']:.1f}",
            f"{sp['decode_speedup']}x",
            f"{100 * sp['ceiling_fraction']:.0f}% ({sp['bandwidth_gb_s']:.0f} GB/s)" if sp["ceiling_fraction"] else "-",
            f"{sp['ttft_speedup']}x")
        lines.append(f"| {name} | {'yes' if r['shipped'] else '**no**'} | "
                     f"{st['prefill/logits']['cosine']:.6f} | {st['vision_encoder/image_features']['cosine']:.6f} | "
                     f"{r['prompts_identical']}{'' if first is None else f' (from {first})'} | {acc_text} | {gate} | "
                     f"{r['decoder_mb']} | " + " | ".join(speed) + " |")
    failed = {n: r["failures"] for n, r in rows.items() if r["failures"]}
    if failed:
        lines += ["", "Failed gates:", ""] + [f"- {n}: {'; '.join(f)}" for n, f in failed.items()]
    machines = {r["speed"]["machine"] for r in rows.values() if r.get("speed")}
    lines += ["", f"Machine: {', '.join(sorted(m for m in machines if m))}; threads and load per run in "
              "`<variant>/bench.md`. Each speed-up is PyTorch eager fp32 (the source model) over the "
              "variant, measured in the same run."]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("root", type=Path, help="folder holding one build per variant")
    p.add_argument("--variants", nargs="+", default=["fp32", "w8", "w4", "int8", "fp16", "int8img", "mixed"])
    args = p.parse_args()
    rows = {}
    for v in args.variants:
        report, shipped = _report(args.root, v)
        if report is None:
            print(f"{v}: no build or failed build under {args.root}; skipped")
            continue
        rows[v] = summarize(report, shipped, _bench(v) if shipped else None)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "summary.json").write_text(json.dumps(rows, indent=2))
    (RESULTS / "summary.md").write_text(markdown(rows))
    print((RESULTS / "summary.md").read_text())


if __name__ == "__main__":
    main()
