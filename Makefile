# Everything installs from nothing into .venv. torch goes in FIRST (the CPU build, 2.13.0):
# any unpinned later install would otherwise pull a multi-GB CUDA build.
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
TORCH_SPEC ?= torch==2.13.0
STAMP  := $(VENV)/.installed

.PHONY: setup run test bench clean

setup: $(STAMP)

$(STAMP): setup.py Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel
	$(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q -e ".[test]"
	$(PY) scripts/check_torch.py
	touch $(STAMP)

run: $(STAMP)
	@echo "make run: not yet. The RL trainer (driver/, issue 6) has not landed, and the pretrained"
	@echo "shapes policy is not shipped yet (issue 4). What runs today:"
	@echo "  $(PY) -m shapes.pretrain --minutes 120 --out checkpoints/shapes-base   # pretrain the policy"
	@echo "  $(PY) -m shapes.evaluate --checkpoint checkpoints/shapes-base         # held-out benchmark"
	@echo "  make test"

test: $(STAMP)
	$(PY) -m pytest -q tests

bench: $(STAMP)
	@echo "make bench: no benchmarks yet (they arrive with the reward service and the trainer)."

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
