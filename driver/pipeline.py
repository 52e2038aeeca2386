"""The streaming trainer on Ray (`trainer.mode=pipeline`). The whole dataflow is in `Pipeline.run`:

    lanes (driver.lanes), one per task:
      RT2I  GroupStream ─► RolloutWorker ×N ──meta──► driver      (index, version, plans, judge verdicts)
      SRR   episodes   ─► RefineWorker ×M  (candidates ─► scored ─► initial picked ─► reflect)
                          │ payload ref ─────────────────────┐   (tokens, latents, log-probs)
                          └─ images ref ──► RewardService ──► driver (rewards + audits: small)
    driver: each lane's quota of groups, in stream order ─► advantages ─► LearnerWorker ×W (ZeRO-3),
            each pulls its shard's payload refs from the object store ─► step ─► weights gathered
            bucket by bucket ─► broadcast on the weight group ─► every rollout and refine actor
            (version + checksum checked)

The driver moves refs and small records only. Every rollout slot is kept busy as long as the
staleness bound allows: a group sampled at policy version v may be trained on at learner version L
only if L - v <= max_staleness (0 = strictly on-policy); older ones are dropped and counted.
Batches are formed in prompt-stream order, so with max_staleness=0 a step sees exactly the groups
the sync baseline sees (same prompts, same seeds, same weights).
"""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from driver.config import Config
from driver.lanes import Counters, Lane, Ready, RT2ILane, Slot, SRRLane
from driver.metrics import MetricsLog, StepRecord, batch_judge_acc, reward_stats, task_metrics
from driver.srr import SRR_SEED_OFFSET, TaskMix
from driver.stages import (Scorer, heldout_metrics, heldout_requests, heldout_samples, load_sources, settings_from,
                           shuffled_advantages)
from driver.sync import RunResult
from grpo.groups import batch_advantages
from grpo.loading import PolicyFactory
from reward_service.report import question_pass_rates


@dataclass(kw_only=True)
class Update:
    """One optimizer step in flight: its refs, its batch, and how stale each group was when batched."""
    step: list                        # learner ranks' train refs
    send: list                        # learner ranks' broadcast refs
    receive: list                     # replicas' receive refs (rollout actors first, then refine actors)
    batch: list[Ready]
    staleness: list[int]              # learner version - group's sampling version, per group
    started: float

    @property
    def refs(self) -> list:
        return self.step + self.send + self.receive


