#!/usr/bin/env bash
# What one /probe costs the real sonde-agent, beside the physical floor (a C loop of
# connect()+close() to nginx, plus nginx's CPU per keep-alive request) and the real
# blackbox_exporter, all against the same nginx in one run (docs/benchmarks.md,
# "`/probe` against the floor and blackbox_exporter").
#
#   scripts/probe-bench.sh                       3 rounds of 5 s phases, ~2 min
#   scripts/probe-bench.sh --rounds 5 --duration 10s
#   scripts/probe-bench.sh --no-blackbox --perf agent.data   profile the agent
#   scripts/probe-bench.sh --help                every option of probe-bench
#
# Works on a fresh Debian machine: installs the packages it needs when they are missing
# (nginx, gcc, blackbox_exporter; linux-perf only for --perf), builds sonde-agent and
# probe-bench in release, and runs tests/src/bin/probe_bench with the arguments given.
# Set SONDE_AGENT=PATH to measure another sonde-agent binary (a profiling build, an
# older commit).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib/debian-packages.sh

# program -> Debian package
declare -A packages=(
  [nginx]=nginx-light
  [gcc]=gcc
  [prometheus-blackbox-exporter]=prometheus-blackbox-exporter
)
for arg in "$@"; do
  if [[ "$arg" == --perf* ]]; then packages[perf]=linux-perf; fi
done
missing=()
for program in "${!packages[@]}"; do
  if ! PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin" command -v "$program" >/dev/null 2>&1; then
    missing+=("${packages[$program]}")
  fi
done
if ((${#missing[@]})); then
  install_debian_packages "${missing[@]}"
fi

# Two builds, so that the agent is the very binary `cargo build --release -p sonde-agent`
# makes (built together, the two packages' dependency features would be unified).
echo "==> cargo build --release -p sonde-agent"
cargo build --release -p sonde-agent
echo "==> cargo build --release -p sonde-tests --bin probe-bench"
cargo build --release -p sonde-tests --bin probe-bench

agent=(--agent "${SONDE_AGENT:-target/release/sonde-agent}")
exec target/release/probe-bench "${agent[@]}" "$@"
