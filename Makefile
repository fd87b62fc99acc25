# Two commands on a fresh machine:  `make demo` (the main job)  and  `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
# Pinned first: on these machines it is the CPU build on local disk (an unpinned torch pulls CUDA wheels).
TORCH ?= torch==2.13.0
DEMO_DIR ?= demo-checkpoint
PROMPT ?= def generate(prompt, max_new_tokens=32):

.PHONY: setup demo test bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	echo "$(TORCH)" > $(VENV)/constraints.txt
	$(PY) -m pip install -q -c $(VENV)/constraints.txt -e '.[test]'
	touch $@

# Main job: until the trained fixture lands (issue 3), it runs on a generated tiny random checkpoint,
# so the text is gibberish; the point is the three modes, their statistics and AR == self-spec.
demo: setup
	$(VENV)/bin/trimode make-checkpoint --random --out $(DEMO_DIR) --draft-adapter --force
	for mode in ar diffusion self-spec; do \
	  $(VENV)/bin/trimode generate --checkpoint $(DEMO_DIR) --mode $$mode --max-new-tokens 32 "$(PROMPT)" || exit 1; \
	done

test: setup
	$(PY) -m pytest -q

bench: setup
	mkdir -p out
	$(PY) scripts/bench_modes.py --json out/bench.json

clean:
	rm -rf $(VENV) $(DEMO_DIR) out
