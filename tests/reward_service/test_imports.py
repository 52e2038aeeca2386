"""reward_service/ layering: no Ray/DeepSpeed anywhere, vLLM only in its backend module, light package
inits, and only the shapes backends know about the shapes world (the rest serves any decomposer and
verifier)."""
import pytest

from tests.test_import_boundaries import DISTRIBUTED, ROOT, imported_roots

PACKAGE = ROOT / "reward_service"
WORLD_AGNOSTIC = ["schema.py", "templates.py", "parse.py", "aggregate.py", "cache.py", "reward.py", "decompose.py"]


VLLM_MODULES = {PACKAGE / "backends" / "vllm_backend.py"}       # built only when backend "vllm" is asked for


def test_no_distributed_stack():
    for path in PACKAGE.rglob("*.py"):
        bad = imported_roots(path) & (DISTRIBUTED - ({"vllm"} if path in VLLM_MODULES else set()))
        assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"


@pytest.mark.parametrize("name", WORLD_AGNOSTIC)
def test_core_modules_do_not_import_the_shapes_world_at_top_level(name):
    roots = imported_roots(PACKAGE / name)
    if name == "decompose.py":       # imports the shapes backend inside the shapes code path only
        source = (PACKAGE / name).read_text()
        top = [l for l in source.splitlines() if l.startswith(("import ", "from "))]
        assert not any("shapes" in l for l in top), top
    else:
        assert "shapes" not in roots and "torch" not in roots, (name, roots)


def test_package_inits_stay_light():
    assert not imported_roots(PACKAGE / "__init__.py") - {"__future__"}
    # the backend interface records (BackendSpec, DecomposeRequest) and the factory; backends load lazily
    init = PACKAGE / "backends" / "__init__.py"
    assert not imported_roots(init) - {"__future__", "dataclasses", "typing", "reward_service"}, init
