"""One DeepSpeed ZeRO-3 learner rank: optimizer steps on its shard of the batch, and the weight push.

    driver ──(loss_fn, shard)──► LearnerWorker rank r  (W ranks, one DeepSpeed data-parallel group)
                                   engine(loss_fn, shard) -> loss ─► backward ─► step ─► version += 1
    driver ──push──────────────► all ranks: broadcast_weights()
                                   ZeRO-3 gathers bucket by bucket on every rank (collectives);
                                   rank 0 alone sends each bucket on the weight group (actors.weight_sync)

A plain class: `ray.remote(LearnerWorker)` makes it an actor; tests and the sync baseline construct it
in-process. DeepSpeed averages gradients over ranks, so each rank's loss must be the MEAN over its
shard and the shards must be of equal size for the step to equal a full-batch step.

ZeRO-3 and UnifiedModel. ZeRO-3 gathers a module's own parameters only in that module's forward
hooks; reading `module.weight` elsewhere sees an empty partition. UnifiedModel has no `forward` (its
entry points are plain methods: `velocity`, `text_logits`, `encode`, ...), so the policy is wrapped in
`_LossModule`, whose forward runs `loss_fn(policy, batch)`: every loss then runs inside the engine's
forward, where DeepSpeed also fetches any parameter read outside its module (external-parameter
discovery). The model itself only reads `.dtype`/`.device` of parameters outside submodule forwards,
which a partitioned parameter keeps; tests/actors/test_learner.py checks a ZeRO-3 step against a
single-process AdamW step with every tensor partitioned.

DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce op at `init_distributed` (~70 s on 2
cores, then cached under ~/.cache/torch_extensions). Only `inference_all_reduce` uses it; training
collectives go through torch.distributed (gloo). `_skip_shm_comm_op` marks the op incompatible in
DeepSpeed's per-process op table, which `build_shm_op` consults, so nothing is compiled.
"""
from __future__ import annotations

import datetime
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor, nn

from actors.node import node_ip
from actors.weight_sync import (
    DEFAULT_BUCKET_BYTES,
    BroadcastGroup,
    SyncStats,
    WeightManifest,
    build_manifest,
    free_port,
    gathered_buckets,
    model_checksum,
    send_weights,
    trainable_named_parameters,
)
from actors.zero_build import build_partitioned, builds_partitioned

LossFn = Callable[[nn.Module, Any], tuple[Tensor, dict]]


