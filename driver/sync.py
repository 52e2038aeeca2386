"""Baseline mode (`trainer.mode=sync`): the pipeline's stages one after another in one process.

This is how single-program trainers (Flow-GRPO) work: sample B groups, score them, compute
advantages, take one optimizer step, repeat. Same stage functions and same prompt/seed stream as the
Ray pipeline, so at max_staleness=0 both compute the same first-step loss; used for correctness
comparison and as the denominator of the pipeline's speed-up (bench P1).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from driver.config import Config
from driver.metrics import MetricsLog, StepRecord, reward_stats
from driver.stages import (LocalReward, PromptStream, batch_advantages, evaluate_heldout, groups_loss,
                           load_policy, sample_group, save_policy, settings_from)


@dataclass(kw_only=True)
class RunResult:
    steps: list[StepRecord] = field(default_factory=list)
    before: dict[str, float] | None = None
    after: dict[str, float] | None = None
    trajectories: int = 0
    seconds: float = 0.0
    first_loss: float | None = None


def is_zero_variance(rewards: list[float]) -> bool:
    return max(rewards) - min(rewards) <= 1e-8


def train_sync(cfg: Config, *, log: MetricsLog | None = None, model=None, save_to: str | Path | None = None
               ) -> RunResult:
    """The one-process baseline; `save_to`: write the trained policy there as a checkpoint."""
    from shapes.tokenizer import build_tokenizer
    torch.manual_seed(cfg.run.seed)
    t_start = time.perf_counter()
    settings, tok = settings_from(cfg), build_tokenizer()
    model = model if model is not None else load_policy(cfg.policy)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.trainer.lr, weight_decay=cfg.trainer.weight_decay)
    reward = LocalReward(cfg)
    stream = PromptStream(cfg.data.families, seed=cfg.run.seed, canvas_size=cfg.policy.canvas_size)
    result = RunResult()
    ev = cfg.eval
    if ev.enabled:
        result.before = evaluate_heldout(model, tok, ev)
    version = 0
    for step in range(cfg.trainer.steps):
        times = {"rollout": 0.0, "reward": 0.0}
        batch, dropped = [], 0
        while len(batch) < cfg.trainer.groups_per_step:
            req = stream.next_request(group_size=cfg.data.group_size, base_seed=cfg.run.seed, policy_version=version)
            t0 = time.perf_counter()
            meta, payload, images = sample_group(model, tok, req, settings)
            t1 = time.perf_counter()
            rewards = reward.score(req.prompt, images)
            times["rollout"] += t1 - t0
            times["reward"] += time.perf_counter() - t1
            result.trajectories += len(rewards)
            if cfg.trainer.drop_zero_variance and is_zero_variance(rewards):
                dropped += 1
                continue
            batch.append((req, payload, rewards, meta.judged))
        t0 = time.perf_counter()
        adv = batch_advantages([b[2] for b in batch], std_scope=cfg.trainer.std_scope)
        loss, stats = groups_loss(model, [b[1] for b in batch], adv.per_group, settings)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.trainer.grad_clip)
        opt.step()
        version += 1
        times["learn"] = time.perf_counter() - t0
        mean, std = reward_stats([b[2] for b in batch])
        judged = [ok for b in batch for ok in b[3]]
        rec = StepRecord(step=step, policy_version=version, groups=len(batch), reward_mean=mean, reward_std=std,
                         judge_acc=sum(judged) / len(judged), loss=stats["loss"], image_loss=stats["image_loss"],
                         text_loss=stats["text_loss"], staleness_max=0, staleness_mean=0.0,
                         zero_variance_dropped=dropped, stale_dropped=0, image_clip_frac=stats["image_clip_frac"],
                         seconds=times)
        if result.first_loss is None:
            result.first_loss = stats["loss"]
        result.steps.append(rec)
        if log is not None:
            log.add(rec)
    if ev.enabled:
        result.after = evaluate_heldout(model, tok, ev)
    if save_to is not None:
        save_policy(model, cfg.policy, save_to)
    result.seconds = time.perf_counter() - t_start
    return result
