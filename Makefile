# Callflow: `make up` runs everything locally, `make test` runs the whole suite.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# docker-compose 1.29.2 checks docker-compose.yml without a Docker engine. It pins jsonschema<4, which the dev tools
# outgrow, so it has a venv of its own; its PyYAML 5.4.1 builds from source, which needs a Cython before 3.
COMPOSE_VENV := $(VENV)/compose
COMPOSE_CONSTRAINTS := $(COMPOSE_VENV)/constraints.txt

.PHONY: install up demo test bench lint clean

install: $(STAMP)
	test -x $(COMPOSE_VENV)/bin/docker-compose || { \
		$(PYTHON) -m venv $(COMPOSE_VENV) \
		&& echo 'cython<3' > $(COMPOSE_CONSTRAINTS) \
		&& PIP_CONSTRAINT=$(CURDIR)/$(COMPOSE_CONSTRAINTS) $(COMPOSE_VENV)/bin/pip install --quiet docker-compose==1.29.2 setuptools==80.9.0; }

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

.env:
	cp .env.example .env

up: install .env
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/honcho run deploy/bugsink/setup.sh
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/honcho run callctl db upgrade
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/honcho run callctl mq declare
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/honcho run callctl mq migrate
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/honcho run callctl mq console
	PATH="$(CURDIR)/$(BIN):$$PATH" exec $(BIN)/honcho start

# With `make up` running: a 200-contact campaign against the simulator, watched to its end.
demo: install .env
	@PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/honcho run callctl demo

test: install
	$(BIN)/python -m pytest

bench: install
	command -v wrk >/dev/null || apt-get install -y wrk
	$(BIN)/python -m bench.run

lint: install
	$(BIN)/ruff check shared services tests bench
	$(BIN)/ruff format --check shared services tests bench

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info .bugsink
