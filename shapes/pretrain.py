"""Pretrain the embedded world's policy from scratch: `python -m shapes.pretrain [--minutes 100]`.

A miniature of BAGEL's pretraining on rendered data (see shapes.pretrain_data for the mixture):
flow matching on drawn/edited images (x_t = (1-t)·x0 + t·noise, target v = noise - x0, t from a
logit-normal) plus next-token cross-entropy on the assistant's turns. Every step mixes all tasks in
one packed batch through the same model code the RL trainer uses. AdamW with warm-up and cosine
decay; the checkpoint holds the EMA weights. Seeded and reproducible on a given machine.

The result (safetensors + configs + tokenizer, ~8 MB) is what `make run` starts from
(checkpoints/shapes-base); this command reproduces it.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from shapes.pretrain_data import PLANS, TASKS, Example, ImagePart, TextPart, make_example
from shapes.tokenizer import build_tokenizer, save as save_tokenizer
from umm.checkpoint import load_pretrained, save_pretrained
from umm.config import preset
from umm.model import UnifiedModel
from umm.sequence import Segment


@dataclass(kw_only=True)
class PretrainConfig:
    """Pretraining hyper-parameters (defaults: the shipped checkpoint's recipe)."""
    steps: int = 24000                 # optimizer steps (the run also stops at `minutes`)
    minutes: float = 0.0               # wall-clock budget; 0 = no limit
    batch_size: int = 32
    lr: float = 1e-3
    min_lr_ratio: float = 0.05         # cosine decays to lr * min_lr_ratio
    warmup: int = 300
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    ema: float = 0.999
    ce_weight: float = 0.25            # text cross-entropy relative to the flow MSE
    cfg_dropout: float = 0.1           # drop the conditioning text of a drawing (for CFG)
    canvas_size: int = 32
    task_weights: tuple[float, ...] = (0.44, 0.24, 0.08, 0.08, 0.09, 0.07)   # in shapes.pretrain_data.TASKS order
    seed: int = 0
    threads: int = 2
    eval_every: int = 2000             # steps between quick judge checks (0 = never)
    out: str = "checkpoints/shapes-base"
    init_from: str = ""                # start from this checkpoint's weights (fresh optimizer/schedule)
    plans: str = "restate"             # think-then-draw plans: "restate" the prompt or "commit" to its colours


def target_segments(model: UnifiedModel, ex: Example, *, gen: torch.Generator):
    """Segments of one example plus its training targets: (segments, text_targets, flow_targets).

    text target: (segment index, ids to predict); flow target: (segment index, v target (N, D))."""
    tok = model.cfg.tokens
    segs: list[Segment] = []
    text_t, flow_t = [], []
    for part in ex.parts:
        if isinstance(part, TextPart):
            if part.target:
                text_t.append((len(segs), part.ids + [tok.eos]))
            segs.append(model.text_segment([tok.bos, *part.ids, tok.eos]))
            continue
        tokens, hw = model.image_to_tokens(part.pixels[None])
        x0 = tokens[0]
        if part.target:
            t = torch.sigmoid(torch.randn((), generator=gen))
            s = model.cfg.timestep_shift
            t = s * t / (1 + (s - 1) * t)
            noise = torch.randn(x0.shape, generator=gen)
            flow_t.append((len(segs), noise - x0))
            segs.append(model.latent_segment((1 - t) * x0 + t * noise, t=t, hw=hw, hidden_from_later=True))
            continue
        if part.vae:
            segs.append(model.latent_segment(x0, t=0.0, hw=hw))
        if part.vit:
            segs.append(model.vit_segment(part.pixels))
    return segs, text_t, flow_t


def length_buckets(lengths: list[int], *, slack: float = 1.25) -> list[list[int]]:
    """Split row indices into buckets of similar length (longest first) so that padding stays within
    `slack` x the real tokens of each bucket: one long edit row must not pad 31 short rows."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    buckets: list[list[int]] = []
    for i in order:
        if buckets and lengths[buckets[-1][0]] * (len(buckets[-1]) + 1) <= slack * (
                sum(lengths[j] for j in buckets[-1]) + lengths[i]):
            buckets[-1].append(i)
        else:
            buckets.append([i])
    return buckets


def batch_loss(model: UnifiedModel, examples: list[Example], *, gen: torch.Generator,
               ce_weight: float) -> tuple[torch.Tensor, dict[str, float]]:
    """Flow MSE (mean over target latent elements) + ce_weight * text CE (mean over target tokens)."""
    per_row = [target_segments(model, ex, gen=gen) for ex in examples]
    flow_pred, flow_true, text_h, text_y = [], [], [], []
    for bucket in length_buckets([sum(len(s) for s in segs) for segs, _, _ in per_row]):
        hidden, packed, _ = model.run([per_row[b][0] for b in bucket])
        for r, b in enumerate(bucket):
            _, text_t, flow_t = per_row[b]
            for i, v in flow_t:          # latent tokens sit between the two image markers
                start, end = packed.spans[r][i]
                flow_pred.append(hidden[r, start + 1:end - 1])
                flow_true.append(v)
            for i, ids in text_t:        # position j of [bos w1 .. wn eos] predicts token j + 1
                start, end = packed.spans[r][i]
                text_h.append(hidden[r, start:end - 1])
                text_y += ids
    zero = torch.zeros(())
    mse = F.mse_loss(model.llm2vae(torch.cat(flow_pred)).float(), torch.cat(flow_true)) if flow_pred else zero
    ce = F.cross_entropy(model.text_logits(torch.cat(text_h)), torch.tensor(text_y)) if text_h else zero
    return mse + ce_weight * ce, {"mse": float(mse.detach()), "ce": float(ce.detach())}


def lr_at(step: int, cfg: PretrainConfig, *, elapsed_min: float = 0.0) -> float:
    """Linear warm-up, then cosine decay over the run: the run's progress is the larger of its step
    fraction and (with a `minutes` budget) its time fraction, so a time-capped run still anneals."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    frac = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    if cfg.minutes:
        frac = max(frac, elapsed_min / cfg.minutes)
    frac = min(1.0, frac)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * frac)))


