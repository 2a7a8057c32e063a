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
FLOOR_OBJ   := $(OBJ_DIR)/floor.bpf.o
PREFIX      ?= /usr/local
DESTDIR     ?=
JSON        ?=
PLOT        ?=
PYTEST_ARGS ?=

APT_PACKAGES := clang llvm libbpf-dev bpftool iperf3 curl dbus polkitd pkexec \
                libsystemd-dev pkg-config python3-venv iproute2 systemd zsh \
                mmdebstrap systemd-container
# pinned to the installed systemd (package=the package whose version it takes), or apt would
# upgrade systemd itself
APT_PINNED   := libsystemd-dev=libsystemd0 systemd-container=systemd
# the desktop applet (GTK 4 + libadwaita for the system's python3) and its headless tests
APT_GUI_PACKAGES := python3-gi python3-gi-cairo gir1.2-gtk-4.0 gir1.2-adw-1 librsvg2-common \
                    xvfb at-spi2-core python3-pyatspi gir1.2-atspi-2.0 libglib2.0-bin \
                    desktop-file-utils fonts-dejavu-core

.PHONY: all deps build run test bench install uninstall clean lint

all: build

# ---- dependencies (idempotent; a stamp per step) -------------------------------------------
$(VENV)/.apt-stamp:
	@echo "  APT   $(APT_PACKAGES)"
	$(Q)missing=$$(for p in $(APT_PACKAGES); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q 'ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  pins=$$(for p in $(APT_PINNED); do echo "$${p%%=*}=$$(dpkg-query -W -f='$${Version}' $${p#*=})"; done); \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	    $$missing $$pins >/dev/null; \
	fi
	$(Q)mkdir -p $(VENV) && touch $@

# only what is missing is installed (an installed package is never upgraded by this)
$(VENV)/.apt-gui-stamp: $(VENV)/.apt-stamp
	@echo "  APT   $(APT_GUI_PACKAGES)"
	$(Q)missing=$$(for p in $(APT_GUI_PACKAGES); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q 'ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	    $$missing >/dev/null; \
	fi
	$(Q)touch $@

$(VENV)/.pip-stamp: pyproject.toml $(VENV)/.apt-stamp $(VENV)/.apt-gui-stamp
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

$(BPF_OBJ): bpf/throttle.bpf.c bpf/throttle.h bpf/bucket.h bpf/vmlinux.h
	@echo "  CLANG $@"
	$(Q)mkdir -p $(OBJ_DIR)
	$(Q)$(CLANG) -g -O2 -target bpf -mcpu=v3 -D__TARGET_ARCH_$(ARCH) -Wall -Werror \
	  -I bpf -c bpf/throttle.bpf.c -o $@
	$(Q)llvm-strip -g $@ 2>/dev/null || true

# the overhead benchmark's floor: programs that do nothing (never loaded by the daemon)
$(FLOOR_OBJ): bpf/floor.bpf.c bpf/vmlinux.h
	@echo "  CLANG $@"
	$(Q)mkdir -p $(OBJ_DIR)
	$(Q)$(CLANG) -g -O2 -target bpf -mcpu=v3 -D__TARGET_ARCH_$(ARCH) -Wall -Werror \
	  -I bpf -c bpf/floor.bpf.c -o $@
	$(Q)llvm-strip -g $@ 2>/dev/null || true

build: $(VENV)/.apt-stamp $(BPF_OBJ) $(FLOOR_OBJ)

# ---- run, test, bench ----------------------------------------------------------------------
run: deps build
	$(Q)$(PY) -m chadthrottle.server.devrun

# pytest exits 5 when it collected no test: that is a failure here, never a silent pass
test: deps build
	$(Q)$(VENV)/bin/ruff check --no-cache daemon tests
	$(Q)rc=0; $(PY) -m pytest $(PYTEST_ARGS) || rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no test" >&2; exit 1; fi; exit $$rc

# the README's figures: `make bench PLOT=1` (plots into docs/bench), `make bench JSON=1`
bench: deps build
	$(Q)$(PY) -m chadthrottle.bench accuracy $(if $(JSON),--json) $(if $(PLOT),--plot docs/bench)
	$(Q)$(PY) -m chadthrottle.bench homelink $(if $(JSON),--json)
	$(Q)$(PY) -m chadthrottle.bench overhead $(if $(JSON),--json)
	$(Q)$(PY) -m chadthrottle.bench control $(if $(JSON),--json)

lint: deps
	$(Q)$(VENV)/bin/ruff check --no-cache daemon tests

# ---- install (honours DESTDIR and PREFIX) ---------------------------------------------------
# dbus-daemon and polkitd read policy only from their own data directories (or /etc), never
# from $(PREFIX): those files go to DBUS_DATADIR / POLKIT_ACTIONDIR.  The package is installed
# with the distribution's python (its pip needs --break-system-packages on Debian, PEP 668;
# the flag is passed when pip knows it).  Runtime deps: python3-dbus-fast python3-systemd
# python3-rich python3-tomli-w, and pydantic 2 (or pip; Debian 12's python3-pydantic is 1.x);
# the applet (chadthrottle-gui): python3-gi python3-gi-cairo gir1.2-gtk-4.0 gir1.2-adw-1.
INSTALL_PYTHON   ?= $(if $(wildcard /usr/bin/python3),/usr/bin/python3,$(PYTHON))
DBUS_DATADIR     ?= /usr/share/dbus-1
POLKIT_ACTIONDIR ?= /usr/share/polkit-1/actions
UNITDIR          ?= $(PREFIX)/lib/systemd/system
DATADIR          ?= $(PREFIX)/share
# Debian's python installs below <prefix>/local ("posix_local" scheme): hand it the parent of
# a */local PREFIX, and the plain Debian layout (DEB_PYTHON_INSTALL_LAYOUT=deb) otherwise.
PY_DEB_LOCAL      = $(shell $(INSTALL_PYTHON) -c 'import sysconfig; print(int("posix_local" in sysconfig.get_scheme_names()))' 2>/dev/null)
PIP_PREFIX        = $(if $(and $(filter 1,$(PY_DEB_LOCAL)),$(filter %/local,$(PREFIX))),$(patsubst %/local,%,$(PREFIX)),$(PREFIX))
PIP_ENV           = $(if $(filter 1,$(PY_DEB_LOCAL)),$(if $(filter %/local,$(PREFIX)),,DEB_PYTHON_INSTALL_LAYOUT=deb))
PIP_SYSTEM_FLAGS  = $(shell $(INSTALL_PYTHON) -m pip install --help 2>/dev/null | grep -q -- --break-system-packages && echo --break-system-packages)

# Needs the BPF object only, not the toolchain: a built clone installs on a machine without
# clang or apt access (the object is rebuilt only when it is missing or older than its sources).
install: $(BPF_OBJ)
	$(Q)$(PIP_ENV) $(INSTALL_PYTHON) -m pip install -q --root "$(if $(DESTDIR),$(DESTDIR),/)" --prefix "$(PIP_PREFIX)" \
	  --no-deps --no-build-isolation --no-warn-script-location $(PIP_SYSTEM_FLAGS) .
	$(Q)if [ -z "$(DESTDIR)" ]; then \
	  deps=$$($(INSTALL_PYTHON) packaging/runtime-deps.py) || exit 1; \
	  if [ -n "$$deps" ]; then echo "  PIP   $$(echo $$deps)  (not provided by the distribution)"; \
	    $(PIP_ENV) $(INSTALL_PYTHON) -m pip install -q --prefix "$(PIP_PREFIX)" --no-warn-script-location \
	      $(PIP_SYSTEM_FLAGS) $$deps; fi; \
	else echo "  DESTDIR install: runtime dependencies are the package's business: $$($(INSTALL_PYTHON) packaging/runtime-deps.py | tr '\n' ' ')"; fi
	$(Q)install -Dm644 packaging/chadthrottled.service $(DESTDIR)$(UNITDIR)/chadthrottled.service
	$(Q)sed -i 's|@BINDIR@|$(PREFIX)/bin|g' $(DESTDIR)$(UNITDIR)/chadthrottled.service
	$(Q)install -Dm644 dbus/org.chadthrottle.Throttle1.conf $(DESTDIR)$(DBUS_DATADIR)/system.d/org.chadthrottle.Throttle1.conf
	$(Q)install -Dm644 dbus/org.chadthrottle.Throttle1.service $(DESTDIR)$(DBUS_DATADIR)/system-services/org.chadthrottle.Throttle1.service
	$(Q)install -Dm644 dbus/org.chadthrottle.Throttle1.xml $(DESTDIR)$(DBUS_DATADIR)/interfaces/org.chadthrottle.Throttle1.xml
	$(Q)install -Dm644 dbus/org.chadthrottle.throttle.policy $(DESTDIR)$(POLKIT_ACTIONDIR)/org.chadthrottle.throttle.policy
	$(Q)install -Dm644 packaging/org.chadthrottle.Gui.desktop $(DESTDIR)$(DATADIR)/applications/org.chadthrottle.Gui.desktop
	$(Q)install -Dm644 packaging/org.chadthrottle.Gui.svg $(DESTDIR)$(DATADIR)/icons/hicolor/scalable/apps/org.chadthrottle.Gui.svg
	@echo "  installed; now: systemctl daemon-reload; systemctl reload dbus; systemctl enable --now chadthrottled"

clean:
	$(Q)rm -rf $(OBJ_DIR)/*.o bpf/vmlinux.h build *.egg-info bench-out
