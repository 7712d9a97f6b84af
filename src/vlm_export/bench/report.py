"""Writers for the bench results: ``bench.json`` (everything), ``bench.md`` (tables with ratios
against PyTorch from the same run) and PNG plots (matplotlib, Agg: no display needed)."""
from __future__ import annotations

import json
import os
from pathlib import Path

from ..errors import InputError

STAGE_LABELS = {"preprocess": "image bytes -> pixels", "vision_encoder": "vision", "projector": "projector",
                "prefill": "prefill", "decode_step": "decode step"}


REPORT_FILES = ("bench.json", "bench.md", "stages.png", "concurrency.png")


def check_reports_folder(out: Path, bench_format: str) -> None:
    """Before measuring: ``out`` is a folder (or can be made) that is writable, and the report files would
    overwrite no one's but an earlier bench's (its ``bench.json`` says so). Other files there (a peer's
    model, which the bench caches in its folder) are left alone."""
    out = Path(out).absolute()
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} is a file, not a folder; choose a folder for the bench results")
    ours = False
    try:
        ours = json.loads((out / "bench.json").read_text()).get("format") == bench_format
    except (OSError, ValueError, AttributeError):
        pass
    taken = [name for name in REPORT_FILES if (out / name).exists()]
    if taken and not ours:
        raise InputError(f"{out} holds {', '.join(taken)}, not written by a bench: it would be overwritten; choose "
                         "another --out")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise InputError(f"cannot write the bench results to {out}: {e.strerror}; choose a writable --out") from None


def write_reports(results: dict, out: Path) -> dict[str, Path]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files = {"json": out / "bench.json", "markdown": out / "bench.md", "stages_png": out / "stages.png"}
    if results.get("served"):
        files["concurrency_png"] = out / "concurrency.png"
    payload = {**results, "files": {k: p.name for k, p in files.items()}}
    files["json"].write_text(json.dumps(payload, indent=2))
    files["markdown"].write_text(markdown(results))
    plot_stages(results, files["stages_png"])
    if "concurrency_png" in files:
        plot_concurrency(results, files["concurrency_png"])
    return files


# --------------------------------------------------------------------------- markdown


def _ms(summary: dict | None, key: str = "p50") -> str:
    value = (summary or {}).get(key)
    return "-" if value is None else (f"{value:.3g}" if value < 10 else f"{value:.1f}")


def _x(value) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _ratio(base: dict, e: dict, key: str) -> float | None:
    """base's p50 of ``key`` over e's (a speed-up), None where either has none."""
    a, b = base[key].get("p50"), e[key].get("p50")
    return a / b if a and b else None


def _table(header: list[str], rows: list[list]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + \
        ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]


