"""Evaluate a checkpoint on the held-out `shapes-geneval` benchmark:
`python -m shapes.evaluate --checkpoint checkpoints/shapes-base [--think] [--limit N]`.

For every benchmark prompt the model draws `--images` images (deterministic ODE sampling, CFG), the
programmatic judge decides strict correctness, and the per-category accuracy is printed (with a
progress bar) and saved as JSON beside an image grid.
"""
from __future__ import annotations

import argparse
import json
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image as PILImage
from tqdm import tqdm

from grpo.policy import FlowConfig, ThinkConfig, rollout
from shapes import chat
from shapes.benchmark import CATEGORIES, benchmark_prompts
from shapes.judge import judge
from shapes.prompts import Prompt
from shapes.scene import render
from shapes.tokenizer import ShapesTokenizer, build_tokenizer
from umm.guidance import CFGConfig
from umm.model import UnifiedModel
from umm.prompting import PromptFormat, Prompter

# the world's chat format (checkpoints/shapes-base/prompt_format.json; pretraining writes it beside each
# checkpoint): turns open with their role word, and the system prompts use the world's closed vocabulary
PROMPT_FORMAT = PromptFormat(tokenizer="shapes", role_words=True, think_system=chat.SYSTEM_THINK,
                             reflect_system=chat.SYSTEM_REFLECT)


@dataclass(kw_only=True)
class DrawConfig:
    """How evaluation draws (deterministic Euler ODE; the method's CFG)."""
    num_steps: int = 20
    shift: float = 1.0
    text_scale: float = 4.0
    image_scale: float = 1.5          # edits only
    think: bool = False               # write a plan first (RT2I mode)
    think_temperature: float = 0.3
    think_tokens: int = 24
    batch_size: int = 16


def shapes_prompter(tok=None) -> Prompter:
    """The world's tokenizer (built here unless given) in the world's prompt format."""
    return Prompter(ShapesTokenizer(tok if tok is not None else build_tokenizer()), PROMPT_FORMAT)


def to_pil(images: torch.Tensor) -> list[PILImage.Image]:
    arr = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return [PILImage.fromarray(a) for a in arr]


@torch.no_grad()
def draw(model: UnifiedModel, prompter: Prompter, prompts: list[Prompt], *, cfg: DrawConfig, seed: int = 0,
         canvas_size: int = 32) -> tuple[list[PILImage.Image], list[str]]:
    """One image per prompt (and the plan written, '' without think), through the trainer's one
    think-then-draw path (grpo.policy.rollout) with the deterministic ODE (noise level 0)."""
    gen = torch.Generator().manual_seed(seed)
    hw = model.latent_grid(canvas_size, canvas_size)
    images, plans = [], []
    for i in range(0, len(prompts), cfg.batch_size):
        chunk = prompts[i:i + cfg.batch_size]
        is_edit = chunk[0].family == "edit"
        if any((p.family == "edit") != is_edit for p in chunk):
            raise ValueError("draw: a batch mixes edits and text-to-image prompts")
        dps = ([prompter.edit(np.asarray(render(p.meaning.source), dtype=np.uint8), p.text) for p in chunk]
               if is_edit else [prompter.draw(p.text, think=cfg.think) for p in chunk])
        think = (ThinkConfig(max_new_tokens=cfg.think_tokens, temperature=cfg.think_temperature, top_p=1.0)
                 if cfg.think and not is_edit else None)
        guidance = CFGConfig(text_scale=cfg.text_scale, image_scale=cfg.image_scale if is_edit else 1.0,
                             renorm_type="text_channel" if is_edit else "global")
        flow = FlowConfig(num_steps=cfg.num_steps, shift=cfg.shift, noise_level=0.0, cfg=guidance)
        ro = rollout(model, dps, hw=hw, think=think, flow=flow, generator=gen)
        plans += [prompter.plan_text(row[mask]) for row, mask in zip(ro.think.tokens, ro.think.mask)]
        images += to_pil(model.tokens_to_image(ro.flow.latents[-1], hw))
    return images, plans


def accuracy(verdicts: Iterable[tuple[str, bool]]) -> dict[str, float]:
    """Strict accuracy per category from (category, correct) pairs, and the mean over GenEval's six."""
    per: dict[str, list[bool]] = defaultdict(list)
    for family, ok in verdicts:
        per[family].append(ok)
    acc = {c: float(np.mean(per[c])) for c in CATEGORIES if per[c]}
    geneval = [acc[c] for c in CATEGORIES[:6] if c in acc]
    if geneval:
        acc["geneval_mean"] = float(np.mean(geneval))
    return acc


