"""Where mllama's cross-attention K/V is computed, measured (issue 12): per decode step, the exported
decoder fed the image K/V the ``cross_kv`` stage made once (what the build ships) against the same
step plus that stage's work (k_proj / v_proj / k_norm of every cross layer over the image's tokens),
which is what a decoder computing the K/V from ``cross_attention_states`` at every step would add.
Also the copy of the K/V a decoder returning it every step (HF's cache way, carried as state) adds.

    python benchmarks/mllama_placement.py tiny|realistic OUT_DIR [--past 64] [--iterations 10]

``realistic``: Llama-3.2-11B-Vision's text sizes (hidden 4096, 32 heads, 8 KV heads, head dim 128,
intermediate 14336) and image geometry (4 tiles of 560 px, patch 14: 1601 tokens per tile), but 2 text
layers (one self-attention, one cross-attention: the cost compared is per cross layer), SmolLM2's
49,160-token vocabulary (not 128,256), and a 1-layer 32-wide vision tower (not timed). Random weights.
``tiny``: the test suite's model. Only the cross_kv and lm_decoder stages are exported (no parity run:
the tests prove these graphs on the tiny model). Writes OUT_DIR/placement.json.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the tiny model and the tokenizer the tests use


def make_realistic(path: Path) -> Path:
    import torch
    from transformers import (AutoTokenizer, MllamaConfig, MllamaForConditionalGeneration, MllamaImageProcessorPil,
                              MllamaProcessor, MllamaTextConfig, MllamaVisionConfig)

    from tiny_models import MLLAMA_CHAT_TEMPLATE, VOCAB, smollm2_tokenizer_dir

    tokenizer = AutoTokenizer.from_pretrained(smollm2_tokenizer_dir())
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|image|>"]})
    tokenizer.chat_template = MLLAMA_CHAT_TEMPLATE
    ratios = [[1, 1], [1, 2], [1, 3], [1, 4], [2, 1], [2, 2], [3, 1], [4, 1]]  # Llama-3.2-Vision's
    vision = MllamaVisionConfig(hidden_size=32, num_hidden_layers=1, num_global_layers=1, attention_heads=2,
                                intermediate_size=64, image_size=560, patch_size=14, max_num_tiles=4,
                                intermediate_layers_indices=[0], vision_output_dim=64, supported_aspect_ratios=ratios)
    text = MllamaTextConfig(vocab_size=VOCAB, hidden_size=4096, intermediate_size=14336, num_hidden_layers=2,
                            num_attention_heads=32, num_key_value_heads=8, cross_attention_layers=[1],
                            max_position_embeddings=4096, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    torch.manual_seed(0)
    model = MllamaForConditionalGeneration(MllamaConfig(vision_config=vision, text_config=text,
                                                        image_token_index=VOCAB)).eval()
    model.save_pretrained(path)
    MllamaProcessor(image_processor=MllamaImageProcessorPil(size={"height": 560, "width": 560}, max_image_tiles=4),
                    tokenizer=tokenizer, chat_template=MLLAMA_CHAT_TEMPLATE).save_pretrained(path)
    return path


def export_graphs(model_dir: Path, out: Path, max_sequence: int) -> tuple[dict[str, Path], object, dict[str, float]]:
    """(stage -> graph the onnxruntime target runs, the scheme): cross_kv as exported, lm_decoder fused."""
    from vlm_export.adapters import adapter_for
    from vlm_export.export.fuse import fuse_decoder
    from vlm_export.export.onnx_export import export_stage

    adapter = adapter_for(model_dir)
    loaded = adapter.load(model_dir)
    stages = {s.name: s for s in adapter.stages(loaded)}
    graphs, seconds = {}, {}
    for name in ("cross_kv", "lm_decoder"):
        if (out / "graphs" / f"{name}.onnx").exists():  # a rerun measures the graphs already exported
            graphs[name] = out / "graphs" / f"{name}.onnx"
            continue
        start = time.perf_counter()
        graphs[name] = export_stage(stages[name], out / "graphs")
        seconds[name] = round(time.perf_counter() - start, 1)
        print(f"exported {name} in {seconds[name]} s", flush=True)
    fused = graphs["lm_decoder"].with_name("lm_decoder.fused.onnx")
    if fused.exists() or fuse_decoder(graphs["lm_decoder"], fused, max_positions=max_sequence).fused:
        graphs["lm_decoder"] = fused
    return graphs, adapter.scheme(loaded), seconds


def measure(graphs: dict[str, Path], scheme, past: int, iterations: int, threads: int) -> dict:
    import onnxruntime as ort

    from vlm_export.bench import measure as m
    from vlm_export.contract.cross import CROSS_KV

    def session(path):
        opts = ort.SessionOptions()
        opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
        return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])

    decoder, cross_kv = session(graphs["lm_decoder"]), session(graphs["cross_kv"])
    rng = np.random.default_rng(0)
    g = scheme.geometry
    hidden = g.hidden_size
    states = rng.standard_normal((1, scheme.tiles, scheme.tokens_per_tile, hidden)).astype(np.float32)
    kv = cross_kv.run(None, {"cross_attention_states": states})[0]  # one image's K/V, as the stage makes it
    batch = scheme.synthetic_batch(1, past, rng)
    batch.caches[CROSS_KV] = kv.reshape(1, *kv.shape[1:])
    step = scheme.step_feeds(batch, np.asarray([5]))

    def decode():
        return decoder.run(None, step)

    def decode_and_recompute():  # the in-decoder placement: the K/V from the states at every step
        cross_kv.run(None, {"cross_attention_states": states})
        return decoder.run(None, step)

    def decode_and_carry():  # HF's cache way in one graph: every step returns the whole K/V again
        out = decoder.run(None, step)
        np.copyto(carry, step[CROSS_KV])
        return out

    carry = np.empty_like(step[CROSS_KV])
    calls = {"decode step (K/V from the cross_kv stage, ours)": decode,
             "decode step + K/V recomputed (cross_kv graph per step)": decode_and_recompute,
             "decode step + K/V copied out (carried as output state)": decode_and_carry}
    samples = m.alternating({k: m.timed(v) for k, v in calls.items()}, warmup=1, n=iterations)
    rows = {k: m.summarize([w for w, _ in v]) for k, v in samples.items()}
    alone = m.alternating({"cross_kv graph alone": m.timed(lambda: cross_kv.run(None, {"cross_attention_states": states}))},
                          warmup=1, n=iterations)
    rows["cross_kv graph alone (one image)"] = m.summarize([w for w, _ in alone["cross_kv graph alone"]])
    return {"rows": rows, "past": past, "threads": threads, "cross_layers": scheme.cross_layers,
            "self_layers": g.num_layers, "image_tokens": scheme.tokens_per_image, "hidden": hidden,
            "kv_heads": g.num_kv_heads, "head_dim": g.head_dim,
            "cross_kv_bytes_per_image": int(kv.nbytes), "states_bytes_per_image": int(states.nbytes),
            "graph_bytes": {k: sum(f.stat().st_size for f in p.parent.glob(p.name + "*")) for k, p in graphs.items()}}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("size", choices=("tiny", "realistic"))
    parser.add_argument("out", type=Path)
    parser.add_argument("--past", type=int, default=64)
    parser.add_argument("--iterations", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    model_dir = out / "model"
    if not (model_dir / "config.json").exists():
        if args.size == "tiny":
            from tiny_models import make_tiny_mllama

            make_tiny_mllama(model_dir)
        else:
            make_realistic(model_dir)
    graphs, scheme, seconds = export_graphs(model_dir, out, max_sequence=max(256, args.past + 2))
    from vlm_export.bench.measure import load_average, machine

    load_start = load_average()
    result = measure(graphs, scheme, args.past, args.iterations, args.threads)
    result.update(size=args.size, export_seconds=seconds, machine=machine(), load_average=[load_start, load_average()])
    (out / "placement.json").write_text(json.dumps(result, indent=1))
    for name, row in result["rows"].items():
        print(f"{name}: p50 {row['p50']} ms (min {row['min']}, max {row['max']}, n {row['n']})")
    print(json.dumps({k: v for k, v in result.items() if k not in ("rows", "machine")}))


if __name__ == "__main__":
    main()
