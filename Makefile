# Two commands do all the set-up on a fresh machine:
#   make run    install, build the default index if there is none, start geoloc
#   make test   install, lint, run the test suite
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install system-deps run test lint bench-engine clean

# Debian packages the tests drive as real processes (the load balancer, the browser).
SYSTEM_PACKAGES ?= nginx chromium

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

system-deps:
	@missing=""; for p in $(SYSTEM_PACKAGES); do \
		dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages:$$missing"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
			apt-get install -y -qq --no-install-recommends $$missing; \
	fi

run: $(STAMP)
	$(BIN)/geoloc db upgrade
	$(BIN)/geoloc index list | grep -q "^default-$${GEOLOC_PROFILE:-bluemarble}/" || \
		$(BIN)/geoloc index build --res $${GEOLOC_DEFAULT_RES:-4}
	$(BIN)/geoloc serve

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint system-deps
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

bench-engine: $(STAMP)
	$(BIN)/python bench/engine.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