@dataclass(kw_only=True)
class LearnerSpec:
    """Everything one learner rank needs (picklable: it crosses into a Ray actor)."""
    rank: int                                  # this rank in the learner group, 0..world_size-1
    world_size: int                            # learner ranks (DeepSpeed data-parallel size)
    model_factory: Callable[[], nn.Module]     # picklable; returns the policy with trainable params set
    master_port: int = 0                       # rendezvous port of DeepSpeed's group (not the weight group's);
                                               # 0 = given to setup() (the driver asks rank 0: `rendezvous`)
    master_addr: str = "127.0.0.1"             # rank 0's address (idem)
    local_rank: int = 0                        # device index on this node (0 when Ray gives one GPU)
    lr: float = 5e-5                           # AdamW, the method's constant lr
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 1e-4
    grad_clip: float = 1.0                     # global grad-norm clip; 0 disables
    seed: int = 0                              # torch seed before model_factory (same weights on all ranks)
    zero_stage: int = 3
    persistence_threshold: int | None = None   # ZeRO-3 keeps tensors below this many elements whole;
                                               # None = DeepSpeed's default, 0 = partition everything
    max_reuse_distance: int | None = 0         # ZeRO-3 keeps a gathered tensor whole if it is used again
                                               # within this many elements of the recorded module trace;
                                               # None = DeepSpeed's 1e9 (see deepspeed_config)
    bucket_bytes: int = DEFAULT_BUCKET_BYTES   # weight-sync bucket size
    timeout_s: float = 600.0                   # collectives' timeout

    def validate(self) -> "LearnerSpec":
        checks = {
            "world_size": self.world_size >= 1,
            "rank": 0 <= self.rank < self.world_size,
            "master_port": 0 <= self.master_port < 65536,
            "model_factory": callable(self.model_factory),
            "lr": self.lr > 0,
            "betas": all(0 <= b < 1 for b in self.betas),
            "weight_decay": self.weight_decay >= 0,
            "grad_clip": self.grad_clip >= 0,
            "zero_stage": self.zero_stage in (0, 1, 2, 3),
            "max_reuse_distance": self.max_reuse_distance is None or self.max_reuse_distance >= 0,
            "bucket_bytes": self.bucket_bytes >= 1,
        }
        bad = [k for k, ok in checks.items() if not ok]
        if bad:
            raise ValueError(f"LearnerSpec.{bad[0]}: invalid value {getattr(self, bad[0])!r}")
        return self

    def deepspeed_config(self) -> dict:
        zero: dict[str, Any] = {"stage": self.zero_stage}
        if self.persistence_threshold is not None:
            zero["stage3_param_persistence_threshold"] = self.persistence_threshold
        if self.max_reuse_distance is not None and self.zero_stage == 3:
            # DeepSpeed's default 1e9 makes every module release scan the trace ahead until 1e9
            # elements: a GRPO loss calls the model G x steps x CFG-branches times, so for a model much
            # smaller than 1e9 each release scans the whole trace and the first step that uses the
            # recorded trace took 137-199 s instead of ~5 s (2 M-parameter policy, 2 CPU ranks)
            zero["stage3_max_reuse_distance"] = self.max_reuse_distance
        return {
            "train_micro_batch_size_per_gpu": 1,   # nominal: the loss_fn sees the whole shard
            "gradient_accumulation_steps": 1,
            "gradient_clipping": self.grad_clip,
            "zero_optimization": zero,
            "zero_allow_untested_optimizer": True,  # torch AdamW, not DeepSpeed's JIT-built ops
            "steps_per_print": 1 << 30,
            "wall_clock_breakdown": False,
        }


@dataclass(kw_only=True)
class StepResult:
    version: int              # policy version after this step
    loss: float               # mean over ranks of each rank's loss
    grad_norm: float          # global norm before clipping
    seconds: float            # forward + backward + step on this rank
    stats: dict = field(default_factory=dict)  # this rank's loss_fn stats


class _LossModule(nn.Module):
    """The engine's module: forward(loss_fn, batch) = loss_fn(policy, batch) (see the module docstring)."""

    def __init__(self, policy: nn.Module):
        super().__init__()
        self.policy = policy

    def forward(self, loss_fn: LossFn, batch: Any):
        return loss_fn(self.policy, batch)


def _is_empty_partition(p: Tensor) -> bool:
    """A ZeRO-3 parameter whose full tensor is not held here (gathered only inside its module's forward)."""
    return hasattr(p, "ds_id") and p.data.numel() == 0


def _skip_shm_comm_op() -> None:
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


