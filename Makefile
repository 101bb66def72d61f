# Two entry points for a fresh machine (Python 3.11 and the package registries):
#   make demo   - embedded S3 server, write shards, stream them back, checkpoint, stop
#   make test   - lint, type check, the full test suite (unit on memory://, integration on SeaweedFS)
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check --upgrade pip
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m s3pipes.demo

test: $(STAMP)
	$(VENV)/bin/ruff check s3pipes tests benchmarks
	$(VENV)/bin/ruff format --check s3pipes tests benchmarks
	$(VENV)/bin/mypy
	AWS_EC2_METADATA_DISABLED=true $(PY) -m pytest

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache
