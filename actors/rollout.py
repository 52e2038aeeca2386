"""RolloutWorker: holds a copy of the policy, samples GRPO groups, draws held-out images, receives
weight broadcasts.

A thin shell over grpo.groups (`sample_group`, `draw_heldout`). A group comes back as separate
objects (Ray `num_returns`): small metadata for the driver, the trajectories for the learner, one
object per image for the verifiers; the last two stay in the object store and only their refs move.

The worker samples only with the weights the driver expects: a request names the policy version,
and a worker holding another version (or whose last broadcast failed its checksum) refuses.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from grpo.groups import EvalRequest, GroupRequest, PolicySettings, draw_heldout, sample_group
from grpo.loading import PolicyConfig, load_policy, load_prompter, save_policy
from grpo.srr import SRRConfig
from worlds.base import Judge
from worlds.records import PromptRecord


class StaleWeightsError(RuntimeError):
    """A request for a policy version this worker does not hold."""


@dataclass(frozen=True, kw_only=True)
class RolloutSpec:
    """What a policy replica needs (picklable: it crosses into the actor)."""
    policy: PolicyConfig
    settings: PolicySettings
    srr: SRRConfig | None = None                              # the SRR episode's settings (refine actors)
    judges: dict[str, Judge] = field(default_factory=dict)   # world name -> its judge (records name their world)
    bucket_bytes: int = 32 << 20                              # weight-sync bucket size (the learner's)
    sync_timeout_s: float = 300.0                             # a weight-group collective waits at most this long
    threads: int = 1                                          # torch intra-op threads in the actor


class RolloutWorker:
    """One sampling actor (made remote by the driver with the pool's resources)."""

    def __init__(self, spec: RolloutSpec, worker_index: int) -> None:
        torch.set_num_threads(spec.threads)
        self.spec, self.index, self.settings = spec, worker_index, spec.settings
        self.model = load_policy(spec.policy).eval()
        self.prompter = load_prompter(spec.policy.checkpoint, self.model.cfg)
        self.version = 0
        self.receiver = None                  # set by join_weight_group

    def judge_for(self, prompt: PromptRecord) -> Judge | None:
        return self.spec.judges.get(prompt.world) if prompt.world else None

    # -- sampling ---------------------------------------------------------------------------------
    def sample(self, req: GroupRequest) -> tuple:
        """(meta, payload, image_0, ..., image_{G-1}): call with `num_returns=2 + group_size` so each
        image is its own object (a verifier pulls only the images it scores)."""
        self.check_version(req.policy_version)
        meta, payload, images = sample_group(self.model, self.prompter, req, self.settings,
                                             judge=self.judge_for(req.prompt))
        return (meta, payload, *list(images))

    def draw_heldout(self, req: EvalRequest) -> tuple:
        """(meta, image_0, ..., image_{n-1}) for a held-out batch: call with `num_returns=1 + n`."""
        self.check_version(req.policy_version)
        judges = {self.judge_for(p) for p in req.prompts}
        if len(judges) > 1:
            raise ValueError(f"held-out batch {req.index} mixes prompts of several worlds")
        meta, images = draw_heldout(self.model, self.prompter, req, self.settings, judge=judges.pop())
        return (meta, *list(images))

    def check_version(self, version: int) -> None:
        """Refuse to sample for another policy version than the one held (and verified, once joined)."""
        name = f"{type(self).__name__} {self.index}"
        if version != self.version:
            raise StaleWeightsError(f"{name}: asked for policy v{version}, holds v{self.version}")
        if self.receiver is not None and not self.receiver.ready_for(version):
            raise StaleWeightsError(f"{name}: weights for v{version} did not pass their checksum; refusing to sample")

    # -- weights ----------------------------------------------------------------------------------
    def join_weight_group(self, host: str, port: int, world_size: int, rank: int, allow_shared: bool = True) -> str:
        """Join the weight-broadcast group (rank 0 is learner rank 0) and start holding version 0;
        returns the lane the group chose ("shared" memory on one node, else "gloo")."""
        from actors.node import node_ip
        from actors.weight_sync import BroadcastGroup, WeightReceiver, trainable_named_parameters
        if getattr(self, "group", None) is not None:       # joining again (the group was rebuilt): leave the old one
            self.group.close()
        self.group = BroadcastGroup(host=host, port=port, rank=rank, world_size=world_size, local_host=node_ip(),
                                    timeout_s=self.spec.sync_timeout_s)
        first = self.receiver is None
        self.receiver = WeightReceiver(self.model, bucket_bytes=self.spec.bucket_bytes,
                                       initial_version=self.version if first else self.receiver.version)
        return self.group.open_lane(trainable_named_parameters(self.model), allow_shared=allow_shared)

    def receive_weights(self, manifest) -> int:
        """Take part in one broadcast; the checksum is verified (WeightSyncError on a mismatch, and
        this worker then refuses to sample until a good sync). Returns the version now held."""
        self.receiver.receive(self.group, manifest)
        self.version = manifest.version
        return self.version

    def save_policy(self, directory: str) -> str:
        """Write this replica's weights (the learner's latest, checksum-verified) as a checkpoint."""
        return str(save_policy(self.model, self.spec.policy, directory))

    def held_version(self) -> int | None:
        """The verified policy version this replica holds (None before its first sync or after a failed
        one); cheap: the driver pings a restarted actor with it."""
        if self.receiver is None:
            return None
        return self.version if self.receiver.ready_for(self.version) else None

    def checksum(self) -> int:
        from actors.weight_sync import model_checksum
        return model_checksum(self.model, bucket_bytes=self.spec.bucket_bytes)
