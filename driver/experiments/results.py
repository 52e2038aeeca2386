"""docs/results.md is written by the experiment scripts, one marked section each, replaced atomically."""
from __future__ import annotations

import platform
import sys
from pathlib import Path

from driver.config import REPO_ROOT

RESULTS = REPO_ROOT / "docs" / "results.md"
HEADER = ("# Results\n\nTables written by the experiment scripts (`python -m driver.experiments.<name>`), each "
          "with the command and machine that produced it. Re-running a script replaces its section.\n")


def machine() -> str:
    import os

    import torch
    return (f"{platform.platform()}, {os.cpu_count()} cores, Python {sys.version.split()[0]}, "
            f"torch {torch.__version__} ({torch.get_num_threads()} threads)")


def command_line(module: str, argv: list[str] | None) -> str:
    """How a script was invoked, for the table's caption: `python -m <module> <args>`."""
    return " ".join(["python -m", module, *(argv if argv is not None else sys.argv[1:])])


def write_section(name: str, body: str, path: Path = RESULTS) -> Path:
    """Replace (or append) the section between <!-- name --> and <!-- /name --> markers; tmp + rename."""
    start, end = f"<!-- {name} -->", f"<!-- /{name} -->"
    text = path.read_text() if path.exists() else HEADER
    block = f"{start}\n{body.rstrip()}\n{end}"
    if start in text and end in text:
        text = text[:text.index(start)] + block + text[text.index(end) + len(end):]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)
    return path