def markdown(r: dict) -> str:
    m, t, o = r["machine"], r["threads"], r["options"]
    lines = [f"# Benchmark: {r['name']}", "",
             f"{r['created']} on **{m['cpu']}** ({m['usable_cores']} usable cores, {m['memory_gb']} GB, "
             f"L3 {m['l3_cache']}, ISA {', '.join(m['isa'])}{', virtual machine' if m['hypervisor'] else ''}); "
             f"load average {r['load_average_start']} at the start, {r.get('load_average_end')} at the end.",
             f"Threads: torch {t['torch_intra_op']}, ONNX Runtime intra-op {t.get('ort_intra_op', '-')} "
             f"(inter-op {t.get('ort_inter_op', '-')}, {t.get('ort_graph_optimization', '-')}). "
             f"Versions: " + ", ".join(f"{k} {v}" for k, v in r["versions"].items()) + ".",
             f"Inputs: {r['inputs']['prompt_tokens']}-token prompt with one image "
             f"(the decoder's image input {r['inputs']['image_input_shape']}, pixels {r['inputs']['pixel_values_shape']}); "
             f"decode step at past {r['inputs']['decode_past_len']}; {o['new_tokens']} new tokens per request "
             f"(EOS ignored, greedy). Backends take turns in mirrored blocks (A B, B A), each block after "
             f"{o['warmup']} discarded warm-up calls (1 request end to end). "
             "Latencies in ms; a speed-up is PyTorch p50 / backend p50 from this same run. CPU share = "
             "process CPU time / (wall time x threads) per backend, a rough sign of contention: about 1 "
             "when a backend had its cores (spinning thread pools count, so it can exceed 1), well below 1 "
             "when other processes took them (unreliable for sub-millisecond calls).", ""]
    lines += placement_lines(r.get("placement"), o)
    if r.get("contention", {}).get("busy"):
        lines += ["**Other processes competed for the cores during this run** (" + "; ".join(r["contention"]["reasons"])
                  + "): the figures are inflated, PyTorch's most (its OpenMP threads wait for descheduled peers "
                  "at every parallel region), so ratios against it overstate the gains. Rerun on a quiet machine.", ""]

    lines += ["## Per stage", ""]
    backends = list(dict.fromkeys(row["backend"] for row in r["stages"]))
    ref = {(row["stage"], row["batch"]): row for row in r["stages"] if row["backend"] == "torch"}
    header = ["stage", "batch"] + [f"{b} p50 / p90 / p99" for b in backends] + \
        [f"{b} speed-up" for b in backends if b != "torch" and ref] + ["throughput (p50)", "CPU share"]
    rows = []
    for key in dict.fromkeys((row["stage"], row["batch"]) for row in r["stages"]):
        cells = {row["backend"]: row for row in r["stages"] if (row["stage"], row["batch"]) == key}
        row = [STAGE_LABELS.get(key[0], key[0]), key[1]]
        row += [" / ".join(_ms(cells[b]["latency_ms"], p) for p in ("p50", "p90", "p99")) for b in backends]
        if ref:
            row += [_x(ref[key]["latency_ms"]["p50"] / cells[b]["latency_ms"]["p50"]) for b in backends if b != "torch"]
        row.append(", ".join(f"{b} {cells[b]['throughput']['value']:.4g}" for b in backends)
                   + f" {cells[backends[0]]['throughput']['unit']}")
        row.append(" / ".join(f"{cells[b].get('cpu_share', 0):.2f}" for b in backends))
        rows.append(row)
    lines += _table(header, rows) + [""]

    e2e = dict(r["end_to_end"])
    served = r.get("served")
    if served:
        e2e["triton (concurrency 1)"] = served["overhead"]["served"]
    if e2e:
        base = r["end_to_end"].get("torch")
        lines += ["## End to end (image bytes + question -> streamed text)", ""]
        rows = []
        for b, e in e2e.items():
            rows.append([b, e["requests"], " / ".join(_ms(e["ttft_ms"], p) for p in ("p50", "p90", "p99")),
                         " / ".join(_ms(e["tpot_ms"], p) for p in ("p50", "p90", "p99")), e["tokens_per_s"],
                         _x(_ratio(base, e, "ttft_ms")) if base else "-",
                         _x(_ratio(base, e, "tpot_ms")) if base else "-"])
        lines += _table(["backend", "requests", "TTFT p50 / p90 / p99", "time per output token p50 / p90 / p99",
                         "tokens/s (one stream)", "TTFT speed-up", "per-token speed-up"], rows)
        if served:
            lines += ["", "The Triton row was measured side by side with a second in-process ONNX Runtime run "
                          "(in the Triton section), not with the rows above."]
        lines += [""] + ttft_lines(r.get("ttft_breakdown") or {}, r.get("inputs", {}).get("request_pixel_shapes"))
        lines += prefix_cache_lines(r.get("prefix_cache") or {}, base)

    c = r["ceiling"]
    on_gpu = str(o.get("device", "cpu")).startswith("cuda")
    how = (f"a device-to-device copy of {o['bandwidth_mb']} MB on the GPU, bytes read + written, timed by CUDA events"
           if on_gpu else f"torch.sum over {o['bandwidth_mb']} MB")
    cache_name = "GPU's L2 cache" if on_gpu else f"L3 cache ({m['l3_cache']})"
    lines += ["## Decode against the memory-bandwidth ceiling", "",
              f"Bandwidth ({how}, before and after the in-process runs): "
              f"p50 {c['bandwidth_gb_s']['p50']} GB/s (min {c['bandwidth_gb_s']['min']}, max {c['bandwidth_gb_s']['max']}). "
              f"A decode step reads {c['read_per_token_bytes'] / 1e6:.1f} MB of {c['decoder_precision']} weights "
              f"(of {c['initializer_bytes'] / 1e6:.1f} MB; gather-only tables excluded) + "
              f"{c['kv_bytes_at_past'] / 1e6:.2f} MB of KV cache at past {c['past_len']}"
              + (f" + {c['fixed_state_bytes'] / 1e6:.2f} MB of decode state that does not grow (e.g. image K/V)"
                 if c.get("fixed_state_bytes") else "") + ", so at most "
              f"**{c['ceiling_tokens_per_s']} tokens/s**."
              + (f" These bytes fit in the {cache_name}, so memory bandwidth does not bound this "
                 "decoder: read the shares below as overheads, not as distance to a limit." if c.get("fits_in_l3") else ""),
              ""]
    rows = [[b, v["decode_step_tokens_per_s"], f"{100 * v['decode_step_fraction']:.1f}%",
             v["end_to_end_tokens_per_s"] or "-",
             "-" if v["end_to_end_fraction"] is None else f"{100 * v['end_to_end_fraction']:.1f}%"]
            for b, v in c["backends"].items()]
    lines += _table(["backend", "decode step tokens/s", "of ceiling", "end-to-end tokens/s", "of ceiling"], rows) + [""]

    if served:
        s, ov = served["server"], served["overhead"]
        lines += ["## Triton (served path)", "",
                  f"tritonserver {s['tritonserver']}, {s['repository']['target']} target, decoder "
                  f"{s['repository']['decoder_mode']}, {s['repository']['vlm_instances']} vlm instance(s), "
                  f"{s['protocol']} over {s['address']}.", "",
                  f"Overhead against in-process ONNX Runtime (served p50 minus in-process p50, the same "
                  f"{ov['requests']} requests each, every image new to the server, measured side by side at "
                  f"concurrency 1): "
                  f"**{ov['per_token_ms']} ms per token**, {ov['ttft_ms']} ms on the first token, "
                  f"{ov['per_request_ms']} ms per request.", ""]
        base = served["levels"][0]["throughput_tokens_per_s"] if served["levels"] else None
        ceilings = (served.get("scheduler_ceiling") or {}).get("levels", {})
        rows = []
        for lv in served["levels"]:
            local = lv.get("in_process", {})
            rows.append([lv["concurrency"], lv["requests"], " / ".join(_ms(lv["ttft_ms"], p) for p in ("p50", "p90", "p99")),
                         " / ".join(_ms(lv["tpot_ms"], p) for p in ("p50", "p90", "p99")),
                         lv["throughput_tokens_per_s"],
                         f"{lv['throughput_tokens_per_s'] / base:.2f}x" if base else "-",
                         _x(ceilings[str(lv["concurrency"])]) if str(lv["concurrency"]) in ceilings else "-",
                         local.get("throughput_tokens_per_s", "-"),
                         " / ".join(_ms(local["tpot_ms"], p) for p in ("p50", "p99")) if local else "-"])
        lines += ["Concurrency sweep: Triton, then the same requests through the same in-flight batching "
                  "(GenerationEngine) in this process, at each level (closed loop; tokens/s = generated "
                  "tokens / wall time).", ""]
        lines += _table(["concurrency", "requests", "Triton TTFT p50 / p90 / p99", "Triton per token p50 / p90 / p99",
                         "Triton tokens/s", "vs concurrency 1", "ceiling vs concurrency 1", "in-process tokens/s",
                         "in-process per token p50 / p99"], rows) + [""]
        sc = served.get("scheduler_ceiling")
        if sc:
            steps = ", ".join(f"{b} row{'s' if b != '1' else ''} {_ms(st)}" for b, st in sc["decode_step_ms"].items())
            lines += [f"Ceiling: the most any scheduler reaches against one request at a time with this machine's "
                      f"costs, measured before the server started: one request's first token alone (preprocessing, image "
                      f"path, prefill past the prefix cache, as the sweep's requests run; compute bound, so b of them "
                      f"cost b times one) {_ms(sc['request_ms'])} ms, a decode "
                      f"step at past {sc['decode_past']} of {steps} ms (p50); b (P + T s_1) / (b P + T s_b) with T = "
                      f"{sc['new_tokens']} tokens and b = min(concurrency, max_batch {sc['max_batch']}) "
                      f"(vlm_export.bench.batching).", ""]
        cache = served.get("image_cache")
        if cache:
            lines += [f"Image cache ({cache['image_cache_mb']} MB, the repository's default): {cache['images']} images "
                      f"never sent before, each sent twice at concurrency 1. Time to first token p50 "
                      f"{_ms(cache['first_sight_ttft_ms'])} ms at first sight, {_ms(cache['repeat_ttft_ms'])} ms "
                      f"repeated (**{_x(cache['ttft_ratio'])}**, {cache['ttft_saved_ms']} ms saved); the server "
                      f"counted {cache['hits']} hits and {cache['misses']} misses. The repeat is the same prompt, "
                      "so the prefix cache also reuses all of it but its last token: this is what a conversation "
                      "re-sending its image gains, not the image cache alone. Every other served figure above uses "
                      "images the server had not seen, as the in-process runs (which have no image cache) always "
                      "pay for the image path; both sides reuse the template's start from their prefix caches "
                      f"({s['repository'].get('prefix_cache_mb', 0)} MB each).", ""]

    lines += peer_section(r.get("peer"))

    lines += ["## Targets (issue 6)", ""]
    rows = [[tg["target"], "-" if tg["value"] is None else tg["value"], tg["goal"],
             {True: "met", False: "not met", None: "not measured"}[tg["met"]], tg["note"]] for tg in r["targets"]]
    lines += _table(["target", "this run", "goal", "status", "note"], rows) + [""]
    lines += ["Timings on a shared machine are noisy: compare the ratios from one run, not absolute "
              "figures across runs.", ""]
    return "\n".join(lines)


