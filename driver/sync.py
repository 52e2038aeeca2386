"""Baseline mode (`trainer.mode=sync`): the pipeline's stages one after another in one process.

This is how single-program trainers (Flow-GRPO) work: sample B groups, score them, compute
advantages, take one optimizer step, repeat. Same stage functions and same prompt/seed stream as the
Ray pipeline, so at max_staleness=0 both compute the same first-step loss; used for correctness
comparison and as the denominator of the pipeline's speed-up (bench P1).
"""
from __future__ import annotations

import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

import torch

from driver.config import Config
from driver.lanes import Counters, Ready
from driver.checkpoint import (DRIVER, TRAINABLE, Checkpointer, load_optimizer, load_trainable, read_json,
                               save_optimizer, save_trainable)
from driver.metrics import StepRecord, batch_judge_acc, reward_stats, task_metrics
from driver.runlog import RunLog
from driver.srr import SRR_SEED_OFFSET, Episode, TaskMix, choose_initial, rectify
from driver.stages import (GroupStream, LocalReward, Scorer, heldout_metrics, heldout_requests,
                           heldout_samples, load_sources, settings_from,
                           check_finite, shuffled_advantages)
from grpo.groups import PolicySettings, batch_advantages, draw_heldout, groups_loss, sample_group
from grpo.loading import load_policy, load_prompter, save_policy
from grpo.srr import draw_candidates, reflect_group
from reward_service.report import question_pass_rates
from worlds.load import Sources


@dataclass(kw_only=True)
class RunResult:
    steps: list[StepRecord] = field(default_factory=list)   # this session's steps
    start_step: int = 0               # steps already done when this session began (a resumed run)
    stopped: bool = False             # ended early on request (SIGINT / SIGTERM), after a checkpoint
    checkpoint: Path | None = None    # the last checkpoint written
    before: dict[str, float] | None = None
    after: dict[str, float] | None = None
    trajectories: int = 0
    seconds: float = 0.0
    first_loss: float | None = None


def is_zero_variance(rewards: list[float]) -> bool:
    return max(rewards) - min(rewards) <= 1e-8


def evaluate_local(model, prompter, sources: Sources, settings: PolicySettings, cfg: Config, scorer: Scorer,
                   *, policy_version: int) -> dict[str, float]:
    """Held-out metrics (driver.stages.heldout_metrics) with every batch drawn in this process."""
    samples = []
    for req in heldout_requests(sources.heldout, cfg.eval, policy_version=policy_version):
        world = req.prompts[0].world
        meta, images = draw_heldout(model, prompter, req, settings, judge=sources.judges.get(world))
        results = scorer.score(req.prompts, list(images), key=f"heldout{req.index}")
        samples += heldout_samples(req, meta, results)
    return heldout_metrics(samples, sources.judges)


def done(value) -> Future:
    """A future that already holds `value` (sync mode's groups carry their scores like the pipeline's)."""
    f: Future = Future()
    f.set_result(value)
    return f


class LocalTasks:
    """Sync mode's groups of each task, drawn and scored in this process with the same units as the
    pipeline's lanes (driver.lanes): the same streams and seeds, the same drops and skip rule."""

    def __init__(self, cfg: Config, model, prompter, sources: Sources, settings: PolicySettings, scorer: Scorer,
                 counters: Counters) -> None:
        self.cfg, self.model, self.prompter, self.sources = cfg, model, prompter, sources
        self.settings, self.scorer, self.counters = settings, scorer, counters
        self.mix = TaskMix.of(vars(cfg.tasks), cfg.trainer.groups_per_step)
        self.rt2i = GroupStream(sources.train, group_size=cfg.data.group_size, base_seed=cfg.run.seed)
        seed = cfg.run.seed + SRR_SEED_OFFSET
        self.srr = GroupStream(sources.stream(seed), group_size=cfg.data.group_size, base_seed=seed)
        self.trajectories = 0

    def state(self) -> dict[str, dict]:
        """Both streams' positions (sync mode consumes exactly what it draws)."""
        return {"rt2i": self.rt2i.state_at(self.rt2i.index), "srr": self.srr.state_at(self.srr.index)}

    def restore(self, state: dict[str, dict]) -> None:
        self.rt2i.restore(state["rt2i"])
        self.srr.restore(state["srr"])

    def batch(self, version: int) -> list[Ready]:
        return self._rt2i(version) + self._srr(version)

    def _rt2i(self, version: int) -> list[Ready]:
        out = []
        while len(out) < self.mix.rt2i:
            req = self.rt2i.next_request(policy_version=version)
            self.rt2i.forget_before(self.rt2i.index)
            meta, payload, images = sample_group(self.model, self.prompter, req, self.settings,
                                                 judge=self.sources.judges.get(req.prompt.world))
            scored = self.scorer.score([req.prompt] * len(images), list(images), key=f"group{req.index}")
            self.trajectories += len(images)
            g = Ready(task="rt2i", index=req.index, prompt=req.prompt, policy_version=version, meta=meta,
                      payload=payload, scores=done(scored), images=list(images))
            if self.cfg.trainer.drop_zero_variance and is_zero_variance(g.rewards()):
                self.counters.add("zero_variance")
                continue
            out.append(g)
        return out

    def _srr(self, version: int) -> list[Ready]:
        srr, G = self.cfg.srr, self.cfg.data.group_size
        while self.mix.srr:
            out = []
            for _ in range(self.mix.srr):
                episode = Episode.of(self.srr.next_request(policy_version=version))
                self.srr.forget_before(self.srr.index)
                judge = self.sources.judges.get(episode.prompt.world)
                _, cands = draw_candidates(self.model, self.prompter, episode.candidates(srr.candidates),
                                           self.settings, srr, judge=judge)
                stage1 = self.scorer.score([episode.prompt] * len(cands), list(cands),
                                           key=f"srr{episode.index}/stage1")
                chosen = choose_initial(episode, [r.reward for r in stage1], srr)
                meta, payload, images = reflect_group(self.model, self.prompter,
                                                      episode.reflect(group_size=G, policy_version=version),
                                                      cands[chosen], self.settings, srr, judge=judge)
                scored = self.scorer.score([episode.prompt] * len(images), list(images), key=f"srr{episode.index}")
                self.trajectories += len(images)
                out.append(Ready(task="srr", index=episode.index, prompt=episode.prompt, policy_version=version,
                                 meta=meta, payload=payload, scores=done(scored), images=list(images),
                                 episode=episode))
            if any(rectify(g.episode, g.raw_rewards()).improved for g in out):
                return out
            self.counters.add("srr_skipped")        # the skip rule: no refinement improved anywhere
        return []