class LearnerWorker:
    def __init__(self, spec: LearnerSpec):
        self.spec = spec.validate()
        self.version = 0
        self.engine = None
        self.policy: nn.Module | None = None
        self.group: BroadcastGroup | None = None

    # ------------------------------------------------------------------ setup
    def rendezvous(self) -> tuple[str, int]:
        """(this node's IP, a port free on it): where a group hosted by this rank can meet. The driver
        asks learner rank 0 for DeepSpeed's group and for the weight group, so ranks and receivers on
        other nodes reach it (a local cluster's node IP is 127.0.0.1)."""
        host = node_ip()
        return host, free_port(host)

    def setup(self, master_addr: str | None = None, master_port: int | None = None) -> dict:
        """Join DeepSpeed's group and build the engine; a collective over all learner ranks. The
        rendezvous address defaults to the spec's (`master_addr`/`master_port`)."""
        s = self.spec
        if master_addr is not None or master_port is not None:
            s = self.spec = replace(s, master_addr=master_addr or s.master_addr,
                                    master_port=master_port or s.master_port)
        if not 0 < s.master_port < 65536:
            raise ValueError(f"LearnerSpec.master_port: no rendezvous port (got {s.master_port}); pass one to setup()")
        cuda = torch.cuda.is_available()
        os.environ.update(MASTER_ADDR=s.master_addr, MASTER_PORT=str(s.master_port), RANK=str(s.rank),
                          WORLD_SIZE=str(s.world_size), LOCAL_RANK=str(s.local_rank))
        os.environ.setdefault("DS_ACCELERATOR", "cuda" if cuda else "cpu")
        import deepspeed

        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
        if not cuda:
            _skip_shm_comm_op()
        device = torch.device("cuda", s.local_rank) if cuda else torch.device("cpu")
        if cuda:
            torch.cuda.set_device(device)
        deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo", auto_mpi_discovery=False,
                                   timeout=datetime.timedelta(seconds=s.timeout_s))
        torch.manual_seed(s.seed)
        built_partitioned = s.zero_stage == 3 and builds_partitioned(s.model_factory)
        if built_partitioned:   # never the whole model on one rank (actors.zero_build)
            self.policy = build_partitioned(s.model_factory, s.deepspeed_config(), rank=s.rank,
                                            bucket_bytes=s.bucket_bytes)
            partitioned_at_build = sum(1 for p in self.policy.parameters() if _is_empty_partition(p))
        else:
            self.policy = s.model_factory().to(device)
            partitioned_at_build = 0
        params = [p for p in self.policy.parameters() if p.requires_grad]
        if not params:
            raise ValueError("model_factory returned a model with no trainable parameters")
        optimizer = torch.optim.AdamW(params, lr=s.lr, betas=s.betas, eps=s.eps, weight_decay=s.weight_decay)
        self.engine, *_ = deepspeed.initialize(model=_LossModule(self.policy), optimizer=optimizer,
                                               config=s.deepspeed_config(), dist_init_required=False)
        manifest = self.weight_manifest()
        params = list(self.policy.parameters())
        return {"rank": s.rank, "device": str(device), "tensors": len(params),
                "partitioned_tensors": sum(1 for p in params if _is_empty_partition(p)),
                "partitioned_at_build": partitioned_at_build,
                "trainable_tensors": len(manifest.names), "trainable_bytes": manifest.total_bytes,
                "buckets": len(manifest.buckets)}

    def _engine(self):
        if self.engine is None:
            raise RuntimeError("LearnerWorker.setup() has not run")
        return self.engine

    # ------------------------------------------------------------------ training
    def train_step(self, loss_fn: LossFn, batch: Any) -> StepResult:
        """One optimizer step on this rank's shard; every rank must call it (gradients are averaged)."""
        engine = self._engine()
        t0 = time.perf_counter()
        loss, stats = engine(loss_fn, batch)
        engine.backward(loss)
        engine.step()
        grad_norm = engine.get_global_grad_norm()
        self.version += 1
        mean_loss = loss.detach().float().reshape(1).clone()
        torch.distributed.all_reduce(mean_loss)
        return StepResult(version=self.version, loss=float(mean_loss) / self.spec.world_size,
                          grad_norm=float(grad_norm) if grad_norm is not None else float("nan"),
                          seconds=time.perf_counter() - t0, stats=dict(stats or {}))

    # ------------------------------------------------------------------ weights
    def weight_manifest(self) -> WeightManifest:
        """The plan of the trainable weights at the current version (no checksum: that needs a gather)."""
        self._engine()
        return build_manifest(trainable_named_parameters(self.policy), version=self.version,
                              bucket_bytes=self.spec.bucket_bytes)

    def join_weight_group(self, addr: str, port: int, world_size: int, allow_shared: bool = True) -> str | None:
        """Rank 0 becomes rank 0 of the weight-broadcast group (it hosts its store at addr:port) and
        returns its lane ("shared" memory when every receiver is on this node, else "gloo"); the other
        learner ranks stay out of it (None) but still take part in the gathers."""
        if self.spec.rank != 0:
            return None
        if self.group is not None:     # joining again: a new group replaces the old one
            self.group.close()
        self.group = BroadcastGroup(host=addr, port=port, rank=0, world_size=world_size,
                                    timeout_s=self.spec.timeout_s, local_host=addr)
        return self.group.open_lane(trainable_named_parameters(self.policy), allow_shared=allow_shared)

    def broadcast_weights(self) -> SyncStats:
        """Gather the trainable weights bucket by bucket; rank 0 broadcasts each. All ranks must call."""
        manifest = self.weight_manifest()
        params = [p for _, p in trainable_named_parameters(self.policy)]
        stats = send_weights(self.group, gathered_buckets(params, manifest), manifest)
        if self.spec.rank == 0 and self.group is None:  # raised after the gathers, so no rank hangs
            raise RuntimeError("broadcast_weights: learner rank 0 has not joined the weight group")
        return stats

    def trainable_checksum(self) -> int:
        """xxh3-64 of the full trainable weights (a ZeRO-3 gather: all ranks must call); same on every rank."""
        self._engine()
        return model_checksum(self.policy, bucket_bytes=self.spec.bucket_bytes)

    # ------------------------------------------------------------------ checkpoints
    def save_state(self, folder: str) -> int:
        """This rank's DeepSpeed checkpoint (its ZeRO shard of the weights and the optimizer state) into
        `folder` (tag "state"); a collective: every rank calls it. Returns the version saved."""
        self._engine().save_checkpoint(folder, tag="state", client_state={"version": self.version})
        return self.version

    def load_state(self, folder: str) -> int:
        """Every rank: load `save_state`'s checkpoint (same world size and ZeRO stage); returns its version."""
        path, client = self._engine().load_checkpoint(folder, tag="state", load_module_strict=True,
                                                      load_optimizer_states=True, load_lr_scheduler_states=False)
        if path is None:
            raise FileNotFoundError(f"{folder}: no DeepSpeed checkpoint (tag 'state') for learner rank {self.spec.rank}")
        self.version = int(client["version"])
        return self.version

    def save_trainable(self, path: str) -> None:
        """The trainable weights, gathered bucket by bucket, written by rank 0 as safetensors under their
        names; a collective under ZeRO-3 (every rank calls it)."""
        from safetensors.torch import save_file
        manifest = self.weight_manifest()
        params = [p for _, p in trainable_named_parameters(self.policy)]
        names, out = iter(manifest.names), {}
        for tensors in gathered_buckets(params, manifest):
            for t in tensors:
                name = next(names)
                if self.spec.rank == 0:
                    out[name] = t.detach().cpu().clone().contiguous()
        if self.spec.rank == 0:
            save_file(out, path)

    def state_dict_for_eval(self) -> dict[str, Tensor]:
        """Full CPU copies of all parameters and buffers on rank 0 ({} elsewhere); gathered bucket by bucket."""
        self._engine()
        named = list(self.policy.named_parameters())
        manifest = build_manifest(named, version=self.version, bucket_bytes=self.spec.bucket_bytes)
        out: dict[str, Tensor] = {}
        names = iter(manifest.names)
        for tensors in gathered_buckets([p for _, p in named], manifest):
            for t in tensors:
                name = next(names)
                if self.spec.rank == 0:
                    out[name] = t.detach().cpu().clone()
        if self.spec.rank == 0:
            out.update({n: b.detach().cpu().clone() for n, b in self.policy.named_buffers()})
        return out

    def shutdown(self) -> None:
        if self.group is not None:
            self.group.close()
            self.group = None
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
