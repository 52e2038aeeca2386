"""RolloutWorker: holds a copy of the policy, samples GRPO groups, receives weight broadcasts.

A thin shell over `driver.stages.sample_group`. A group comes back as three objects (Ray
`num_returns=3`): small metadata for the driver, the trajectories for the learner, the images for the
verifier; the last two stay in the object store and only their refs move.

The worker samples only with the weights the driver expects: a request names the policy version,
and a worker holding another version (or whose last broadcast failed its checksum) refuses.
"""
from __future__ import annotations

import torch

from driver.config import Config
from driver.stages import GroupRequest, heldout_verdicts, load_policy, sample_group, settings_from


class StaleWeightsError(RuntimeError):
    """A request for a policy version this worker does not hold."""


class RolloutWorker:
    """One sampling actor (made remote by the driver with the pool's resources)."""

    def __init__(self, cfg: Config, worker_index: int, threads: int = 1) -> None:
        from shapes.tokenizer import build_tokenizer
        torch.set_num_threads(threads)
        self.cfg, self.index = cfg, worker_index
        self.model = load_policy(cfg.policy).eval()
        self.tok = build_tokenizer()
        self.settings = settings_from(cfg)
        self.version = 0
        self.receiver = None                  # set by join_weight_group

    # -- sampling ---------------------------------------------------------------------------------
    def sample(self, req: GroupRequest) -> tuple:
        """(meta, payload, image_0, ..., image_{G-1}): call with `num_returns=2 + group_size` so each
        image is its own object (a verifier pulls only the images it scores)."""
        self.check_version(req.policy_version)
        meta, payload, images = sample_group(self.model, self.tok, req, self.settings)
        return (meta, payload, *list(images))

    def check_version(self, version: int) -> None:
        """Refuse to sample for another policy version than the one held (and verified, once joined)."""
        name = f"{type(self).__name__} {self.index}"
        if version != self.version:
            raise StaleWeightsError(f"{name}: asked for policy v{version}, holds v{self.version}")
        if self.receiver is not None and not self.receiver.ready_for(version):
            raise StaleWeightsError(f"{name}: weights for v{version} did not pass their checksum; refusing to sample")

    def evaluate(self, shard: tuple[int, int]) -> list[tuple[str, bool]]:
        """This actor's share (`shard` = (j, n)) of the held-out evaluation: (category, verdict) per image."""
        return heldout_verdicts(self.model, self.tok, self.cfg.eval, shard=tuple(shard))

    # -- weights ----------------------------------------------------------------------------------
    def join_weight_group(self, host: str, port: int, world_size: int, rank: int, allow_shared: bool = True) -> str:
        """Join the weight-broadcast group (rank 0 is learner rank 0) and start holding version 0;
        returns the lane the group chose ("shared" memory on one node, else "gloo")."""
        from actors.node import node_ip
        from actors.weight_sync import BroadcastGroup, WeightReceiver, trainable_named_parameters
        self.group = BroadcastGroup(host=host, port=port, rank=rank, world_size=world_size, local_host=node_ip())
        self.receiver = WeightReceiver(self.model, bucket_bytes=int(self.cfg.pools.learner.bucket_mb * (1 << 20)),
                                       initial_version=self.version)
        return self.group.open_lane(trainable_named_parameters(self.model), allow_shared=allow_shared)

    def receive_weights(self, manifest) -> int:
        """Take part in one broadcast; the checksum is verified (WeightSyncError on a mismatch, and
        this worker then refuses to sample until a good sync). Returns the version now held."""
        self.receiver.receive(self.group, manifest)
        self.version = manifest.version
        return self.version

    def save_policy(self, directory: str) -> str:
        """Write this replica's weights (the learner's latest, checksum-verified) as a checkpoint."""
        from driver.stages import save_policy
        return str(save_policy(self.model, self.cfg.policy, directory))

    def checksum(self) -> int:
        from actors.weight_sync import model_checksum
        return model_checksum(self.model, bucket_bytes=int(self.cfg.pools.learner.bucket_mb * (1 << 20)))
