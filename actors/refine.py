"""RefineWorker: a policy replica that redraws images as edits (the SRR pool).

Like a RolloutWorker it holds the policy, joins the weight-broadcast group and samples only with the
version the driver names (checked against the last verified sync). Its work units (grpo.srr,
grpo.groups), each returned as separate objects so payloads and images stay in the object store:
  candidates(CandidatesRequest)        SRR stage 1: (meta, image_0, ..., image_{K-1}), ODE
  reflect(ReflectRequest, initial)     SRR stage 2: (meta, payload, image_0, ..., image_{G-1})
  refine(RefineRequest)                an edit with a given instruction: (meta, payload, images...)
"""
from __future__ import annotations

import numpy as np

from actors.rollout import RolloutWorker
from grpo.groups import RefineRequest, refine_group
from grpo.srr import CandidatesRequest, ReflectRequest, draw_candidates, reflect_group


class RefineWorker(RolloutWorker):
    """One refinement actor (made remote by the driver with `pools.refine` resources)."""

    def refine(self, req: RefineRequest) -> tuple:
        """Call with `num_returns=2 + group_size`."""
        self.check_version(req.policy_version)
        meta, payload, images = refine_group(self.model, self.prompter, req, self.settings,
                                             judge=self.judge_for(req.prompt))
        return (meta, payload, *list(images))

    def candidates(self, req: CandidatesRequest) -> tuple:
        """Call with `num_returns=1 + count`."""
        self.check_version(req.policy_version)
        meta, images = draw_candidates(self.model, self.prompter, req, self.settings, self._srr(),
                                       judge=self.judge_for(req.prompt))
        return (meta, *list(images))

    def reflect(self, req: ReflectRequest, initial: np.ndarray) -> tuple:
        """Call with `num_returns=2 + group_size`; `initial` may be passed as an object-store ref."""
        self.check_version(req.policy_version)
        meta, payload, images = reflect_group(self.model, self.prompter, req, initial, self.settings, self._srr(),
                                              judge=self.judge_for(req.prompt))
        return (meta, payload, *list(images))

    def _srr(self):
        if self.spec.srr is None:
            raise ValueError(f"RefineWorker {self.index}: no SRR settings in its RolloutSpec")
        return self.spec.srr
