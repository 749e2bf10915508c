# tmpfsboot: the two README commands, `make demo` and `make test`.
# Both install what they need on a fresh Debian 12 machine (run as root).

PYTHON   := /usr/bin/python3.11
VENV     := .venv
BIN      := $(VENV)/bin
STAMP    := $(VENV)/.installed

# Debian packages the engine, the image tools, the tests and the VM boot need.
DEB_PACKAGES := \
	python3.11-minimal python3-venv \
	tar xz-utils pixz zstd pigz bzip2 gpgv gnupg attr acl curl ca-certificates openssl \
	initramfs-tools busybox-static kmod cpio linux-image-amd64 qemu-system-x86 \
	nginx-light debootstrap shellcheck iproute2 libcap2-bin

.PHONY: all deps test demo demo-debian lint bench reliability clean

all: test

$(STAMP): pyproject.toml Makefile
	@if [ "$$(id -u)" = 0 ]; then \
		missing=$$(for p in $(DEB_PACKAGES); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q '^install ok installed' || echo $$p; done); \
		if [ -n "$$missing" ]; then \
			apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $$missing; \
		fi; \
	else echo "not root: skipping apt-get (needs: $(DEB_PACKAGES))"; fi
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -e '.[test]'
	touch $@

deps: $(STAMP)

lint: deps
	$(BIN)/ruff check tmpfsboot tests bench
	$(BIN)/mypy

test: deps
	$(BIN)/pytest tests

demo: deps
	$(BIN)/tmpfsboot demo

# A real Debian 12 with systemd: debootstraps once (about 40 s), then cached.
demo-debian: deps
	$(BIN)/tmpfsboot demo --debian

bench: deps
	$(BIN)/python bench/fetch.py
	$(BIN)/python bench/storm.py --write
	$(BIN)/python bench/debian.py --write

# Rewrite the fault matrix in docs/reliability.md from a run of its tests.
reliability: deps
	TMPFSBOOT_RELIABILITY_REPORT=docs/reliability.md $(BIN)/pytest -q \
		tests/test_faults.py tests/test_hostile.py tests/test_resources.py

clean:
	rm -rf $(VENV) build *.egg-info
