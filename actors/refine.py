"""RefineWorker: a policy replica that redraws images as edits (the SRR pool).

Like a RolloutWorker it holds the policy, joins the weight-broadcast group and samples only with the
version the driver names (checked against the last verified sync). Its work unit is a
`RefineRequest`: a source image and an edit instruction -> G edit trajectories with their log-probs,
returned as (meta, payload, image_0, ..., image_{G-1}) so the payload and images stay in the object
store.
"""
from __future__ import annotations

from actors.rollout import RolloutWorker
from grpo.groups import RefineRequest, refine_group


class RefineWorker(RolloutWorker):
    """One refinement actor (made remote by the driver with `pools.refine` resources)."""

    def refine(self, req: RefineRequest) -> tuple:
        """Call with `num_returns=2 + group_size`."""
        self.check_version(req.policy_version)
        meta, payload, images = refine_group(self.model, self.prompter, req, self.settings,
                                             judge=self.judge_for(req.prompt))
        return (meta, payload, *list(images))