def build_optimizer(model: UnifiedModel, cfg: PretrainConfig) -> torch.optim.Optimizer:
    decay = [p for n, p in model.named_parameters() if p.requires_grad and p.dim() >= 2 and "embed" not in n]
    rest = [p for n, p in model.named_parameters() if p.requires_grad and not (p.dim() >= 2 and "embed" not in n)]
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": rest, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.99))


@dataclass(kw_only=True)
class TrainState:
    """Everything needed to continue a run exactly: weights, EMA, optimizer, position, RNGs."""
    model: UnifiedModel
    ema: UnifiedModel
    opt: torch.optim.Optimizer
    step: int = 0
    elapsed_min: float = 0.0          # training minutes spent before this process
    rng: random.Random
    gen: torch.Generator


STATE_FILE, STATE_JSON = "train_state.safetensors", "train_state.json"


def save_state(state: TrainState, out: str | Path) -> None:
    """Write the resumable state beside the checkpoint (safetensors + JSON, written then renamed)."""
    from safetensors.torch import save_file
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {f"model.{k}": v.detach().contiguous() for k, v in state.model.state_dict().items()}
    tensors.update({f"ema.{k}": v.detach().contiguous() for k, v in state.ema.state_dict().items()})
    for i, p in enumerate(state.model.parameters()):
        for k, v in state.opt.state.get(p, {}).items():
            if torch.is_tensor(v):
                tensors[f"opt.{i}.{k}"] = v.detach().reshape(v.shape).contiguous()
    tensors["gen_state"] = state.gen.get_state()
    save_file(tensors, str(out / (STATE_FILE + ".tmp")))
    meta = {"step": state.step, "elapsed_min": state.elapsed_min, "rng": state.rng.getstate()}
    (out / (STATE_JSON + ".tmp")).write_text(json.dumps(meta))
    (out / (STATE_FILE + ".tmp")).replace(out / STATE_FILE)
    (out / (STATE_JSON + ".tmp")).replace(out / STATE_JSON)


def load_state(state: TrainState, out: str | Path) -> TrainState:
    """Restore a state saved by `save_state` into freshly built model/ema/optimizer."""
    from safetensors.torch import load_file
    out = Path(out)
    tensors = load_file(str(out / STATE_FILE))
    meta = json.loads((out / STATE_JSON).read_text())
    state.model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    state.ema.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("ema.")})
    for i, p in enumerate(state.model.parameters()):
        entries = {k.split(".", 2)[2]: v for k, v in tensors.items() if k.startswith(f"opt.{i}.")}
        if entries:
            state.opt.state[p] = entries
    state.gen.set_state(tensors["gen_state"])
    rng_state = meta["rng"]
    state.rng.setstate((rng_state[0], tuple(rng_state[1]), rng_state[2]))
    state.step, state.elapsed_min = meta["step"], meta["elapsed_min"]
    return state