def prefix_cache_lines(prefix: dict, reference: dict | None) -> list[str]:
    """The prefix cache's section (``bench.prefix``): TTFT off vs on per backend, and against the
    PyTorch reference's end-to-end TTFT above (which ran without one)."""
    if not prefix:
        return []
    rows = [[b, f"{v['off']['requests']} + {v['on']['requests']}", _ms(v["off"]["ttft_ms"]), _ms(v["on"]["ttft_ms"]),
             _x(v["ttft_ratio"]), v["reused_tokens_per_hit"],
             _x(reference["ttft_ms"]["p50"] / v["on"]["ttft_ms"]["p50"]) if reference else "-"]
            for b, v in prefix.items()]
    return ["### Time to first token with the prefix cache", "",
            "Each request a new image (a photo rolled by a few pixels: new image rows), so only the prompt's start up to "
            "the image is reused (the chat template's system turn), as for a new conversation; a follow-up turn "
            "reuses its whole previous prompt. Cache off and on in mirrored blocks, one backend after the other, 2 "
            "tokens per request. The "
            "last column: PyTorch eager's TTFT in the end-to-end table (no cache) over this backend's with it.", ""] + \
        _table(["backend", "requests (off + on)", "TTFT p50 off (ms)", "TTFT p50 on (ms)", "speed-up",
                "tokens reused per request", "vs PyTorch eager (no cache)"], rows) + [""] + _follow_up_lines(prefix)


