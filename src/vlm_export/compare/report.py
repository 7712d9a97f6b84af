"""report.json (every number) and report.md (the table a person reads) in the build folder."""
from __future__ import annotations

import functools
import json
import math
from pathlib import Path

from ..atomic import write_text
from ..manifest import stage_forms, targets
from .captions import caption_markdown
from .parity import ParityResult
from .policy import FLOAT64_SPREAD, ParityPolicy, Tolerance


def report_dict(manifest: dict, result: ParityResult, policy: ParityPolicy, failures: list[str]) -> dict:
    stages, bound = {}, policy.near_tie_bound(result.stages)
    for stage, outputs in result.stages.items():
        tol, exact = policy.tolerance(stage), result.exact.get(stage, {})
        stages[stage] = {
            name: {**m.to_dict(), "allowed_max_abs": _finite(tol.allowed(m)), "min_cosine": tol.min_cosine,
                   "passed": not policy.problems(stage, name, m, result.exact),
                   # an element-wise failure measured against PyTorch in float64 (policy.Tolerance.check_exact):
                   # the worst of each side over the calls, and each call (judged on its own)
                   **({"float64": _float64_record(exact[name])} if name in exact else {})}
            for name, m in outputs.items()
        }
    return {
        "passed": not failures,
        "failures": failures,
        "source": manifest["source"],
        "versions": manifest["versions"],
        "graphs": {k: {"precision": g["precision"], "bytes": g["bytes"], "export_seconds": g["export_seconds"],
                       "forms": {form: _form_summary(entry, g.get("fusion") if form == "fused" else None)
                                 for form, entry in stage_forms(g).items()},
                       **({"fusion": g["fusion"]} if "fusion" in g else {})}
                   for k, g in manifest["graphs"].items()},
        # which form each target runs: the plain prefill/decode entries are the onnxruntime target's form,
        # "<entry> (<form> form)" the decoder's other forms
        "targets": targets(manifest),
        "stages": stages,
        # the element-wise gate of the fp32 stages (a user may have set it: --fp32-atol / --fp32-rtol)
        "fp32_gate": {"atol": policy.fp32.atol, "rtol": policy.fp32.rtol},
        # near_tie: a divergence passed because the tokens' logits were nearer than the decode gate can tell apart
        "end_to_end": {name: [{**r.to_dict(), "near_tie": policy.near_tie(r, bound)} for r in runs]
                       for name, runs in result.tokens.items()},
    }


def _float64_record(calls: list) -> dict:
    """One output's float64 measurements: each side's worst over the calls, and every call's pair."""
    worst = functools.reduce(lambda a, b: a.merge(b), calls)
    return {**worst.to_dict(), "calls": [m.to_dict() for m in calls]}


def _form_summary(entry: dict, fusion: dict | None) -> dict:
    """One form's line in the report; ``fusion`` (the stage's fusion record) only for the fused form: its
    node count belongs to that form (the record sits on the stage's primary entry, which may be the standard one)."""
    return {"file": entry["file"], "precision": entry["precision"], "bytes": entry["bytes"],
            **({"nodes": fusion["nodes_after"]} if fusion and "nodes_after" in fusion else {})}


def _finite(x: float) -> float | None:
    """JSON has no infinity: an unbounded tolerance is written as null."""
    return x if math.isfinite(x) else None


def write_report(build_dir: Path, manifest: dict, result: ParityResult, policy: ParityPolicy,
                 failures: list[str]) -> dict:
    report = report_dict(manifest, result, policy, failures)
    build_dir = Path(build_dir)
    previous = build_dir / "report.json"
    if previous.exists():  # a re-verify keeps the task accuracy and caption metrics measured earlier
        earlier = json.loads(previous.read_text())
        for key in ("task_accuracy", "captions", "cost"):  # cost: the build's, not the re-verify's
            if earlier.get(key):
                report[key] = earlier[key]
    (build_dir / "report.json").write_text(json.dumps(report, indent=2))
    (build_dir / "report.md").write_text(render_markdown(report))
    return report


