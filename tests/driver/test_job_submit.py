"""`ray start --head` on 127.0.0.1, then `ray job submit -- python -m driver.main ...`: the documented
cluster use, end to end. Stops only the cluster it started (never `ray stop`, which would stop every
Ray process on the machine)."""
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from actors.weight_sync import free_port

ROOT = Path(__file__).resolve().parents[2]
RAY = Path(sys.executable).parent / "ray"
SMALL = ["trainer.steps=2", "policy.flow.num_steps=4", "policy.flow.window_size=2", "policy.think.max_new_tokens=6",
         "data.group_size=4", "trainer.groups_per_step=2", "eval.enabled=false", "trainer.drop_zero_variance=false"]



def processes_of(marker: str) -> list[int]:
    """PIDs whose command line mentions `marker` (this cluster's temp dir or GCS port)."""
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if marker in cmd and int(d.name) != os.getpid():
                pids.append(int(d.name))
    return pids


def stop_cluster(markers: list[str]) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        pids = {p for m in markers for p in processes_of(m)}
        for p in pids:
            try:
                os.kill(p, sig)
            except ProcessLookupError:
                pass
        deadline = time.time() + 10
        while time.time() < deadline and any(processes_of(m) for m in markers):
            time.sleep(0.3)


@pytest.mark.skipif(not RAY.exists(), reason="the ray CLI is not installed next to this python")
def test_ray_job_submit_runs_the_driver(tmp_path):
    temp_dir = Path(tempfile.mkdtemp(prefix="rayjob", dir="/tmp"))   # short: Ray's socket paths have a length limit
    gcs, dashboard = free_port(), free_port()
    # token auth, as documented: the cluster and the client share a token (here a file of this test's
    # own, so neither ~/.ray/auth_token nor an earlier test's cluster is needed)
    token = tmp_path / "auth_token"
    token.write_text(secrets.token_hex(32))
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "token",
           "RAY_AUTH_TOKEN_PATH": str(token)}
    markers = [str(temp_dir), f"127.0.0.1:{gcs}"]
    try:
        # every port of its own: the session's test cluster (tests/conftest.py) may hold the defaults,
        # and a dashboard agent that cannot bind leaves the job server with "No available agent"
        ports = [f"--{name}={free_port()}" for name in (
            "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "metrics-export-port",
            "runtime-env-agent-port", "node-manager-port", "object-manager-port", "ray-client-server-port")]
        subprocess.run([str(RAY), "start", "--head", f"--port={gcs}", "--node-ip-address=127.0.0.1",
                        "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", "--include-dashboard=true",
                        "--num-cpus=4", f"--temp-dir={temp_dir}", "--disable-usage-stats", *ports],
                       check=True, env=env, capture_output=True, timeout=300)
        runtime_env = {"env_vars": {"PYTHONPATH": str(ROOT), "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}}
        unauthenticated = subprocess.run([str(RAY), "job", "list", "--address", f"http://127.0.0.1:{dashboard}"],
                                         env={**env, "RAY_AUTH_TOKEN_PATH": str(tmp_path / "no-such-token")},
                                         capture_output=True, text=True, timeout=120)
        assert unauthenticated.returncode != 0           # the cluster really asks for the token
        submit = [str(RAY), "job", "submit", "--address", f"http://127.0.0.1:{dashboard}",
                  "--runtime-env-json", json.dumps(runtime_env), "--",
                  sys.executable, "-m", "driver.main", *SMALL, f"run.out_dir={tmp_path}"]
        deadline = time.time() + 120
        while True:   # right after `ray start` the dashboard's job agent may not be up yet
            out = subprocess.run(submit, env=env, capture_output=True, text=True, timeout=900)
            log = out.stdout + out.stderr
            if out.returncode == 0 or "No available agent" not in log or time.time() > deadline:
                break
            time.sleep(3)
        assert out.returncode == 0, log[-4000:]
        assert "ray: joined" in log
        assert "step    0 v1" in log and "step    1 v2" in log, log[-4000:]
        assert "succeeded" in log
        summary = json.loads((tmp_path / "shapes-rt2i" / "summary.json").read_text())
        assert summary["steps"] == 2
    finally:
        stop_cluster(markers)
        shutil.rmtree(temp_dir, ignore_errors=True)
    assert not processes_of(str(temp_dir))