def _follow_up_lines(prefix: dict) -> list[str]:
    rows = [[b, f"{f['off']['requests']} + {f['on']['requests']}", _ms(f["off"]["ttft_ms"]), _ms(f["on"]["ttft_ms"]),
             _x(f["ttft_ratio"]), f["reused_tokens_per_request"]]
            for b, v in prefix.items() if (f := v.get("follow_up"))]
    if not rows:
        return []
    return ["A conversation's second turn (its first, with a new image, answered untimed just before; the second "
            "re-sends the image, as chat clients do), cache off and on:", ""] + \
        _table(["backend", "requests (off + on)", "TTFT p50 off (ms)", "TTFT p50 on (ms)", "speed-up",
                "tokens reused per request"], rows) + [""]


def ttft_lines(breakdown: dict, request_shapes: list | None = None) -> list[str]:
    """Where each backend's time to first token goes (``run.ttft_breakdown``); ``request_shapes``: each end-to-end
    request's image preprocessed, which where they differ (a processor that keeps an image's size) puts the image
    path's time on the other images in "the rest" too, said under the table."""
    if not breakdown:
        return []
    differ = request_shapes and any(shape != request_shapes[0] for shape in request_shapes)
    parts = list(next(iter(breakdown.values()))["parts_ms"])
    rows = [[b] + [_ms({"p50": v["parts_ms"][p]}) for p in parts] + [_ms({"p50": v["sum_ms"]}),
                                                                    _ms({"p50": v["ttft_ms"]}), _ms({"p50": v["rest_ms"]})]
            for b, v in breakdown.items()]
    return ["Where the time to first token goes (ms; p50 of the batch-1 cases above, whose image and prompt are "
            "one of the requests', so roughly); the rest is tokenizing, scheduling, the first sampling and "
            "joining the KV buffer:", ""] + \
        _table(["backend"] + [STAGE_LABELS.get(p, p) for p in parts] + ["sum", "TTFT p50", "the rest"], rows) + [""] + \
        ([f"The requests' images preprocess to different sizes here ({_shapes(request_shapes)}), the cases' to the "
          "first one's: the rest also holds the image path's time on the larger ones.", ""] if differ else [])


