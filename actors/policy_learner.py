"""The learner rank the trainer runs: a `LearnerWorker` whose step is the GRPO loss over whole groups."""
from __future__ import annotations

from dataclasses import dataclass

from actors.learner import LearnerWorker, StepResult
from grpo.groups import GroupPayload, PolicySettings, groups_loss


@dataclass(kw_only=True)
class LearnerBatch:
    """One rank's shard: its groups' trajectories and their advantages."""
    payloads: list[GroupPayload]
    advantages: list[list[float]]
    settings: PolicySettings


def learner_loss(policy, batch: LearnerBatch):
    """Runs inside the DeepSpeed engine's forward on every rank (module-level, so it pickles)."""
    return groups_loss(policy, batch.payloads, batch.advantages, batch.settings)


class PolicyLearner(LearnerWorker):
    def train_groups(self, advantages: list[list[float]], settings: PolicySettings,
                     *payloads: GroupPayload) -> StepResult:
        """`payloads` arrive as object-store refs in the call and are resolved by Ray on this rank."""
        return self.train_step(learner_loss, LearnerBatch(payloads=list(payloads), advantages=advantages,
                                                          settings=settings))
