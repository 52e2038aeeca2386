"""Ray actor pools and the plain classes they wrap (the only package here, with reward_service/,
driver/ and cluster/, allowed to import Ray).

Kept empty on purpose: importing the package must not start or import Ray; import the modules, e.g.
  actors.pool            ActorPool: least-loaded dispatch, backpressure, timeouts, retries
  actors.reward_workers  DecomposerWorker, VerifierWorker and the RewardService facade
"""