def _shapes(shapes: list) -> str:
    """Each request's preprocessed image, by its first tensor where the processor gives several."""
    if isinstance(shapes[0], dict):
        name = next(iter(shapes[0]))
        return f"{name} " + ", ".join(json.dumps(s.get(name)) for s in shapes)
    return ", ".join(json.dumps(s) for s in shapes)


def placement_lines(p: dict | None, options: dict) -> list[str]:
    """Where the backends ran (issue 17): the device, PyTorch's dtype, ONNX Runtime's providers."""
    if not p:
        return []
    d = p["device"]
    if d.get("name"):
        where = (f"**{d['name']}** ({d['device']}, {d['memory_gb']} GB, compute capability {d['compute_capability']}, "
                 f"CUDA {d['cuda_runtime']}); stage timings by CUDA events")
    else:
        where = "the CPU"
    parts = []
    for backend, stages in p["backends"].items():
        if backend == "torch":
            kinds = sorted({f"{v['device']} {v['dtype']}" for v in stages.values()})
            parts.append(f"PyTorch on {', '.join(kinds)}")
        else:
            kinds = sorted({" > ".join(v["providers"]) for v in stages.values()})
            parts.append(f"ONNX Runtime with {'; '.join(kinds)}")
            written = [name for name, v in stages.items() if v.get("qdq_as_written")]
            if written:
                parts.append(f"{', '.join(written)} with {'its' if len(written) == 1 else 'their'} int8 Q/DQ pairs run "
                             "as written (dequantize, fp32 op: exact, not int8's speed)")
    return [f"Device: {where}. " + "; ".join(parts) + ".", ""]


def _agreement(a: dict | None) -> str:
    if not a:
        return "-"
    cuts = [row["first_divergence"] for row in a["rows"] if row["first_divergence"] is not None]
    return f"{a['identical']}/{a['prompts']} identical" + (f"; first differs at token {', '.join(map(str, cuts))}"
                                                           if cuts else "")