def render_markdown(report: dict) -> str:
    lines = [f"# Parity report: {'PASSED' if report['passed'] else 'FAILED'}", "",
             f"Source: `{report['source']['path']}` (adapter `{report['source']['adapter']}`)", ""]
    lora = report["source"].get("lora")
    if lora:
        worst = max(lora["max_abs"].values(), default=0.0)
        lines += [f"Merged {lora['peft_type']} adapter `{lora['path']}` (rank {lora['rank']}, targets "
                  f"{', '.join(lora['target_modules'])}): merged vs unmerged max abs {worst:.3g} over the stages"
                  + ("" if lora["changed"] else " - the adapter changes nothing (untrained?)")
                  + (f"; given their own copy of a tied weight: {', '.join(lora['untied'])}" if lora.get("untied") else ""),
                  ""]
    gate, default = report.get("fp32_gate"), Tolerance()
    if gate and (gate["atol"], gate["rtol"]) != (default.atol, default.rtol):
        lines += [f"**The fp32 gate was set by the user**: max abs <= {gate['atol']:g} + {gate['rtol']:g} x the output's "
                  f"largest magnitude (default {default.atol:g} + {default.rtol:g} x).", ""]
    v = report["versions"]
    lines += [f"torch {v['torch']}, transformers {v['transformers']}, onnxruntime {v['onnxruntime']}", "",
              "## Graphs", "", "| stage | form | precision | size (MB) | export (s) | run by |",
              "|---|---|---|---:|---:|---|"]
    runs = report.get("targets") or {}
    notes = []
    for stage, g in report["graphs"].items():
        forms = g.get("forms") or {"standard": {"precision": g["precision"], "bytes": g["bytes"]}}
        for form, f in forms.items():
            users = ", ".join(t for t, by_stage in runs.items() if by_stage.get(stage) == form) or "-"
            lines.append(f"| {stage} | {form} | {f['precision']} | {f['bytes'] / 1e6:.1f} | "
                         f"{g['export_seconds']:.1f} | {users} |")
        fusion = g.get("fusion")
        if fusion and fusion.get("made"):
            counts = ", ".join(f"{n} {k}" for k, n in fusion.get("fusions", {}).items() if n)
            notes.append(f"{stage}: fused form {fusion.get('nodes_before')} -> {fusion.get('nodes_after')} nodes "
                         f"({counts}), made in {fusion.get('seconds', 0):.1f} s")
        elif fusion:
            notes.append(f"{stage}: no fused form - {fusion.get('reason')}")
    if notes:
        lines += [""] + [f"- {n}" for n in notes]
    lines += ["", "## Per stage (ONNX Runtime vs fp32 PyTorch, same inputs)", "",
              *(["each stage in the form the onnxruntime target runs; \"(standard form)\": the stage's standard "
                 "graph (TensorRT's) beside it, judged by the same tolerances; on a CPU its Q/DQ pairs run "
                 "as written (TensorRT's arithmetic), not fused into ONNX Runtime's int8 kernels", ""]
                if any(" form)" in stage for stage in report["stages"]) else []),
              "| stage | output | max abs | allowed | mean abs | min cosine | pass |",
              "|---|---|---:|---:|---:|---:|---|"]
    exact = []
    for stage, outputs in report["stages"].items():
        for name, m in outputs.items():
            allowed = "-" if m["allowed_max_abs"] is None else f"{m['allowed_max_abs']:.3g}"
            verdict = ("yes" if not m.get("float64") else "yes, by float64") if m["passed"] else "**NO**"
            lines.append(f"| {stage} | {name} | {m['max_abs']:.3g} | {allowed} | "
                         f"{m['mean_abs']:.3g} | {m['cosine']:.7f} | {verdict} |")
            if m.get("float64"):
                exact.append((stage, name, m))
    if exact:
        lines += ["", "### Failed against fp32 PyTorch, so measured against PyTorch in float64 (same inputs)", "",
                  f"An fp32 output passes here when ONNX Runtime's is at most {FLOAT64_SPREAD:g}x as far from the float64 "
                  "one as PyTorch's own fp32 output is, plus the gate: then the difference is the model's fp32 arithmetic "
                  "magnified (an ill-conditioned computation), not the export. Each recorded call is judged on its "
                  "own (report.json lists them); the table gives each side's worst over the calls.", "",
                  "| stage | output | PyTorch fp32 vs float64 (max abs / cosine) | ONNX vs float64 (max abs / cosine) "
                  "| pass |", "|---|---|---:|---:|---|"]
        for stage, name, m in exact:
            r, c = m["float64"]["reference"], m["float64"]["candidate"]
            lines.append(f"| {stage} | {name} | {r['max_abs']:.3g} / {r['cosine']:.7f} | {c['max_abs']:.3g} / "
                         f"{c['cosine']:.7f} | {'yes' if m['passed'] else '**NO**'} |")
    lines += ["", "## End to end (greedy tokens vs the original model's HF generate)", "",
              "Where the tokens part, the candidate is run again along the reference's tokens (teacher forcing) and "
              "every position where it would choose another token is listed with its margin: how far its own token "
              "led the reference's in its log-probabilities. Where every margin is within twice the logits error the "
              "decode gate allows, the tokens are near ties any graph the gate accepts may swap, and an fp32 build "
              "passes; beyond it, a drift. A batched row is compared with the same build's answer alone, to its "
              "first divergence.", "",
              "| candidate | prompt | tokens | first divergent token | departures (token: margin) |",
              "|---|---|---:|---|---|"]
    for name, runs in report["end_to_end"].items():
        for r in runs:
            first = "none (identical)" if r["identical"] else \
                f"{r['first_divergence']}{' (a near tie: passed)' if r.get('near_tie') else ''}"
            departures = ", ".join(f"{d['token']}: {'-' if d['margin'] is None else format(d['margin'], '.3g')}"
                                   for d in r.get("departures", ())) or "-"
            lines.append(f"| {name} | {r['prompt']} | {len(r['candidate'])}/{len(r['reference'])} | {first} | "
                         f"{departures} |")
    if report.get("task_accuracy"):
        acc = report["task_accuracy"]
        lines += ["", f"## Task accuracy ({acc['dataset']}, {acc['questions']} questions, greedy, exact match)", "",
                  "| backend | accuracy | correct | seconds | batch |", "|---|---:|---:|---:|---:|"]
        for r in acc["results"]:
            lines.append(f"| {r['backend']} | {100 * r['accuracy']:.1f}% | {r['correct']}/{r['questions']} | "
                         f"{r['seconds']:.1f} | {r.get('batch', 1)} |")
        lines.append(f"\nAnswers that differ between backends: {len(acc['disagreements'])}")
        gate = acc.get("gate")
        if gate:
            changes = ", ".join(f"{b} {0.0 - d:+.1f} points" for b, d in gate["drop_points"].items())
            lines.append(f"\nAccuracy gate (at most {gate['max_drop_points']:g} points below {gate['reference']}): "
                         f"{changes}: {'passed' if gate['passed'] else '**FAILED**'}")
    if report.get("captions"):
        lines += [""] + caption_markdown(report["captions"])
    if report.get("cost"):
        lines += [""] + cost_markdown(report["cost"])
    if report["failures"]:
        lines += ["", "## Failures", ""] + [f"- {f}" for f in report["failures"]]
    return "\n".join(lines) + "\n"