def train_sync(cfg: Config, *, log: RunLog | None = None, model=None, save_to: str | Path | None = None,
               checkpoints: Checkpointer | None = None, resume: Path | None = None,
               stop: threading.Event | None = None) -> RunResult:
    """The one-process baseline. `save_to`: write the trained policy there as a checkpoint folder;
    `checkpoints`: write the run's checkpoints (driver.checkpoint); `resume`: continue from one; `stop`:
    set (by a signal handler) to end after the current step with a checkpoint."""
    torch.manual_seed(cfg.run.seed)
    t_start = time.perf_counter()
    settings, sources = settings_from(cfg), load_sources(cfg)
    model = model if model is not None else load_policy(cfg.policy)
    prompter = load_prompter(cfg.policy.checkpoint, model.cfg)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.trainer.lr, weight_decay=cfg.trainer.weight_decay)
    scorer = Scorer(LocalReward(cfg))
    counters = Counters()
    tasks = LocalTasks(cfg, model, prompter, sources, settings, scorer, counters)
    result = RunResult()
    version = start = 0
    if resume is not None:
        state = read_json(resume / DRIVER)
        start, version, result.before = state["step"], state["version"], state.get("before")
        load_trainable(model, resume / TRAINABLE)
        load_optimizer(opt, resume / "learner")
        tasks.restore(state["lanes"])
        counters.total.update(state["counters"])
    elif cfg.eval.enabled and cfg.eval.before:
        result.before = evaluate_local(model, prompter, sources, settings, cfg, scorer, policy_version=0)
    result.start_step = start

    def checkpoint(steps_done: int) -> None:
        checkpoints.save(steps_done, driver={"step": steps_done, "version": version, "lanes": tasks.state(),
                                             "counters": counters.total, "before": result.before},
                         learner=lambda folder: save_optimizer(opt, folder),
                         trainable=lambda path: save_trainable(model, path),
                         policy=lambda folder: save_policy(model, cfg.policy, folder))

    for step in range(start, cfg.trainer.steps):
        t0 = time.perf_counter()
        batch = tasks.batch(version)
        t1 = time.perf_counter()
        check_finite(batch)
        adv = batch_advantages([g.rewards() for g in batch], std_scope=cfg.trainer.std_scope).per_group
        if cfg.trainer.shuffle_advantages:
            adv = shuffled_advantages(adv, seed=cfg.run.seed * 1_000_003 + step)
        loss, stats = groups_loss(model, [g.payload for g in batch], adv, settings)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.trainer.grad_clip))
        opt.step()
        version += 1
        mean, std = reward_stats([g.rewards() for g in batch])
        rec = StepRecord(step=step, policy_version=version, groups=len(batch), reward_mean=mean, reward_std=std,
                         judge_acc=batch_judge_acc([g.meta for g in batch]),
                         question_pass=question_pass_rates(s.audit for g in batch for s in g.scores.result()),
                         tasks=task_metrics(batch), srr_skipped=counters.since["srr_skipped"],
                         loss=stats["loss"], image_loss=stats["image_loss"],
                         text_loss=stats["text_loss"], staleness_max=0, staleness_mean=0.0,
                         zero_variance_dropped=counters.since["zero_variance"], stale_dropped=0,
                         image_clip_frac=stats["image_clip_frac"], grad_norm=grad_norm, policy=stats,
                         seconds={"rollout+reward": t1 - t0, "learn": time.perf_counter() - t1})
        counters.since = {k: 0 for k in counters.since}
        result.first_loss = stats["loss"] if result.first_loss is None else result.first_loss
        result.steps.append(rec)
        if log is not None:
            log.step(rec, batch, adv)
        if checkpoints is not None and (checkpoints.due(step + 1) or (stop is not None and stop.is_set())):
            checkpoint(step + 1)
        if stop is not None and stop.is_set():
            result.stopped = True
            break
    if checkpoints is not None and checkpoints.last_step != start + len(result.steps):
        checkpoint(start + len(result.steps))          # at exit
    result.checkpoint = checkpoints.last if checkpoints is not None else None
    result.trajectories = tasks.trajectories
    if cfg.eval.enabled and not result.stopped:
        result.after = evaluate_local(model, prompter, sources, settings, cfg, scorer, policy_version=version)
    if save_to is not None:
        save_policy(model, cfg.policy, save_to)
    result.seconds = time.perf_counter() - t_start
    return result
