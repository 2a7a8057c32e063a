# chadthrottle — build, run, test, bench, install.   Quiet by default; V=1 for every command.
.DELETE_ON_ERROR:
.DEFAULT_GOAL := build
SHELL := /bin/bash

V ?= 0
ifeq ($(V),1)
Q :=
else
Q := @
endif

PYTHON      ?= python3
VENV        ?= .venv
PY          := $(VENV)/bin/python
CLANG       ?= clang
BPFTOOL     ?= bpftool
ARCH        := $(shell uname -m | sed -e 's/x86_64/x86/' -e 's/aarch64/arm64/')
BTF_VMLINUX ?= /sys/kernel/btf/vmlinux
OBJ_DIR     := daemon/chadthrottle/data
BPF_OBJ     := $(OBJ_DIR)/throttle.bpf.o
PREFIX      ?= /usr/local
DESTDIR     ?=
JSON        ?=
PLOT        ?=
PYTEST_ARGS ?=

APT_PACKAGES := clang llvm libbpf-dev bpftool iperf3 curl dbus polkitd pkexec \
                libsystemd-dev pkg-config python3-venv iproute2 systemd

.PHONY: all deps build run test bench install uninstall clean lint

all: build

# ---- dependencies (idempotent; a stamp per step) -------------------------------------------
$(VENV)/.apt-stamp:
	@echo "  APT   $(APT_PACKAGES)"
	$(Q)missing=$$(for p in $(APT_PACKAGES); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q 'ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	    $$missing libsystemd-dev=$$(dpkg-query -W -f='$${Version}' libsystemd0) >/dev/null; \
	fi
	$(Q)mkdir -p $(VENV) && touch $@

$(VENV)/.pip-stamp: pyproject.toml $(VENV)/.apt-stamp
	@echo "  VENV  $(VENV)"
	$(Q)[ -x $(PY) ] || $(PYTHON) -m venv $(VENV)
	$(Q)$(PY) -m pip install -q --upgrade pip >/dev/null
	$(Q)$(PY) -m pip install -q -e '.[journal,bench,test]'
	$(Q)touch $@

deps: $(VENV)/.pip-stamp

# ---- the BPF object (CO-RE; vmlinux.h generated from this kernel's BTF) ----------------------
bpf/vmlinux.h:
	@echo "  GEN   $@"
	$(Q)test -r $(BTF_VMLINUX) || { echo "kernel BTF missing: $(BTF_VMLINUX) (CONFIG_DEBUG_INFO_BTF=y is required)"; exit 1; }
	$(Q)$(BPFTOOL) btf dump file $(BTF_VMLINUX) format c > $@

$(BPF_OBJ): bpf/throttle.bpf.c bpf/throttle.h bpf/vmlinux.h
	@echo "  CLANG $@"
	$(Q)mkdir -p $(OBJ_DIR)
	$(Q)$(CLANG) -g -O2 -target bpf -D__TARGET_ARCH_$(ARCH) -Wall -Werror \
	  -I bpf -c bpf/throttle.bpf.c -o $@
	$(Q)llvm-strip -g $@ 2>/dev/null || true

build: $(VENV)/.apt-stamp $(BPF_OBJ)

# ---- run, test, bench ----------------------------------------------------------------------
run: deps build
	$(Q)$(PY) -m chadthrottle.server.devrun

test: deps build
	$(Q)$(PY) -m pytest $(PYTEST_ARGS)

bench: deps build
	$(Q)$(PY) -m chadthrottle.bench accuracy $(if $(JSON),--json) $(if $(PLOT),--plot bench-out)
	$(Q)$(PY) -m chadthrottle.bench overhead $(if $(JSON),--json)

lint: deps
	$(Q)$(VENV)/bin/ruff check daemon tests

# ---- install (honours DESTDIR and PREFIX) ---------------------------------------------------
install: build
	$(Q)$(PYTHON) -m pip install --root "$(if $(DESTDIR),$(DESTDIR),/)" --prefix "$(PREFIX)" --no-deps --no-build-isolation .
	$(Q)install -Dm644 packaging/chadthrottled.service $(DESTDIR)$(PREFIX)/lib/systemd/system/chadthrottled.service
	$(Q)sed -i 's|@BINDIR@|$(PREFIX)/bin|g' $(DESTDIR)$(PREFIX)/lib/systemd/system/chadthrottled.service
	$(Q)install -Dm644 dbus/org.chadthrottle.Throttle1.conf $(DESTDIR)$(PREFIX)/share/dbus-1/system.d/org.chadthrottle.Throttle1.conf
	$(Q)install -Dm644 dbus/org.chadthrottle.Throttle1.service $(DESTDIR)$(PREFIX)/share/dbus-1/system-services/org.chadthrottle.Throttle1.service
	$(Q)install -Dm644 dbus/org.chadthrottle.Throttle1.xml $(DESTDIR)$(PREFIX)/share/dbus-1/interfaces/org.chadthrottle.Throttle1.xml
	$(Q)install -Dm644 dbus/org.chadthrottle.throttle.policy $(DESTDIR)$(PREFIX)/share/polkit-1/actions/org.chadthrottle.throttle.policy

clean:
	$(Q)rm -rf $(OBJ_DIR)/*.o bpf/vmlinux.h build *.egg-info bench-out
