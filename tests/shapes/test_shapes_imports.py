"""shapes/ stays light: no Ray, DeepSpeed, vLLM, nor the umm/grpo packages; empty __init__."""
import ast
from pathlib import Path

import shapes

FORBIDDEN = {"ray", "deepspeed", "vllm", "umm", "grpo", "scipy"}
PACKAGE = Path(shapes.__file__).parent


def test_no_heavy_or_cross_package_imports():
    for path in sorted(PACKAGE.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for name in names:
                assert name.split(".")[0] not in FORBIDDEN, f"{path.name} imports {name}"


def test_init_is_empty():
    assert (PACKAGE / "__init__.py").read_text().strip() == ""
