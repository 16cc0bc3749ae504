# dcrouter: the two commands of the quick start are `make run` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# Debian packages the tests start as real peers (see docs/development.md).
# One package per line, so parallel additions merge cleanly.
TEST_DEBS := \
  publicsuffix \
  redis-server \
  pebble \
  clamav-daemon \
  spamassassin \
  spamc \
  spamd \
  swaks \
  nsd \
  haproxy \
  dnsutils \
  chromium \
  chromium-driver \
  curl \
  openssl \
  systemd \
  util-linux \
  iproute2 \
  nghttp2-client \
  postfix \
  unbound \
  bind9-utils \
  bind9-dnsutils \
  ldnsutils
CONFIG ?= etc/dcrouter.toml

.PHONY: run test typecheck debs bench clean help docs screenshots

help:
	@echo "make run    - install into .venv and start dcrouter with $(CONFIG)"
	@echo "make test   - install test dependencies (pip + apt-get) and run mypy + pytest"

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: setup.cfg pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e . --config-settings editable_mode=compat
	touch $@

$(VENV)/.installed-test: setup.cfg pyproject.toml $(VENV)/.installed
	$(BIN)/pip install -q -e '.[test]' --config-settings editable_mode=compat
	touch $@

run: $(VENV)/.installed
	$(BIN)/twistd -n --pidfile= dcrouter --config $(CONFIG)

debs:
	@missing=""; for p in $(TEST_DEBS); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  export DEBIAN_FRONTEND=noninteractive; \
	  echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections 2>/dev/null; \
	  (apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends $$missing >/dev/null) \
	    || echo "warning: could not install$$missing; tests needing them will fail"; \
	fi

typecheck: $(VENV)/.installed-test
	$(BIN)/mypy dcrouter

test: $(VENV)/.installed-test debs typecheck
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: $(VENV)/.installed-test
	@echo "see docs/benchmarks.md for each benchmark's command"

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache

docs: $(VENV)/.installed
	$(BIN)/python -m dcrouter.config.reference --write docs/configuration.md

# the console's pictures in docs/operations.md, taken by its headless Chromium tests
screenshots: $(VENV)/.installed-test debs
	DCROUTER_SCREENSHOT_DIR=docs/images $(BIN)/python -m pytest -q tests/api/test_console_browser.py
