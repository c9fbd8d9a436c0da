# xdpguard: `make help` lists the targets. Quiet unless V=1.
.DELETE_ON_ERROR:
.SUFFIXES:
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c

V ?= 0
Q := $(if $(filter 1,$(V)),,@)

ARCH := $(shell uname -m)
CLANG ?= clang
# -mcpu=v3: the fast path takes the flow bucket's lock with an atomic cmpxchg.
BPF_CFLAGS := -O2 -g -Wall -Werror -target bpf -mcpu=v3 -I/usr/include/$(ARCH)-linux-gnu -Ibpf

VENV := .venv
PY := $(VENV)/bin/python
STAMP := .stamp

# Everything the project needs from Debian: toolchain and libraries for the
# BPF objects and the shim (bpftool also dumps the kernel's BTF for
# xdpguard trace), Python for the venv (system site packages, so Debian's
# prometheus-client is importable), and the tools the labs, tests and
# benchmarks drive (prometheus for promtool and a real scraper; exabgp, the
# BGP daemon xdpguard flowspec-feed runs under, and gobgpd, an independent
# FlowSpec speaker playing the fleet's controller in the interop test; dnsmasq
# and dig, the real DNS server and client beside a DNS reflection attack).
DEB_PACKAGES := clang llvm libbpf-dev libxdp-dev bpftool pkg-config gcc make \
	python3 python3-venv python3-dev python3-prometheus-client \
	iproute2 ethtool iputils-ping procps tcpdump iptables ipset nftables \
	libclang-rt-14-dev iperf3 prometheus exabgp gobgpd dnsmasq-base bind9-dnsutils

BPF_OBJS := bpf/xdpguard.bpf.o bpf/xg_probe.bpf.o bpf/xg_trace.bpf.o bench/xg_bench.bpf.o bench/xg_tc.bpf.o \
	scripts/xg_anyport.bpf.o
# The project's BPF headers; vmlinux.h (the running kernel's types, for the
# CO-RE trace programs) is made here, not kept.
BPF_HDRS := $(filter-out bpf/vmlinux.h,$(wildcard bpf/*.h))
SHIM := xdpguard/_shim.abi3.so
SHIM_DEPS := $(wildcard libxdp_shim/*.c libxdp_shim/*.h) libxdp_shim/build_shim.py $(BPF_HDRS)

PYTEST_ARGS ?=

.PHONY: all help apt deps build test test-unit test-bpf test-netns lint demo bench fuzz clean

all: build

help:
	@echo "make deps        install Debian packages and the Python venv (idempotent)"
	@echo "make build       compile the XDP object and the cffi shim"
	@echo "make test        deps + build + every test tier (what .ci/run calls)"
	@echo "make test-unit | test-bpf | test-netns   one tier"
	@echo "make demo        deps + build + a lab with xdpguard forwarding real traffic"
	@echo "make bench       deps + build + the benchmarks in bench/"
	@echo "make fuzz        long fuzz runs: 10^7 frames through XDP and the C parser, 10^7 libFuzzer inputs"
	@echo "make lint        ruff check and format check"

deps: apt $(STAMP)/venv

# Always checked (a dpkg query, so quick); apt-get runs only for what is missing.
apt:
	$(Q)missing=""; \
	for p in $(DEB_PACKAGES); do \
		dpkg-query -W -f='$${Status}\n' "$$p" 2>/dev/null | grep -q "install ok installed" \
			|| missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
		echo "  APT   $$missing"; \
		apt-get update -qq; \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
			$$missing >/dev/null; \
	fi

# Remade only when the project's metadata changes.
$(STAMP)/venv: pyproject.toml setup.py | apt
	$(Q)test -x $(PY) || /usr/bin/python3 -m venv --system-site-packages $(VENV)
	@echo "  PIP    $(VENV)"
	$(Q)mkdir -p $(STAMP)
	$(Q){ $(PY) -m pip install --upgrade pip setuptools wheel cffi && \
	      $(PY) -m pip install --no-build-isolation -e '.[test]'; } >$(STAMP)/pip.log 2>&1 \
		|| { cat $(STAMP)/pip.log >&2; exit 1; }
	$(Q)touch $@

build: $(BPF_OBJS) $(SHIM)

bpf/vmlinux.h: | apt
	@echo "  BTF    $@"
	$(Q)bpftool btf dump file /sys/kernel/btf/vmlinux format c > $@

bpf/xg_trace.bpf.o: bpf/vmlinux.h

%.bpf.o: %.bpf.c $(BPF_HDRS) $(wildcard bench/*.h) | apt
	@echo "  CLANG  $@"
	$(Q)$(CLANG) $(BPF_CFLAGS) -c $< -o $@

# A failed build fails make (and removes the stale module, so nothing
# imports an old one); a good build shows only its warnings.
$(SHIM): $(SHIM_DEPS) | $(STAMP)/venv
	@echo "  CFFI   $@"
	$(Q)mkdir -p $(STAMP)
	$(Q)if ! $(PY) setup.py -q build_ext --inplace >$(STAMP)/shim.log 2>&1; then \
		cat $(STAMP)/shim.log >&2; rm -f $@; exit 1; \
	fi; grep -E "warning:" $(STAMP)/shim.log >&2 || true
	$(Q)touch $@

test: deps build
	$(Q)$(PY) -m pytest $(PYTEST_ARGS)

test-unit test-bpf test-netns: test-%: deps build
	$(Q)$(PY) -m pytest -m $* $(PYTEST_ARGS)

lint: deps
	$(Q)$(VENV)/bin/ruff check xdpguard tests bench libxdp_shim scripts
	$(Q)$(VENV)/bin/ruff format --check xdpguard tests bench libxdp_shim scripts

demo: deps build
	$(Q)PY=$(abspath $(PY)) scripts/demo.sh

bench: deps build
	$(Q)$(PY) bench/forwarding.py
	$(Q)$(PY) bench/drdos.py
	$(Q)$(PY) bench/policy_scale.py
	$(Q)$(PY) bench/tcp.py
	$(Q)$(PY) bench/fastpath.py
	$(Q)$(PY) bench/challenge.py
	$(Q)$(PY) bench/samples.py

# The long runs of the fuzz tests that make test runs short (FUZZ_RUNS each).
FUZZ_RUNS ?= 10000000
fuzz: deps build
	$(Q)XDPGUARD_FUZZ_FRAMES=$(FUZZ_RUNS) XDPGUARD_FUZZ_RUNS=$(FUZZ_RUNS) \
		$(PY) -m pytest -s -p no:cacheprovider tests/bpf/test_parser_parity.py tests/unit/test_fuzz.py

clean:
	$(Q)rm -rf build $(STAMP) $(BPF_OBJS) bpf/vmlinux.h xdpguard/_shim.* xdpguard/*.so *.egg-info
