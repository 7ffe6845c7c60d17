#!/usr/bin/env bash
# Runs every test of sonde: formatting, lints, the build, and `cargo test` for the whole
# workspace, including the end-to-end tests against real Prometheus, nginx and dnsmasq;
# then every fuzz target briefly (scripts/fuzz.sh --brief; needs the nightly toolchain).
# Works on a fresh Debian machine: installs the Debian packages the tests need when they
# are missing (as root, or through sudo).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib/debian-packages.sh

# --- phase timer ---------------------------------------------------------------------------
# `phase NAME` ends the running phase (printing its wall time) and starts NAME; at the exit
# a table of every phase's time, so that each run shows where the time went.
phase_names=()
phase_seconds=()
phase_name=""
phase_started=$SECONDS
phase() {
  if [[ -n "$phase_name" ]]; then
    local took=$((SECONDS - phase_started))
    phase_names+=("$phase_name")
    phase_seconds+=("$took")
    printf '==> %s: %dm%02ds\n' "$phase_name" $((took / 60)) $((took % 60))
  fi
  phase_name="$1"
  phase_started=$SECONDS
}
cleanup=()
on_exit() {
  local status=$?
  phase ""
  echo
  echo "==> time per phase"
  local i
  for i in "${!phase_names[@]}"; do
    printf '%6dm%02ds  %s\n' $((phase_seconds[i] / 60)) $((phase_seconds[i] % 60)) "${phase_names[i]}"
  done
  printf '%6dm%02ds  total\n' $((SECONDS / 60)) $((SECONDS % 60))
  if ((${#cleanup[@]})); then rm -rf "${cleanup[@]}"; fi
  exit "$status"
}
trap on_exit EXIT

# --- Debian packages the tests run against -------------------------------------------
# program -> package
declare -A packages=(
  [prometheus]=prometheus   # prometheus and promtool
  [promtool]=prometheus
  [nginx]=nginx-light       # the HTTP target
  [dnsmasq]=dnsmasq-base    # the DNS target
  [victoria-metrics]=victoria-metrics   # a second remote write receiver
  [python3]=python3         # runs the remote write 2.0 interop decoder (tests/rw2)
  [prometheus-blackbox-exporter]=prometheus-blackbox-exporter  # the side-by-side peer
  [openssl]=openssl         # certificates of the side-by-side test
  [chromium]=chromium       # renders the status pages (tests/tests/status_pages.rs)
  [ip]=iproute2             # network namespaces and veth pairs (tests/tests/failure_traces.rs, blackbox_parity_icmp_grpc.rs)
  [setpriv]=util-linux      # runs an agent as an unprivileged user (tests/tests/blackbox_parity_icmp_grpc.rs)
  [sysctl]=procps           # per-namespace settings (the same two tests)
  [curl]=curl               # HTTP from inside a namespace (failure_traces.rs), raw /metrics (hostile_agents.rs)
  [named]=bind9             # the authoritative server of the signed zones (tests/tests/dnssec_probe.rs)
  [dnssec-signzone]=bind9-utils   # signs them (dnssec-keygen, dnssec-dsfromkey too)
  [unbound]=unbound         # the validating resolver in front of them
  [gcc]=gcc                 # compiles agent-bench's floor loop in its unit test (tests/src/bin/agent_bench/floor.rs)
)
# file -> package, for what is not a program: nginx's stream module (the DNS-over-TLS
# front) and mail module (SMTP with STARTTLS) of the side-by-side test
declare -A package_files=(
  [/usr/lib/nginx/modules/ngx_stream_module.so]=libnginx-mod-stream
  [/usr/lib/nginx/modules/ngx_mail_module.so]=libnginx-mod-mail
)
phase "Debian packages"
missing=()
for program in "${!packages[@]}"; do
  if ! PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin" command -v "$program" >/dev/null 2>&1; then
    package="${packages[$program]}"
    [[ " ${missing[*]-} " == *" $package "* ]] || missing+=("$package")
  fi
done
for file in "${!package_files[@]}"; do
  if [[ ! -e "$file" ]]; then
    package="${package_files[$file]}"
    [[ " ${missing[*]-} " == *" $package "* ]] || missing+=("$package")
  fi
done
if ((${#missing[@]})); then
  install_debian_packages "${missing[@]}"
fi

# --- Python packages of the remote write 2.0 interop decoder (tests/rw2/decode.py) -------
# The spec's .proto compiled by grpcio-tools' protoc, parsed by `protobuf`, snappy by
# `cramjam`: an implementation independent of sonde's encoder. Installed from PyPI only
# when missing.
phase "Python packages"
py_packages=(grpcio-tools protobuf cramjam)
if ! python3 -c 'import grpc_tools, google.protobuf, cramjam' >/dev/null 2>&1; then
  echo "==> installing Python packages: ${py_packages[*]}"
  if ! python3 -m pip --version >/dev/null 2>&1; then
    sudo=()
    if [[ "$(id -u)" != 0 ]]; then sudo=(sudo); fi
    "${sudo[@]}" apt-get update -q
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive \
      apt-get install -y -q --no-install-recommends python3-pip
  fi
  # Debian's own Python refuses pip installs outside a venv (PEP 668) unless told.
  python3 -m pip install --quiet "${py_packages[@]}" 2>/dev/null \
    || python3 -m pip install --quiet --break-system-packages "${py_packages[@]}" \
    || { echo "error: could not install the Python packages ${py_packages[*]}" >&2; exit 1; }
fi

# --- kubernetes-validate (tests/tests/kubernetes.rs), from PyPI when missing ---------------
# Validates deploy/kubernetes/ against a current Kubernetes version's schemas.
if ! python3 -c 'import kubernetes_validate' >/dev/null 2>&1; then
  echo "==> installing the Python package kubernetes-validate"
  python3 -m pip install --quiet 'kubernetes-validate>=1.37' 2>/dev/null \
    || python3 -m pip install --quiet --break-system-packages 'kubernetes-validate>=1.37' \
    || { echo "error: could not install the Python package kubernetes-validate" >&2; exit 1; }
fi

# --- cargo-deb (tests/tests/packages.rs builds the .debs with it), when missing ------------
phase "cargo install cargo-deb"
# The version is pinned: the test packages the suite's own debug build (`--profile dev`,
# no release build of its own), which cargo-deb 3.8 allows with a warning and says a later
# version may refuse.
cargo_deb_version=3.8.0
if [[ "$(cargo deb --version 2>/dev/null)" != *" $cargo_deb_version"* ]]; then
  echo "==> cargo install cargo-deb $cargo_deb_version"
  cargo install --quiet --locked --force cargo-deb --version "$cargo_deb_version"
fi

# --- Rust --------------------------------------------------------------------------------
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"

phase "cargo fmt"
echo "==> cargo fmt --all -- --check (and the fuzz crate)"
cargo fmt --all -- --check
(cd fuzz && cargo fmt -- --check)

phase "cargo clippy"
echo "==> cargo clippy --workspace --all-targets -- -D warnings"
cargo clippy --workspace --all-targets -- -D warnings

phase "cargo doc"
echo "==> cargo doc --workspace --no-deps (warnings are errors)"
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --quiet

phase "cargo build"
echo "==> cargo build --workspace --bins"
cargo build --workspace --bins

phase "cargo test"
echo "==> cargo test --workspace"
log="$(mktemp)"
cleanup+=("$log")
status=0
# --no-fail-fast: run every test binary, so one failure does not hide the others.
cargo test --workspace --no-fail-fast 2>&1 | tee "$log" || status=$?

echo
echo "==> summary"
grep -E '^test result:|^     Running |^   Doc-tests ' "$log" || true
awk '
  /^test result:/ {
    for (i = 1; i <= NF; i++) {
      if ($(i + 1) ~ /^passed;?$/) passed += $i
      if ($(i + 1) ~ /^failed;?$/) failed += $i
      if ($(i + 1) ~ /^ignored;?$/) ignored += $i
    }
  }
  END { printf "total: %d passed, %d failed, %d skipped\n", passed, failed, ignored }
' "$log"
# libtest prints each test binary's wall time on its result line: the slowest first.
echo
echo "==> the slowest test binaries"
awk '
  /^     Running / {
    name = $2
    if (name == "unittests" && match($0, /deps\/[^)]*-/)) {
      name = substr($0, RSTART + 5, RLENGTH - 6) " (" $3 ")"
    }
  }
  /^   Doc-tests / { name = "doc-tests " $2 }
  /^test result:/ && match($0, /finished in [0-9.]+s/) {
    printf "%8.1fs  %s\n", substr($0, RSTART + 12, RLENGTH - 13), name
  }
' "$log" | sort -rn | head -n 15
if ((status != 0)); then
  echo "cargo test failed (exit $status)" >&2
fi

# --- fuzz targets, briefly ------------------------------------------------------------------
# Each cargo-fuzz target replays its committed corpus (fuzz/corpus/) and fuzzes for ~10
# CPU-seconds, so that a regression in a decoder of untrusted input is caught. Costs one
# nightly release build of the fuzz crate (~16 minutes on 2 cores in CI) and ~1 minute of fuzzing.
phase "fuzz targets (build and brief run)"
echo
echo "==> scripts/fuzz.sh --brief --jobs 2"
fuzz_status=0
scripts/fuzz.sh --brief --jobs 2 || fuzz_status=$?
if ((fuzz_status != 0)); then
  echo "fuzzing failed (exit $fuzz_status): see fuzz/artifacts/ and fuzz/README.md" >&2
  if ((status == 0)); then status=$fuzz_status; fi
fi
exit "$status"