class Pipeline:
    """Owns the pools for one run; `run()` trains and returns the same RunResult as sync mode."""

    def __init__(self, cfg: Config) -> None:
        import ray

        from actors.learner import LearnerSpec
        from actors.policy_learner import PolicyLearner
        from actors.pool import PoolConfig
        from actors.refine import RefineWorker
        from actors.reward_workers import RewardService, RewardServiceConfig
        from actors.rollout import RolloutSpec, RolloutWorker
        from reward_service.backends import BackendSpec

        from driver.cluster import check_resources, learner_placement
        self.cfg, self.ray = cfg, ray
        check_resources(cfg, ray.cluster_resources())
        self.settings, self.sources = settings_from(cfg), load_sources(cfg)
        p = cfg.pools
        spec = RolloutSpec(policy=cfg.policy, settings=self.settings, srr=cfg.srr, judges=self.sources.judges,
                           bucket_bytes=int(p.learner.bucket_mb * (1 << 20)))
        # the learner ranks first, all or nothing: nothing else is started if they cannot be placed
        self.learner_group, learner_opts = learner_placement(ray, p.learner)
        rollout_cls = ray.remote(RolloutWorker)
        rollout_opts = _actor_options(p.rollout)
        self.slots = [Slot(actor=rollout_cls.options(**rollout_opts).remote(spec, i), index=i)
                      for i in range(p.rollout.num)]
        # the refinement pool (SRR): policy replicas that take every weight broadcast like the rollout actors
        refine_cls = ray.remote(RefineWorker)
        self.refine_slots = [Slot(actor=refine_cls.options(**_actor_options(p.refine)).remote(spec, i), index=i)
                             for i in range(p.refine.num)]
        r = cfg.reward
        cache = r.cache or None
        self.reward = RewardService(RewardServiceConfig(
            decomposer=BackendSpec(name=r.decomposer.name, options=dict(r.decomposer.options)),
            verifier=BackendSpec(name=r.verifier.name, options=dict(r.verifier.options)),
            reward=r.rule(), cache_path=cache,
            decomposer_pool=PoolConfig(num_actors=p.decomposer.num, num_cpus=p.decomposer.num_cpus,
                                       num_gpus=p.decomposer.num_gpus, env=dict(p.decomposer.env)),
            verifier_pool=PoolConfig(num_actors=p.verifier.num, num_cpus=p.verifier.num_cpus,
                                     num_gpus=p.verifier.num_gpus, env=dict(p.verifier.env))))
        L = p.learner
        learner_cls = ray.remote(PolicyLearner)
        self.learners = [learner_cls.options(**learner_opts[r_]).remote(LearnerSpec(
            rank=r_, world_size=L.world_size, model_factory=PolicyFactory(cfg.policy),
            lr=cfg.trainer.lr, weight_decay=cfg.trainer.weight_decay, grad_clip=cfg.trainer.grad_clip,
            seed=cfg.run.seed, zero_stage=L.zero_stage, bucket_bytes=int(L.bucket_mb * (1 << 20)),
            max_reuse_distance=None if L.max_reuse_distance == -1 else L.max_reuse_distance))
            for r_ in range(L.world_size)]
        # DeepSpeed's group meets on learner rank 0's node (wherever Ray placed it)
        addr, port = ray.get(self.learners[0].rendezvous.remote())
        ray.get([a.setup.remote(addr, L.master_port or port) for a in self.learners])
        self.reward.wait_ready()
        self._join_weight_group()
        self.version = 0
        self.scoring = ThreadPoolExecutor(max_workers=1, thread_name_prefix="reward")   # one caller of the service
        self.scorer = Scorer(self.reward)

    def _join_weight_group(self) -> None:
        """Learner rank 0 = rank 0 of the weight group, hosted on its node; then the replicas: rollout
        actors, refine actors (rendezvous at once)."""
        addr, port = self.ray.get(self.learners[0].rendezvous.remote())
        port = self.cfg.pools.learner.sync_port or port
        replicas = self.replicas
        world = 1 + len(replicas)
        shared = self.cfg.pools.learner.weight_lane == "auto"
        joins = [self.learners[0].join_weight_group.remote(addr, port, world, shared)]
        joins += [actor.join_weight_group.remote(addr, port, world, 1 + i, shared) for i, actor in enumerate(replicas)]
        self.weight_lane = self.ray.get(joins)[0]

    @property
    def refiners(self) -> list:
        return [s.actor for s in self.refine_slots]

    @property
    def replicas(self) -> list:
        """Every actor holding a policy copy, in weight-group rank order (rollout, then refine)."""
        return [s.actor for s in self.slots + self.refine_slots]

    def lanes(self, counters: Counters) -> list[Lane]:
        """One lane per task with a share of the batch (driver.lanes); the scoring thread is shared."""
        cfg, t = self.cfg, self.cfg.trainer
        mix = TaskMix.of(vars(cfg.tasks), t.groups_per_step)
        common = dict(max_staleness=t.max_staleness, group_size=cfg.data.group_size, scorer=self.scorer,
                      scoring=self.scoring, counters=counters)
        lanes: list[Lane] = [RT2ILane(slots=self.slots, quota=mix.rt2i, stream=self.sources.train,
                                      base_seed=cfg.run.seed, drop_zero_variance=t.drop_zero_variance, **common)]
        if mix.srr:
            seed = cfg.run.seed + SRR_SEED_OFFSET
            lanes.append(SRRLane(slots=self.refine_slots, quota=mix.srr, stream=self.sources.stream(seed),
                                 base_seed=seed, srr=cfg.srr, **common))
        return lanes

    def start_update(self, batch: list[Ready], advantages: list[list[float]]) -> Update:
        """Queue one optimizer step and the weight broadcast after it.

        Each learner rank gets whole groups, the same number of each task in the same order (ZeRO-3
        gathers a module's weights as every rank enters it: the ranks' forward passes must call the same
        modules in the same order, and an SRR group calls the vision encoder an RT2I group does not),
        and pulls their trajectories from the object store (refs passed as arguments). Actor tasks run
        in submission order, so on learner rank 0 the manifest is read after the step and before the
        broadcast, and each rollout actor joins the broadcast after the group it is sampling."""
        shards = rank_shards([g.task for g in batch], len(self.learners))
        step = [learner.train_groups.remote([advantages[i] for i in shard], self.settings,
                                            *[batch[i].payload for i in shard])
                for learner, shard in zip(self.learners, shards)]
        manifest = self.learners[0].weight_manifest.remote()
        send = [a.broadcast_weights.remote() for a in self.learners]
        recv = [actor.receive_weights.remote(manifest) for actor in self.replicas]
        for s in self.slots + self.refine_slots:
            s.syncing = True
        return Update(step=step, send=send, receive=recv, batch=batch, started=time.perf_counter(),
                      staleness=[self.version - g.policy_version for g in batch])

    # -- the loop ---------------------------------------------------------------------------------
    def run(self, *, log: MetricsLog | None = None, on_step=None) -> RunResult:
        """Train `trainer.steps` steps. `on_step(pipeline, record)` runs after each update (weights synced)."""
        ray, cfg, t = self.ray, self.cfg, self.cfg.trainer
        t_start = time.perf_counter()
        result = RunResult()
        if cfg.eval.enabled:
            result.before = self.evaluate()
        counters = Counters()
        lanes = self.lanes(counters)
        step, update = 0, None              # the Update in flight
        while step < t.steps:
            # 1. keep every free slot working, as far as the staleness bound allows
            pending_version = self.version + (1 if update is not None else 0)
            for lane in lanes:
                lane.poll()
                lane.fill(pending_version)
            # 2. wait for anything: finished work, a finished update
            waitables = [r for lane in lanes for r in lane.waitables()] + (update.refs if update else [])
            ready_refs, _ = ray.wait(waitables, num_returns=1, timeout=0.05) if waitables else ([], [])
            for ref in ready_refs:
                any(lane.handle(ref, ray) for lane in lanes)
            # 3. an update finished: record it, bump versions
            if update is not None and _all_done(ray, update.refs):
                rec = self._finish_update(step, update, counters)
                result.steps.append(rec)
                result.first_loss = rec.loss if result.first_loss is None else result.first_loss
                if log is not None:
                    log.add(rec)
                if on_step is not None:
                    on_step(self, rec)
                step, update = step + 1, None
            # 4. once every lane has its quota of usable groups (in stream order), start an update
            if update is None and step < t.steps:
                picks = [lane.peek(self.version) for lane in lanes]
                if all(p is not None for p in picks):
                    batch = [g for lane, p in zip(lanes, picks) for g in lane.pop(p)]
                    adv = batch_advantages([g.rewards() for g in batch], std_scope=t.std_scope).per_group
                    if t.shuffle_advantages:
                        adv = shuffled_advantages(adv, seed=cfg.run.seed * 1_000_003 + step)
                    update = self.start_update(batch, adv)
                    counters.staleness_seen += update.staleness
        result.trajectories = sum(lane.trajectories for lane in lanes)
        if cfg.eval.enabled:
            result.after = self.evaluate()
        result.seconds = time.perf_counter() - t_start
        self.counters = counters
        return result

    def _finish_update(self, step: int, update: Update, counters: Counters) -> StepRecord:
        """Collect a finished update: the new version on every replica, and the step's record."""
        results, sent = self.ray.get(update.step), self.ray.get(update.send)
        versions = self.ray.get(update.receive)
        self.version = results[0].version
        for slot, v in zip(self.slots + self.refine_slots, versions):
            slot.version, slot.syncing = v, False
        rec = self._record(step, update, results, sent, counters)
        counters.since = {k: 0 for k in counters.since}
        return rec

    def _record(self, step: int, update: Update, results, sent, counters: Counters) -> StepRecord:
        batch, stale = update.batch, update.staleness
        mean, std = reward_stats([g.rewards() for g in batch])
        loss = sum(r.loss for r in results) / len(results) if results else 0.0
        st = [r.stats for r in results]
        return StepRecord(step=step, policy_version=self.version, groups=len(batch), reward_mean=mean,
                          reward_std=std, judge_acc=batch_judge_acc([g.meta for g in batch]), loss=loss,
                          question_pass=question_pass_rates(s.audit for g in batch for s in g.scores.result()),
                          tasks=task_metrics(batch), srr_skipped=counters.since["srr_skipped"],
                          image_loss=sum(s.get("image_loss", 0.0) for s in st) / len(st),
                          text_loss=sum(s.get("text_loss", 0.0) for s in st) / len(st),
                          staleness_max=max(stale), staleness_mean=sum(stale) / len(stale),
                          zero_variance_dropped=counters.since["zero_variance"],
                          stale_dropped=counters.since["stale"],
                          image_clip_frac=sum(s.get("image_clip_frac", 0.0) for s in st) / len(st),
                          seconds={"rollout": sum(g.meta.seconds for g in batch) / max(1, len(self.replicas)),
                                   "learn+sync": time.perf_counter() - update.started,
                                   "learn": max(r.seconds for r in results),        # slowest rank's step
                                   "sync": max(x.seconds for x in sent)})

    def evaluate(self) -> dict[str, float]:
        """Held-out metrics (driver.stages.heldout_metrics), the batches dealt out over the rollout
        actors (each batch has a fixed seed, so the pooled results equal one process drawing them all);
        the images go from the object store to the verifiers."""
        requests = heldout_requests(self.sources.heldout, self.cfg.eval, policy_version=self.version)
        drawn = [self.slots[i % len(self.slots)].actor.draw_heldout.options(num_returns=1 + len(req.prompts))
                 .remote(req) for i, req in enumerate(requests)]
        samples = []
        for req, (meta_ref, *image_refs) in zip(requests, drawn):
            meta = self.ray.get(meta_ref)
            results = self.scorer.score(req.prompts, image_refs, key=f"heldout{req.index}")
            samples += heldout_samples(req, meta, results)
        return heldout_metrics(samples, self.sources.judges)

    def checksums(self) -> tuple[int, list[int]]:
        """(learner's gathered checksum, each replica's: rollout actors, then refine actors)."""
        learner = self.ray.get([a.trainable_checksum.remote() for a in self.learners])[0]
        return learner, self.ray.get([actor.checksum.remote() for actor in self.replicas])

    def save_policy(self, directory: str | Path) -> Path:
        """The trained policy as a checkpoint, written by rollout actor 0 (its replica holds the
        learner's latest weights: `checksums` shows they are equal). The path is made absolute here,
        since the actor's working directory is not the driver's; on a multi-node cluster it must be
        on storage that node shares with the driver."""
        return Path(self.ray.get(self.slots[0].actor.save_policy.remote(str(Path(directory).resolve()))))

    def shutdown(self) -> None:
        self.scoring.shutdown(wait=False, cancel_futures=True)
        self.reward.shutdown()
        for a in self.learners:
            try:
                self.ray.get(a.shutdown.remote(), timeout=30)
            except Exception:
                pass
            self.ray.kill(a)
        for actor in self.replicas:
            self.ray.kill(actor)
        from ray.util.placement_group import remove_placement_group
        remove_placement_group(self.learner_group)


def _all_done(ray, refs: list) -> bool:
    ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
    return len(ready) == len(refs)


def rank_shards(tasks: list[str], world_size: int) -> list[list[int]]:
    """Batch positions per learner rank: each task's groups dealt out in equal contiguous runs, every rank
    taking its run of each task in the same task order (the config makes each task's quota divide)."""
    shards: list[list[int]] = [[] for _ in range(world_size)]
    for task in dict.fromkeys(tasks):
        where = [i for i, t in enumerate(tasks) if t == task]
        if len(where) % world_size:
            raise ValueError(f"rank_shards: {len(where)} {task} groups do not divide over {world_size} learner ranks")
        per = len(where) // world_size
        for r in range(world_size):
            shards[r] += where[r * per:(r + 1) * per]
    return shards


def _actor_options(pool) -> dict:
    """Ray actor options of a pool section: its resources, and its env as the actors' runtime env."""
    env = {"runtime_env": {"env_vars": dict(pool.env)}} if pool.env else {}
    return {"num_cpus": pool.num_cpus, "num_gpus": pool.num_gpus, **env}
