"""`python -m reward_service.decompose --backend hf|vllm|openai`: options checked first, no model loaded
when every prompt is cached, a prompt the model cannot decompose stops the run naming it."""
import json

import pytest

from bench.tiny_models import build_qwen2
from reward_service.backends import BackendSpec
from reward_service.backends.llm_options import decomposer_version
from reward_service.cache import DecompositionCache
from reward_service.decompose import main
from reward_service.parse import parse_decomposition

PROMPTS = ["two red apples on a table", "a blue cat", "two red apples on a table"]
REPLY = '[{"id": "q1", "question": "Is there an apple?", "kind": "semantic", "category": "existence", "parents": []}]'


def _jsonl(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))    # no meaning column needed
    return path


def test_everything_cached_means_no_model_is_loaded(tmp_path, capsys):
    options = {"model": str(tmp_path / "not-a-model"), "model_name": "qwen-tiny"}
    version = decomposer_version(BackendSpec(name="hf", options=options))
    cache_path = tmp_path / "c.sqlite"
    with DecompositionCache(cache_path) as cache:
        cache.put_many(parse_decomposition(REPLY, prompt=p, version=version) for p in set(PROMPTS))
    args = [str(_jsonl(tmp_path)), "--cache", str(cache_path), "--backend", "hf", "--no-progress"]
    args += [a for k, v in options.items() for a in ("--option", f"{k}={v}")]
    assert main(args) == 0
    assert "prompts=2 already_cached=2 decomposed=0 stored=0 hit_rate=1.000" in capsys.readouterr().out
    assert str(version) == "hf:qwen-tiny@dsg-json-v1"


@pytest.mark.slow
def test_a_prompt_the_model_cannot_decompose_stops_the_run_by_name(tmp_path, capsys):
    model = build_qwen2(tmp_path / "qwen2")
    args = [str(_jsonl(tmp_path)), "--cache", str(tmp_path / "c.sqlite"), "--backend", "hf", "--no-progress",
            "--option", f"model={model}", "--option", "budget=1", "--option", "max_tokens=16"]
    assert main(args) == 1                      # a random model's real generate output is no question list
    err = capsys.readouterr().err
    assert "error: decomposition of prompt 'two red apples on a table' failed: no usable reply in 1 attempts" in err
    assert len(DecompositionCache(tmp_path / "c.sqlite")) == 0


@pytest.mark.parametrize("option, match", [
    ("model", "expected KEY=VALUE"),
    ("budget=0", "option budget=0: must be >= 1"),
])
def test_bad_llm_options_stop_before_the_cache_is_opened(tmp_path, capsys, option, match):
    args = [str(_jsonl(tmp_path)), "--cache", str(tmp_path / "c.sqlite"), "--backend", "hf", "--option", "model=m",
            "--option", option]
    assert main(args) == 2
    assert match in capsys.readouterr().err and not (tmp_path / "c.sqlite").exists()
