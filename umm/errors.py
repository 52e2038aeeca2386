"""Errors raised by the `umm` package that callers may want to catch by type."""
from __future__ import annotations


class CheckpointError(ValueError):
    """A checkpoint file does not match the module it is loaded into.

    The message names the file and lists missing keys, unexpected keys and shape mismatches
    (the first few of each, with counts), so a naming bug is visible without a debugger.
    """


def describe_mismatch(path: object, *, missing: list[str], unexpected: list[str],
                      shape_mismatch: list[str], show: int = 10) -> str:
    """Human-readable summary of a strict-load failure (empty lists are left out)."""
    parts = [f"checkpoint {path} does not match the model"]
    for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shape_mismatch)):
        if keys:
            more = f" ... (+{len(keys) - show} more)" if len(keys) > show else ""
            parts.append(f"{len(keys)} {label}: {', '.join(keys[:show])}{more}")
    return "; ".join(parts)
