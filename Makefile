# Two commands do all the set-up on a fresh machine:
#   make run    install, `geoloc setup` (what the service needs, once), start geoloc
#   make test   install, lint, run the test suite
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# What running needs (`make run`), then the test extras on top (`make test`).
STAMP     := $(VENV)/.installed
DEV_STAMP := $(VENV)/.installed-dev
# The Kubernetes policy checker, in a venv of its own: checkov pins older packaging and networkx
# than the project's.
POLICY       := .venv-policy
POLICY_STAMP := $(POLICY)/.installed
CHECKOV      ?= checkov>=3.2,<4

.PHONY: install system-deps web run test lint image-check bench-engine clean

# Debian packages the tests drive as real processes (the load balancer, the browser), and
# Node.js for the web page's npm packages.
SYSTEM_PACKAGES ?= nginx chromium nodejs
WEB       := service/web
WEB_STAMP := $(WEB)/static/.built

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e .
	touch $(STAMP)

$(DEV_STAMP): $(STAMP)
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(DEV_STAMP)

# The web page's libraries (npm ci, versions from package-lock.json) and its offline base
# map, copied into the gitignored service/web/static that the app serves under /web/lib.
$(WEB_STAMP): $(WEB)/package.json $(WEB)/package-lock.json service/api/webpage.py | $(STAMP)
	@command -v npm >/dev/null || $(MAKE) --no-print-directory system-deps SYSTEM_PACKAGES=nodejs
	cd $(WEB) && npm ci --no-audit --no-fund --loglevel=error
	$(BIN)/python -m service.api.webpage build
	touch $(WEB_STAMP)

web: $(WEB_STAMP)

install: $(DEV_STAMP) $(WEB_STAMP)

system-deps:
	@missing=""; for p in $(SYSTEM_PACKAGES); do \
		dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	command -v npm >/dev/null 2>&1 || missing="$$missing npm"; \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages:$$missing"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
			apt-get install -y -qq --no-install-recommends $$missing; \
	fi

# geoloc setup: database, default gallery, reference-image index and calibration, each only
# when missing (the first time about 9 min of CPU with the bluemarble defaults; then seconds).
run: $(STAMP) $(WEB_STAMP)
	$(BIN)/geoloc setup
	$(BIN)/geoloc serve

lint: $(DEV_STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports --no-cache

$(POLICY_STAMP):
	test -x $(POLICY)/bin/python || $(PYTHON) -m venv $(POLICY)
	$(POLICY)/bin/python -m pip install -q '$(CHECKOV)'
	touch $(POLICY_STAMP)

test: lint system-deps $(WEB_STAMP) $(POLICY_STAMP)
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

# The Dockerfile built with buildah from base images made with debootstrap (no registry, no
# daemon; root; several GB of downloads and many minutes): tests/deploy/test_image.py.
image-check: $(DEV_STAMP)
	@for p in buildah debootstrap; do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
		apt-get install -y -qq --no-install-recommends $$missing; fi
	GEOLOC_TEST_IMAGE=1 $(BIN)/python -m pytest -q -s tests/deploy/test_image.py

bench-engine: $(DEV_STAMP)
	$(BIN)/python bench/engine.py

clean:
	rm -rf $(VENV) $(POLICY) .pytest_cache .ruff_cache $(WEB)/node_modules $(WEB)/static
