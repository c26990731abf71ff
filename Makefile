# Two commands do all the set-up on a fresh machine:
#   make serve   create .venv, install, serve the default model
#   make test    create .venv, install (with the dev extra and the reference models), run the tests
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# torch first and pinned: this version has a CPU build on the project machines' disk;
# an unpinned torch would pull a multi-GB CUDA build.
TORCH_VERSION ?= 2.13.0
INSTALLED := $(VENV)/.installed
DEV_INSTALLED := $(VENV)/.dev-installed

.PHONY: serve test lint mutate clean

$(INSTALLED): pyproject.toml
	@# The compiled CPU kernels and torch.compile need a C++ compiler (Debian's g++ where
	@# there is none and apt-get may run); without one the server runs the torch twins.
	command -v c++ >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq g++) \
		|| echo "note: no C++ compiler; the server will use the torch twins"
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet torch==$(TORCH_VERSION)
	$(PIP) install --quiet -e .
	touch $@

# palm-rlhf-pytorch's package __init__ imports its RLHF trainers (accelerate, einx,
# hl-gauss-pytorch, ...). Its PaLM class needs only torch, einops, beartype, tqdm and
# packaging (all in the dev extra), so the package itself goes in with --no-deps and the
# tests import palm_rlhf_pytorch.palm without running that __init__ (tests/reference.py).
$(DEV_INSTALLED): $(INSTALLED)
	$(PIP) install --quiet -e '.[dev]'
	$(PIP) install --quiet --no-deps palm-rlhf-pytorch==0.8.0
	touch $@

serve: $(INSTALLED)
	$(VENV)/bin/palm-serve serve $(ARGS)

test: $(DEV_INSTALLED)
	$(PY) -m pytest -q $(ARGS)

# mypy sees the top-level package directories under their installed name, palm_serve.*
TYPECHECK := build/typecheck
lint: $(DEV_INSTALLED)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	mkdir -p $(TYPECHECK)/palm_serve && touch $(TYPECHECK)/palm_serve/__init__.py
	for d in kernels model engine server; do ln -sfn ../../../$$d $(TYPECHECK)/palm_serve/$$d; done
	cd $(TYPECHECK) && ../../$(VENV)/bin/mypy --config-file ../../pyproject.toml -p palm_serve

# Mutation testing (mutmut; slow, not in CI): mutation/run.sh stages each config of
# mutation/ under build/mutate/, runs each mutant against only the tests that reach the
# mutated function and writes mutation/results/<config>.txt. MUTATE="engine" runs one config;
# MUTATE_CHILDREN=2 runs two mutants at once (a quiet machine). Verdicts are kept between
# runs (only changed functions are tested again); MUTATE_RETRY=1 also tests again the
# mutants not killed, after tests were written for them; MUTATE_FRESH=1 starts over.
MUTATE ?= engine engine_io engine_spec kernels server
mutate: $(DEV_INSTALLED)
	for m in $(MUTATE); do nice -n 15 mutation/run.sh $$m || exit 1; done

clean:
	rm -rf $(VENV)
