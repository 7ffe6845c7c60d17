#!/usr/bin/env bash
# What one /probe costs the real sonde-agent, beside the physical floor (a C loop of
# connect()+close() to nginx, plus nginx's CPU per keep-alive request) and the real
# blackbox_exporter, all against the same nginx in one run (docs/benchmarks.md,
# "`/probe` against the floor and blackbox_exporter").
#
#   scripts/probe-bench.sh                       3 rounds of 5 s phases, ~1.5 min
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
  sudo=()
  if [[ "$(id -u)" != 0 ]]; then sudo=(sudo); fi
  echo "==> installing Debian packages: ${missing[*]}"
  # Keep nginx's and blackbox_exporter's own services from starting on install: the
  # bench starts its own instances on free loopback ports.
  policy_rc_d=/usr/sbin/policy-rc.d
  added_policy=false
  if [[ ! -e "$policy_rc_d" ]]; then
    printf '#!/bin/sh\nexit 101\n' | "${sudo[@]}" tee "$policy_rc_d" >/dev/null
    "${sudo[@]}" chmod 755 "$policy_rc_d"
    added_policy=true
  fi
  status=0
  "${sudo[@]}" apt-get update -q || status=$?
  if ((status == 0)); then
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive \
      apt-get install -y -q --no-install-recommends "${missing[@]}" || status=$?
  fi
  if $added_policy; then "${sudo[@]}" rm -f "$policy_rc_d"; fi
  if ((status != 0)); then
    echo "error: could not install ${missing[*]} (apt-get exited $status)" >&2
    exit "$status"
  fi
fi

echo "==> cargo build --release -p sonde-agent -p sonde-tests --bin sonde-agent --bin probe-bench"
cargo build --release -p sonde-agent -p sonde-tests --bin sonde-agent --bin probe-bench

agent=(--agent "${SONDE_AGENT:-target/release/sonde-agent}")
exec target/release/probe-bench "${agent[@]}" "$@"
