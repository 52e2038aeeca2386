"""cluster/gpu.yaml against Ray's own cluster-config schema, and the operational rules it must keep."""
import json
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
SCHEMA = Path(__import__("ray").__file__).parent / "autoscaler" / "ray-schema.json"


@pytest.fixture(scope="module")
def config():
    return yaml.safe_load((ROOT / "cluster" / "gpu.yaml").read_text())


@pytest.fixture(scope="module")
def schema():
    return json.loads(SCHEMA.read_text())


def test_the_cluster_config_is_valid_for_ray(config, schema):
    jsonschema.validate(config, schema)
    # the schema does refuse what it should (the check above means something)
    with pytest.raises(jsonschema.ValidationError, match="setup_comands"):
        jsonschema.validate({**config, "setup_comands": config["setup_commands"]}, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**config, "max_workers": "three"}, schema)


def _commands(config):
    keys = ("initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands",
            "head_start_ray_commands", "worker_start_ray_commands")
    return [c for k in keys for c in config.get(k, [])]


def test_installs_fail_the_launch_and_nothing_listens_beyond_loopback(config):
    commands = _commands(config)
    assert commands
    for c in commands:
        assert "|| true" not in c and "; true" not in c, c          # a failed install fails the launch
        assert "0.0.0.0" not in c, c
    setup = " ".join(config["setup_commands"])
    assert setup.startswith("set -e") and "make setup" in setup
    head = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head
    for c in config["head_start_ray_commands"] + config["worker_start_ray_commands"]:
        if "ray start" in c:
            assert "RAY_AUTH_MODE=token" in c, c                      # token auth on every node
    assert any("auth_token" in str(dst) for dst in config["file_mounts"])
