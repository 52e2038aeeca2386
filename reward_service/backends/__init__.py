"""Decomposer and verifier backends; each module imports only what its own backend needs."""
