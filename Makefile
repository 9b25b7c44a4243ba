# Two commands do everything on a fresh machine: `make quickstart` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU wheel where there is no GPU (this version lies on the project's build machines);
# override for a GPU box, e.g. `make TORCH=torch venv`.
TORCH ?= torch==2.13.0

.PHONY: venv corpus quickstart lint test test-all clean
venv: $(VENV)/.installed
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q "$(TORCH)"
	$(VENV)/bin/pip install -q -e '.[dev,s3]'
	touch $@

corpus: examples/corpus.txt
examples/corpus.txt:
	$(PY) -c "from resilient.training.corpus import write_corpus; write_corpus('$@')"

quickstart: venv corpus
	$(VENV)/bin/resilient launch examples/quickstart.toml

# Formatting and lint (ruff, 100 columns): `ruff format resilient tests bench` fixes the former.
lint: venv
	$(VENV)/bin/ruff format --check resilient tests bench
	$(VENV)/bin/ruff check resilient tests bench

# The suite CI runs: lint, unit + integration (+ the quick chaos subset); slow suites left out.
test: venv lint
	$(PY) -m pytest -m "not slow" -q

# Everything, slow chaos suites included.
test-all: venv
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) runs examples/corpus.txt