def peer_section(peer: dict | None) -> list[str]:
    """The peer table (issue 16): ours and each peer decoder on the build's LM, text only."""
    if not peer:
        return []
    lines = ["## Peer runtimes (the same LM, text only)", ""]
    lines += [f"Skipped: {n}" for n in peer.get("notices", [])] + ([""] if peer.get("notices") else [])
    if not peer.get("rows"):
        return lines
    order = [chr(ord("A") + i) for i in range(len(peer["rows"]))]
    lines += [f"The build's language model alone, text only: the {peer['prompt_tokens']}-token prompt "
              f"\"{peer['prompt']}\" (the build's tokenizer and chat template, no image), greedy, "
              f"{peer['new_tokens']} new tokens (EOS ignored), {peer['threads']} threads, token ids in and out. "
              f"{peer['runs']} timed generations per decoder, in mirrored blocks ({' '.join(order)}, {' '.join(order[::-1])}) after "
              f"{peer['warmup_per_block']} discarded one each. TTFT = prompt -> first token (prefill + the pick); "
              "decode = one step per later token, p50 over every step. \"Ours vs\" = our speed / the row's "
              "(> 1: ours is faster). Greedy agreement: the row's answers against ours on "
              f"{len(peer['agreement_prompts'])} prompts, up to EOS (a peer's int4 is not held to our accuracy "
              "gate).", ""]
    rows = []
    for row in peer["rows"]:
        vs = row.get("ours_vs_peer") or {}
        rows.append([row["runtime"], row["precision"], " / ".join(_ms(row["ttft_ms"], p) for p in ("p50", "p90")),
                     " / ".join(_ms(row["decode_ms"], p) for p in ("p50", "p90")), row["tokens_per_s"],
                     _x(vs.get("ttft")) if vs else "(ours)", _x(vs.get("decode_tokens_per_s")) if vs else "(ours)",
                     _agreement(row.get("agreement"))])
    lines += _table(["runtime", "precision", "TTFT p50 / p90", "decode ms/token p50 / p90", "tokens/s",
                     "ours vs (TTFT)", "ours vs (tokens/s)", "greedy agreement"], rows) + [""]
    for row in peer["rows"]:
        for a in (row.get("agreement") or {}).get("rows", []):
            if a["first_divergence"] is not None:
                lines.append(f"- {row['label']}, \"{a['prompt']}\": ours \"{a['ours_text']}\" / "
                             f"{row['runtime']} \"{a['peer_text']}\"")
    return lines + [""] if lines[-1] != "" else lines


# --------------------------------------------------------------------------- plots


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: works without a display
    import matplotlib.pyplot as plt

    return plt


def _plain_log_y(ax) -> None:
    """A log-scale y axis labelled 20, 50, 100 rather than 2x10^1."""
    from matplotlib.ticker import FuncFormatter

    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}" if str(f"{v:g}")[0] in "25" else ""))


def plot_stages(r: dict, path: Path) -> None:
    """Left: p50 latency per stage case per backend (whiskers to p90). Right: TTFT and per-token time."""
    import numpy as np

    plt = _pyplot()
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(13, 4.8), gridspec_kw={"width_ratios": [3, 1.4]})
    backends = list(dict.fromkeys(row["backend"] for row in r["stages"]))
    cases = list(dict.fromkeys((row["stage"], row["batch"]) for row in r["stages"]))
    width = 0.8 / max(len(backends), 1)
    for i, b in enumerate(backends):
        cells = {(row["stage"], row["batch"]): row["latency_ms"] for row in r["stages"] if row["backend"] == b}
        p50 = np.array([cells[c]["p50"] for c in cases])
        p90 = np.array([cells[c]["p90"] for c in cases])
        ax.bar(np.arange(len(cases)) + (i - (len(backends) - 1) / 2) * width, p50, width, label=b,
               yerr=[np.zeros_like(p50), p90 - p50], capsize=2)
    ax.set_xticks(range(len(cases)), [f"{STAGE_LABELS.get(s, s)}\nbatch {b}" if s in ("vision_encoder", "projector")
                                      else STAGE_LABELS.get(s, s) for s, b in cases])
    _plain_log_y(ax)
    ax.set_ylabel("latency, ms (p50, whisker to p90; log scale)")
    ax.set_title(f"{r['name']}: latency per stage")
    ax.legend()

    p50 = lambda e, key: e[key].get("p50") or np.nan  # noqa: E731  (no TPOT where no text was streamed)
    e2e = {b: (p50(e, "ttft_ms"), p50(e, "tpot_ms")) for b, e in r["end_to_end"].items()}
    if r.get("served"):
        ov = r["served"]["overhead"]["served"]
        e2e["triton c=1"] = (p50(ov, "ttft_ms"), p50(ov, "tpot_ms"))
    names = list(e2e)
    x = np.arange(2)
    width = 0.8 / max(len(names), 1)
    for i, b in enumerate(names):
        ax2.bar(x + (i - (len(names) - 1) / 2) * width, e2e[b], width, label=b)
    ax2.set_xticks(x, ["time to first token", "time per output token"])
    _plain_log_y(ax2)
    ax2.set_ylabel("ms (p50, log scale)")
    ax2.set_title("end to end")
    if names:
        ax2.legend()
    gpu = ((r.get("placement") or {}).get("device") or {}).get("name")
    fig.text(0.01, 0.01, f"{gpu + ' + ' if gpu else ''}{r['machine']['cpu']}, {r['threads']['requested']} threads, "
                         f"{r['created']}", fontsize=7)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_concurrency(r: dict, path: Path) -> None:
    """Triton: throughput, and latency percentiles, against the number of requests in flight."""
    plt = _pyplot()
    levels = r["served"]["levels"]
    c = [lv["concurrency"] for lv in levels]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    ax.plot(c, [lv["throughput_tokens_per_s"] for lv in levels], "o-", label="Triton tokens/s")
    if all("in_process" in lv for lv in levels):
        ax.plot(c, [lv["in_process"]["throughput_tokens_per_s"] for lv in levels], "d-.", color="tab:gray",
                label="in-process tokens/s")
    ceilings = (r["served"].get("scheduler_ceiling") or {}).get("levels", {})
    if levels and all(str(x) in ceilings for x in c):  # the ceiling's ratios on Triton's own concurrency-1 rate
        ax.plot(c, [levels[0]["throughput_tokens_per_s"] * ceilings[str(x)] for x in c], ":", color="black",
                label="scheduler ceiling (measured costs)")
    ax.set_xlabel("concurrent requests")
    ax.set_ylabel("tokens/s")
    ax.set_xscale("log", base=2)
    ax.set_xticks(c, [str(x) for x in c])
    axr = ax.twinx()
    axr.plot(c, [lv["throughput_requests_per_s"] for lv in levels], "s--", color="tab:orange", label="Triton requests/s")
    axr.set_ylabel("requests/s")
    ax.set_title(f"{r['name']} on Triton: throughput")
    ax.legend(loc="upper left")
    axr.legend(loc="lower right")
    for (key, label), color in zip((("ttft_ms", "time to first token"), ("tpot_ms", "time per output token"),
                                    ("request_ms", "request")), ("tab:blue", "tab:green", "tab:red")):
        for pct, style in (("p50", "o-"), ("p99", "x:")):
            ax2.plot(c, [lv[key].get(pct) for lv in levels], style, color=color, label=f"{label} {pct}")
    ax2.set_xscale("log", base=2)
    ax2.set_xticks(c, [str(x) for x in c])
    _plain_log_y(ax2)
    ax2.set_xlabel("concurrent requests")
    ax2.set_ylabel("ms (log scale)")
    ax2.set_title("latency")
    ax2.legend(fontsize=7)
    fig.text(0.01, 0.01, f"{r['machine']['cpu']}, {r['threads']['requested']} threads, {r['created']}", fontsize=7)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
