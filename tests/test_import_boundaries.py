"""The layering rule: model, math and world packages never import the distributed stack; the pure-math
modules of grpo/ do not even import the model; the trainer (driver/, actors/) knows no world by name
(worlds are plugins); actors/ import nothing from driver/."""
import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
DISTRIBUTED = {"ray", "deepspeed", "vllm"}
PURE_MATH = ["grpo/sde.py", "grpo/advantages.py", "grpo/losses.py", "grpo/refine.py", "grpo/precision.py"]


def imported_roots(path: pathlib.Path) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            roots |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            roots.add((node.module or "").split(".")[0])
    return roots


@pytest.mark.parametrize("package", ["umm", "grpo", "worlds", "shapes"])
def test_core_packages_do_not_import_the_distributed_stack(package):
    files = list((ROOT / package).rglob("*.py"))
    assert files, f"{package}/ has no python files"
    for path in files:
        bad = imported_roots(path) & DISTRIBUTED
        assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"


@pytest.mark.parametrize("module", PURE_MATH)
def test_pure_math_does_not_import_the_model(module):
    bad = imported_roots(ROOT / module) & (DISTRIBUTED | {"umm", "shapes"})
    assert not bad, f"{module} imports {sorted(bad)}"


def test_package_inits_stay_light():
    for package in ("umm", "grpo", "worlds", "shapes"):
        init = ROOT / package / "__init__.py"
        assert not imported_roots(init) - {"__future__"}, f"{init} imports modules"


def _imports(package: str) -> dict[str, set[str]]:
    """Every module of the package -> the dotted names it imports (absolute imports, any depth)."""
    out = {}
    for path in (ROOT / package).rglob("*.py"):
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names.add(node.module or "")
        out[str(path.relative_to(ROOT))] = names
    return out


@pytest.mark.parametrize("package", ["driver", "actors"])
def test_the_trainer_imports_no_world_by_name(package):
    """The shapes world is a plugin found through entry points (worlds.load, umm.tokenizer)."""
    found = {m: sorted(n for n in names if n.split(".")[0] == "shapes") for m, names in _imports(package).items()}
    assert not {m: n for m, n in found.items() if n}, found


def test_actors_import_nothing_from_the_driver():
    found = {m: sorted(n for n in names if n.split(".")[0] == "driver") for m, names in _imports("actors").items()}
    assert not {m: n for m, n in found.items() if n}, found


def test_the_model_and_the_world_interface_sit_below_the_trainer():
    """umm imports neither grpo, worlds nor shapes; worlds (the interface) imports none of umm, grpo, shapes."""
    for package, banned in (("umm", {"grpo", "worlds", "shapes", "actors", "driver"}),
                            ("worlds", {"umm", "grpo", "shapes", "actors", "driver"})):
        found = {m: sorted(n for n in names if n.split(".")[0] in banned) for m, names in _imports(package).items()}
        assert not {m: n for m, n in found.items() if n}, (package, found)


@pytest.mark.parametrize("module", ["driver/stages.py", "driver/sync.py", "driver/config.py", "driver/metrics.py",
                                    "actors/weight_sync.py", "reward_service/scoring.py",
                                    "grpo/groups.py", "grpo/loading.py", "worlds/load.py"])
def test_stage_code_has_no_ray(module):
    """The stage functions and the sync baseline run without Ray; actors are shells around them."""
    bad = imported_roots(ROOT / module) & {"ray", "vllm"}
    assert not bad, f"{module} imports {sorted(bad)}"