def cost_markdown(cost: dict) -> list[str]:
    """What each build step took: wall time and the process's peak resident memory."""
    def gb(n):
        return "-" if n is None else f"{n / 1e9:.2f}"

    lines = [f"## Build cost ({cost['seconds']:.0f} s in steps; peak resident memory {gb(cost['peak_bytes'])} GB"
             + (f", in \"{cost['peak_step']}\")" if cost.get("peak_step") else ")"), "",
             "| step | seconds | peak GB |", "|---|---:|---:|"]
    lines += [f"| {'&nbsp;&nbsp;' * c['depth']}{c['step']} | {c['seconds']:.1f} | {gb(c['peak_bytes'])} |"
              for c in cost["steps"]]
    check = cost.get("memory_check") or {}
    if check.get("estimated_peak_bytes"):
        lines += ["", f"Estimated before loading: {gb(check['estimated_peak_bytes'])} GB for "
                      f"{gb(check['fp32_weight_bytes'])} GB of fp32 weights (fp32 builds; precision variants need "
                      f"more), with {gb(check['available_bytes'])} GB available."]
    return lines


def record_section(build_dir: Path, key: str, section: dict) -> dict:
    """Add (or replace) one section (``task_accuracy``, ``captions``) of an existing report; each file
    is replaced whole (written beside, then renamed), so a killed eval leaves the old report."""
    build_dir = Path(build_dir)
    report = json.loads((build_dir / "report.json").read_text())
    report[key] = section
    for name, text in (("report.json", json.dumps(report, indent=2)), ("report.md", render_markdown(report))):
        write_text(build_dir / name, text)
    return report