def pretrain(cfg: PretrainConfig, *, model: UnifiedModel | None = None, progress: bool = True,
             on_eval=None, resume_from: str | Path | None = None) -> tuple[UnifiedModel, list[dict]]:
    """Train; returns the EMA model and the per-step log. `on_eval(state, step)` is called every
    `eval_every` steps (the CLI runs a quick judge check and saves). `resume_from`: a directory
    holding a saved TrainState, continued exactly (same batches, same schedule)."""
    if cfg.plans not in PLANS:
        raise ValueError(f"plans={cfg.plans!r}: not one of {PLANS}")
    if len(cfg.task_weights) != len(TASKS):
        raise ValueError(f"task_weights: need {len(TASKS)} weights for {TASKS}, got {len(cfg.task_weights)}")
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    tok = build_tokenizer()
    if model is None and cfg.init_from:      # a fresh model (its own frozen tables) with the saved weights
        saved = load_pretrained(cfg.init_from)
        model = UnifiedModel(saved.cfg)
        model.load_state_dict(saved.state_dict())
    if model is None:
        model = UnifiedModel(preset("shapes"))
    if tok.get_vocab_size() > model.cfg.llm.vocab_size:
        raise ValueError(f"tokenizer has {tok.get_vocab_size()} ids > model vocab {model.cfg.llm.vocab_size}")
    model.train()
    state = TrainState(model=model, ema=copy.deepcopy(model).eval().requires_grad_(False),
                       opt=build_optimizer(model, cfg), rng=random.Random(cfg.seed),
                       gen=torch.Generator().manual_seed(cfg.seed))
    if resume_from is not None:
        load_state(state, resume_from)
    params = [p for p in model.parameters() if p.requires_grad]
    log: list[dict] = []
    start = time.time() - state.elapsed_min * 60
    bar = tqdm(range(state.step, cfg.steps), desc="pretrain", disable=not progress, mininterval=2.0,
               initial=state.step, total=cfg.steps)
    for step in bar:
        state.step, state.elapsed_min = step, (time.time() - start) / 60
        if cfg.minutes and state.elapsed_min > cfg.minutes:
            bar.write(f"time budget of {cfg.minutes} min reached at step {step}")
            break
        lr = lr_at(step, cfg, elapsed_min=state.elapsed_min)
        for g in state.opt.param_groups:
            g["lr"] = lr
        tasks = state.rng.choices(TASKS, cfg.task_weights, k=cfg.batch_size)
        examples = [make_example(t, state.rng, tok, canvas_size=cfg.canvas_size, cfg_dropout=cfg.cfg_dropout,
                                 plans=cfg.plans)
                    for t in tasks]
        loss, parts = batch_loss(model, examples, gen=state.gen, ce_weight=cfg.ce_weight)
        state.opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip))
        state.opt.step()
        decay = min(cfg.ema, (1 + step) / (10 + step))      # EMA warm-up: early weights fade fast
        with torch.no_grad():
            for pe, p in zip(state.ema.parameters(), model.parameters()):
                pe.lerp_(p, 1 - decay)
        log.append({"step": step, "loss": float(loss.detach()), **parts, "grad_norm": grad_norm, "lr": lr})
        if step % 20 == 0:
            bar.set_postfix(mse=f"{parts['mse']:.4f}", ce=f"{parts['ce']:.3f}")
        if on_eval is not None and cfg.eval_every and step > 0 and step % cfg.eval_every == 0:
            state.step = step + 1
            on_eval(state, step)
    else:
        state.step = cfg.steps
    return state.ema, log


def save_run(model: UnifiedModel, cfg: PretrainConfig, log: list[dict], out: str | Path) -> Path:
    out = Path(out)
    save_pretrained(model, out)
    save_tokenizer(build_tokenizer(), out / "tokenizer.json")
    from shapes.evaluate import PROMPT_FORMAT
    PROMPT_FORMAT.save(out)
    (out / "pretrain_config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2))
    if log:
        (out / "pretrain_log.json").write_text(json.dumps(log[::100] + log[-1:]))
    return out


def _task_weights(text: str) -> tuple[float, ...]:
    """--task-weights 0.5,0.2,...: one non-negative weight per task in TASKS order."""
    try:
        weights = tuple(float(w) for w in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of numbers: {text!r}") from None
    if len(weights) != len(TASKS) or min(weights) < 0 or sum(weights) <= 0:
        raise argparse.ArgumentTypeError(
            f"need {len(TASKS)} non-negative weights (not all 0) for {','.join(TASKS)}, got {text!r}")
    return weights


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for f in dataclasses.fields(PretrainConfig):
        if f.name == "task_weights":
            ap.add_argument("--task-weights", type=_task_weights, default=f.default,
                            help=f"comma-separated weights for {','.join(TASKS)}")
            continue
        ap.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default), default=f.default)
    ap.add_argument("--resume", action="store_true", help="continue the run saved in --out")
    args = ap.parse_args(argv)
    cfg = PretrainConfig(**{k: v for k, v in vars(args).items() if k != "resume"})
    print(json.dumps(dataclasses.asdict(cfg)))
    from shapes.evaluate import quick_check

    def on_eval(state, step):
        print(f"step {step}: {quick_check(state.ema)}", flush=True)
        save_run(state.ema, cfg, [], cfg.out)          # a usable checkpoint at every check
        save_state(state, cfg.out)                     # and a resumable one

    resume = cfg.out if args.resume and (Path(cfg.out) / STATE_FILE).exists() else None
    ema, log = pretrain(cfg, on_eval=on_eval, resume_from=resume)
    out = save_run(ema, cfg, log, cfg.out)
    print(f"saved {out} after {len(log)} steps; final: {quick_check(ema)}")


if __name__ == "__main__":
    main()