def evaluate(model: UnifiedModel, prompter: Prompter, prompts: list[Prompt], *, cfg: DrawConfig,
             images_per_prompt: int = 1,
             shard: tuple[int, int] = (0, 1), progress: bool = True
             ) -> tuple[dict[str, float], list[tuple[Prompt, PILImage.Image, bool, str]]]:
    """Strict accuracy per category (and overall mean over categories) + every judged sample.

    The work is a fixed list of batches (image k of a batch of prompts), each drawn with its own seeds
    whoever draws it: `shard=(j, n)` draws batches j, j + n, ..., so n workers share one evaluation
    and their pooled verdicts equal one process drawing everything."""
    j, n = shard
    if not 0 <= j < n:
        raise ValueError(f"shard {shard}: need 0 <= index < count")
    # edits and non-edits are drawn in separate batches (different contexts and guidance)
    groups = [[p for p in prompts if p.family == "edit"], [p for p in prompts if p.family != "edit"]]
    batches = [(group[i:i + cfg.batch_size], 1000 * k + i) for k in range(images_per_prompt)
               for group in groups for i in range(0, len(group), cfg.batch_size)][j::n]
    samples = []
    bar = tqdm(total=sum(len(chunk) for chunk, _ in batches), desc="evaluate", disable=not progress)
    for chunk, seed in batches:
        imgs, plans = draw(model, prompter, chunk, cfg=cfg, seed=seed)
        for p, img, plan in zip(chunk, imgs, plans):
            samples.append((p, img, judge(img, p.meaning).correct, plan))
        bar.update(len(chunk))
    bar.close()
    return accuracy((p.family, ok) for p, _, ok, _ in samples), samples


def quick_check(model: UnifiedModel, *, n: int = 24) -> dict[str, float]:
    """Single-object accuracy on `n` benchmark prompts (used during pretraining)."""
    model.eval()
    prompts = [p for p in benchmark_prompts() if p.family == "single_object"][:n]
    acc, _ = evaluate(model, shapes_prompter(), prompts, cfg=DrawConfig(), progress=False)
    return {"single_object": round(acc.get("single_object", 0.0), 3)}


def save_grid(samples, path: Path, *, columns: int = 12, scale: int = 2) -> None:
    """Image grid; a red bar under each image the judge rejected, green if accepted."""
    if not samples:
        return
    w = samples[0][1].width * scale
    rows = (len(samples) + columns - 1) // columns
    grid = PILImage.new("RGB", (columns * (w + 2), rows * (w + 6)), "white")
    for i, (_, img, ok, _) in enumerate(samples):
        x, y = (i % columns) * (w + 2), (i // columns) * (w + 6)
        grid.paste(img.resize((w, w), PILImage.NEAREST), (x, y))
        grid.paste(PILImage.new("RGB", (w, 3), (0, 160, 0) if ok else (200, 0, 0)), (x, y + w + 1))
    grid.save(path)


def main(argv: list[str] | None = None) -> None:
    from umm.checkpoint import load_pretrained

    ap = argparse.ArgumentParser(description="evaluate a checkpoint on shapes-geneval")
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--think", action="store_true", help="write a plan before drawing (RT2I mode)")
    ap.add_argument("--limit", type=int, default=0, help="prompts per category (0 = all)")
    ap.add_argument("--images", type=int, default=1, help="images per prompt")
    ap.add_argument("--steps", type=int, default=DrawConfig.num_steps)
    ap.add_argument("--shift", type=float, default=DrawConfig.shift)
    ap.add_argument("--cfg", type=float, default=DrawConfig.text_scale)
    ap.add_argument("--out", default="", help="folder for results.json and grid.png (default: checkpoint/eval)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    ckpt = Path(args.checkpoint)
    model = load_pretrained(ckpt)
    prompter = Prompter.from_checkpoint(ckpt)
    prompts = list(benchmark_prompts())
    if args.limit:
        prompts = [p for c in CATEGORIES for p in [q for q in prompts if q.family == c][:args.limit]]
    cfg = DrawConfig(think=args.think, num_steps=args.steps, shift=args.shift, text_scale=args.cfg)
    acc, samples = evaluate(model, prompter, prompts, cfg=cfg, images_per_prompt=args.images)
    out = Path(args.out) if args.out else ckpt / "eval"
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"accuracy": acc, "think": args.think, "images": args.images,
                                                  "prompts": len(prompts)}, indent=2))
    save_grid(samples, out / "grid.png")
    width = max(len(c) for c in acc)
    for c, a in acc.items():
        print(f"{c:<{width}}  {a:6.1%}")
    print(f"wrote {out / 'results.json'} and {out / 'grid.png'}")


if __name__ == "__main__":
    main()
