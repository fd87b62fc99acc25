# Two commands on a fresh machine:  `make demo` (the main job)  and  `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
# Pinned first: on these machines it is the CPU build on local disk (an unpinned torch pulls CUDA wheels).
TORCH ?= torch==2.13.0
PROMPT ?= def __init__(self, name, value=None):

.PHONY: setup demo fixture test lint bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	printf '%s\nnumpy<2\n' "$(TORCH)" > $(VENV)/constraints.txt
	# The rest with uv (torch is installed now, so uv keeps it): the same versions from PyPI, fetched in
	# parallel (cold caches here, 2026-11-30: 11 s, pip 77 s); pip if uv cannot be had.
	( $(PY) -m pip install -q uv && $(VENV)/bin/uv pip install -q --python $(PY) -c $(VENV)/constraints.txt \
	  -e '.[test]' ) || $(PY) -m pip install -q -c $(VENV)/constraints.txt -e '.[test]'
	touch $@

# Main job: deploy the embedded default checkpoint (trimode/assets/default, a small model trained on the
# Python standard library): FP8 quantize -> engine build -> Triton repository, then a real tritonserver
# answers one request per mode and stops. A re-run reuses every stage (out/deploy/manifest.json).
demo: setup
	$(VENV)/bin/trimode deploy --out out/deploy --serve --once --prompt "$(PROMPT)"

# Retrain the embedded default in two stages (about 30 min each on 2 CPU cores), rewrite its model card.
fixture: setup
	$(PY) -m trimode.training.train --out out/fixture-stage1 --force
	$(PY) -m trimode.training.train --out trimode/assets/default --init-from out/fixture-stage1 \
	  --steps 1000 --lr 1.5e-3 --warmup 50 --seed 1 --force
	$(PY) -m trimode.training.card trimode/assets/default

# The test files run in parallel, one process per core (pytest-xdist; a file stays in one process),
# handed out in the order tests/conftest.py gives (FIRST_FILES: the costly builds start first).
# Then the `numerics` tests (two computations of the same floats compared within an error bound) again
# on another CPU kernel path: ATen and Inductor scalar code, MKL's SSE2-compatible GEMMs. Another
# machine's ISA or BLAS summation order shows here, on this machine, not first in someone's CI.
OTHER_CPU_PATH := ATEN_CPU_CAPABILITY=default MKL_CBWR=COMPATIBLE
# The GIL-free AOTInductor binding (builder/aoti_loader.py) is built first, once per machine (~45 s; a
# build past BUILD_TIMEOUT_S is stopped, and the passes load through torch's binding with a warning).
test: setup lint
	$(PY) -c 'from trimode.builder.aoti_loader import is_available; is_available()'
	$(PY) -m pytest -q -n auto --dist loadfile --no-loadscope-reorder
	$(OTHER_CPU_PATH) $(PY) -m pytest -q -n auto --dist loadfile -m "numerics and not gpu"

# ruff (lint and format check, everything) and mypy on the packages (pyproject [tool.ruff], [tool.mypy]).
# mypy cannot read setuptools' package-dir mapping, so builder/ plugins/ quantize/ triton_repo/ are
# linked as trimode/<name> inside its cache folder. `ruff format .` fixes what the check finds.
lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	mkdir -p .mypy_cache/pkgdir/trimode
	for d in builder plugins quantize triton_repo; do ln -sfn ../../../$$d .mypy_cache/pkgdir/trimode/$$d; done
	$(VENV)/bin/mypy

bench: setup
	mkdir -p out
	$(PY) scripts/bench_modes.py --json out/bench.json

clean:
	rm -rf $(VENV) out
