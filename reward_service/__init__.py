"""DVReward: decomposed-verification reward (question sets, verifiers, aggregation, cache).

Kept empty on purpose: importing the package must not pull in Ray, vLLM or the shapes world.
"""
