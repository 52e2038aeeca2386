"""The evaluation entry point on a small subset (an untrained model: the plumbing, not the score)."""
import json
import subprocess
import sys
from pathlib import Path

import torch

from shapes.benchmark import CATEGORIES
from shapes.pretrain import save_run, PretrainConfig
from umm.config import preset
from umm.model import UnifiedModel

ROOT = Path(__file__).resolve().parents[2]


def test_evaluate_cli_on_one_prompt_per_category(tmp_path):
    torch.manual_seed(0)
    model = UnifiedModel(preset("shapes"))
    torch.nn.init.normal_(model.llm2vae.weight, std=0.02)    # a non-zero velocity head
    ckpt = save_run(model, PretrainConfig(), [], tmp_path / "ckpt")
    out = tmp_path / "eval"
    proc = subprocess.run([sys.executable, "-m", "shapes.evaluate", "--checkpoint", str(ckpt), "--limit", "1",
                           "--steps", "2", "--threads", "1", "--out", str(out), "--think"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads((out / "results.json").read_text())
    assert set(CATEGORIES) <= set(res["accuracy"]) and res["prompts"] == len(CATEGORIES)
    assert all(0.0 <= a <= 1.0 for a in res["accuracy"].values())
    assert (out / "grid.png").stat().st_size > 0
    assert "single_object" in proc.stdout


def test_evaluate_rejects_a_missing_checkpoint(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "shapes.evaluate", "--checkpoint", str(tmp_path / "nope")],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "ema.safetensors" in proc.stderr
