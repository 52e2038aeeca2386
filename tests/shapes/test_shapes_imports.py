"""shapes/ stays light: no Ray, DeepSpeed, vLLM; the world itself (scenes, prompts, judge, tokenizer,
pretraining data) does not import the model either — only the two model-facing entry points do."""
import ast
from pathlib import Path

import shapes

FORBIDDEN = {"ray", "deepspeed", "vllm", "umm", "grpo", "scipy"}
MODEL_FACING = {"pretrain.py": {"umm"}, "evaluate.py": {"umm", "grpo"}}   # may import these, nothing else
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
                root = name.split(".")[0]
                allowed = MODEL_FACING.get(path.name, set())
                assert root not in FORBIDDEN - allowed, f"{path.name} imports {name}"


def test_init_is_empty():
    assert (PACKAGE / "__init__.py").read_text().strip() == ""
