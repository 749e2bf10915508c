# tmpfsboot: the two README commands, `make demo` and `make test`.
# Both install what they need on a fresh Debian 12 machine (run as root).

PYTHON   := /usr/bin/python3.11
VENV     := .venv
BIN      := $(VENV)/bin
STAMP    := $(VENV)/.installed

# Debian packages the engine, the image tools, the tests, the VM boot and the benchmarks
# need.
DEB_PACKAGES := \
	python3.11-minimal python3-venv \
	tar xz-utils pixz zstd pigz bzip2 gpgv gnupg attr acl curl ca-certificates openssl \
	initramfs-tools busybox-static kmod cpio linux-image-amd64 qemu-system-x86 \
	nginx-light debootstrap shellcheck iproute2 libcap2-bin \
	debhelper dh-python pybuild-plugin-pyproject python3-all python3-setuptools python3-wheel \
	dpkg-dev lintian man-db \
	squashfs-tools erofs-utils dracut-core dracut-network dracut-live \
	isc-dhcp-client iputils-arping valgrind

.PHONY: all deps test demo demo-debian lint bench bench-layers fleet reliability man deb clean

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
	$(BIN)/python bench/fetch.py --write
	$(BIN)/python bench/extract.py --instructions --write
	$(BIN)/python bench/storm.py --write
	$(BIN)/python bench/debian.py --write

# 1,000 and 10,000 simulated nodes through three caching nginx in network namespaces.
fleet: deps
	$(BIN)/python bench/fleet.py --write

# tar.zst vs squashfs vs erofs vs dracut's livenet, booted in QEMU (about 20 minutes).
bench-layers: deps
	$(BIN)/python bench/layers.py --write

# Rewrite the fault matrix and the hostile-client tables in docs/reliability.md from a
# run of their tests.
reliability: deps
	TMPFSBOOT_RELIABILITY_REPORT=docs/reliability.md $(BIN)/pytest -q \
		tests/test_faults.py tests/test_hostile.py tests/test_resources.py \
		tests/test_serve_hostile.py

# Manual pages, generated from the argument parser and the parameter tables.
MANDIR := build/man
man: deps
	$(BIN)/python -m tmpfsboot.cli.manpage $(MANDIR)

# dist/tmpfsboot_VERSION_all.deb, built with dh + pybuild from a copy of the tree (so
# dpkg-buildpackage writes nothing beside or inside the worktree), then checked by lintian.
# PATH is reset so the build uses Debian's own python3, whatever the caller has (pyenv, venv).
DIST     := dist
DEBBUILD := build/deb
deb: deps
	rm -rf $(DEBBUILD) && mkdir -p $(DEBBUILD)/src $(DIST)
	tar -cf - --exclude=./.git --exclude=./$(VENV) --exclude=./build --exclude=./dist \
		--exclude=./demo --exclude='*.egg-info' --exclude=__pycache__ --exclude='.*_cache' . \
		| tar -xf - -C $(DEBBUILD)/src
	cd $(DEBBUILD)/src && env PATH=/usr/sbin:/usr/bin:/sbin:/bin dpkg-buildpackage -b -us -uc
	mv $(DEBBUILD)/tmpfsboot_*_all.deb $(DIST)/
	lintian --fail-on error,warning $(DIST)/tmpfsboot_$$(dpkg-parsechangelog -S Version)_all.deb

clean:
	rm -rf $(VENV) build dist *.egg-info
