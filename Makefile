# Two commands do everything on a fresh Debian machine: `make demo` and `make test`.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed

.PHONY: demo test deps venv lint bench soak clean

deps:
	@bash softhsm-config/ensure-deps.sh

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	@echo "installing Python packages into $(VENV) (log: $(VENV)/pip.log)"
	@{ $(BIN)/python -m pip install --upgrade pip && \
	   $(BIN)/python -m pip install -e '.[test,fast]'; } > $(VENV)/pip.log 2>&1 \
	   || { cat $(VENV)/pip.log; exit 1; }
	@touch $@

venv: deps $(STAMP)

demo: venv
	@bash softhsm-config/demo.sh

test: venv
	$(BIN)/python -m pytest -q

lint: venv
	$(BIN)/ruff check tm_hsm_agent tests bench
	$(BIN)/mypy tm_hsm_agent

bench: venv
	@bash softhsm-config/ensure-deps.sh ssh-agent:openssh-client
	$(BIN)/python bench/agent_bench.py

soak: venv
	$(BIN)/python bench/soak.py --duration $${DURATION:-60}

clean:
	rm -rf .demo .pytest_cache build dist *.egg-info
