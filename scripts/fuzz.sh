#!/usr/bin/env bash
# Runs sonde's cargo-fuzz targets (fuzz/fuzz_targets/), each for a budget of CPU time
# (user + system time of the fuzzing process, not wall time), niced so that builds and
# tests on the same machine go first, with an RSS limit; prints a table of executions,
# CPU seconds and result per target, and exits non-zero when any target found a crash,
# a hang (timeout) or an out-of-memory.
#
#   scripts/fuzz.sh                      every target, 600 CPU-seconds each
#   scripts/fuzz.sh --seconds 60 x509    one target, one CPU-minute
#   scripts/fuzz.sh --brief              every target ~10 CPU-seconds (CI)
#   scripts/fuzz.sh --jobs 2             two targets at a time
#   scripts/fuzz.sh --cmin               merge what runs found into fuzz/corpus/ and minimise
#   scripts/fuzz.sh --no-build ...       reuse the binaries of the last build
#
# Inputs: fuzz/corpus/<target>/ (committed, read only) plus what earlier runs found in
# fuzz/target/corpus/<target>/ (kept between runs, not committed). Findings land in
# fuzz/artifacts/<target>/; reproduce one with
#   cargo +nightly fuzz run <target> fuzz/artifacts/<target>/<file>
# Needs the nightly toolchain (libFuzzer's instrumentation); installs cargo-fuzz when
# missing.
set -euo pipefail
cd "$(dirname "$0")/.."

seconds=600
brief=false
jobs=1
cmin=false
build=true
rss_limit_mb=2048
timeout=10
targets=()

usage() {
  sed -n '2,/^set -euo/p' "$0" | sed -n 's/^# \{0,1\}//p'
}

while (($#)); do
  case "$1" in
    --seconds) seconds="$2"; shift 2 ;;
    --seconds=*) seconds="${1#*=}"; shift ;;
    --brief) brief=true; seconds=10; shift ;;
    --jobs) jobs="$2"; shift 2 ;;
    --jobs=*) jobs="${1#*=}"; shift ;;
    --cmin) cmin=true; shift ;;
    --no-build) build=false; shift ;;
    -h | --help) usage; exit 0 ;;
    -*) echo "error: unknown option $1 (see --help)" >&2; exit 2 ;;
    *) targets+=("$1"); shift ;;
  esac
done
if ! [[ "$seconds" =~ ^[0-9]+$ ]] || ((seconds < 1)); then
  echo "error: --seconds wants a whole number of CPU seconds, not $seconds" >&2
  exit 2
fi
if ! [[ "$jobs" =~ ^[1-9][0-9]*$ ]]; then
  echo "error: --jobs wants a positive number, not $jobs" >&2
  exit 2
fi

# --- toolchain ---------------------------------------------------------------------------
if ! cargo +nightly --version >/dev/null 2>&1; then
  cat >&2 <<'EOF'
error: the Rust nightly toolchain is missing; cargo-fuzz needs it for libFuzzer's
instrumentation. Install it with:
    rustup toolchain install nightly --profile minimal
EOF
  exit 2
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "==> installing cargo-fuzz"
  nice -n 19 cargo install cargo-fuzz --locked
fi

# The bundled SQLite (linked through sonde-aggregator, never run by the targets) defines
# two function-local statics of the same name and size, which AddressSanitizer's strict
# ODR check reports at start-up; level 1 still reports globals whose sizes differ.
export ASAN_OPTIONS="${ASAN_OPTIONS:+$ASAN_OPTIONS:}detect_odr_violation=1"

all_targets=()
while IFS= read -r t; do all_targets+=("$t"); done < <(cd fuzz && cargo +nightly fuzz list)
if ((${#targets[@]} == 0)); then
  targets=("${all_targets[@]}")
fi
for t in "${targets[@]}"; do
  if [[ " ${all_targets[*]} " != *" $t "* ]]; then
    echo "error: no fuzz target $t; there are: ${all_targets[*]}" >&2
    exit 2
  fi
done

# --- build (once, every target) -----------------------------------------------------------
build_started=$SECONDS
echo "==> cargo +nightly fuzz build (release, AddressSanitizer, debug assertions)"
# `cargo fuzz build` builds one target or all of them: name them one by one when a
# subset was asked for (each after the first is only a link step).
if ! $build; then
  echo "    (skipped: --no-build)"
elif ((${#targets[@]} != ${#all_targets[@]})); then
  for t in "${targets[@]}"; do
    (cd fuzz && nice -n 19 cargo +nightly fuzz build "$t")
  done
else
  (cd fuzz && nice -n 19 cargo +nightly fuzz build)
fi
if $build; then
  echo "    built in $((SECONDS - build_started)) s"
fi
triple="$(rustc +nightly -vV | sed -n 's/^host: //p')"
bin_dir="fuzz/target/$triple/release"

# --- minimise -------------------------------------------------------------------------------
if $cmin; then
  for t in "${targets[@]}"; do
    mkdir -p "fuzz/corpus/$t"
    for extra in "fuzz/target/corpus/$t" "fuzz/seeds/$t"; do
      [[ -d "$extra" ]] && find "$extra" -type f -exec cp -n {} "fuzz/corpus/$t/" \;
    done
    before=$(find "fuzz/corpus/$t" -type f | wc -l)
    # Edges only (-use_counters=0): with hit counts every loop length counts as new, and
    # the committed corpus would keep thousands of inputs per target that the replay in
    # CI pays for and a clone carries.
    (cd fuzz && nice -n 19 cargo +nightly fuzz cmin "$t" "corpus/$t" -- \
      -use_counters=0 -rss_limit_mb="$rss_limit_mb" -timeout="$timeout") >/dev/null 2>&1
    after=$(find "fuzz/corpus/$t" -type f | wc -l)
    echo "$t: $before inputs -> $after ($(du -sh "fuzz/corpus/$t" | cut -f1))"
  done
  exit 0
fi

# --- run ---------------------------------------------------------------------------------------
clk_tck="$(getconf CLK_TCK)"
results="$(mktemp -d)"
trap 'rm -rf "$results"' EXIT

# CPU seconds (user + system, children included) of process $1, or empty once it is gone.
cpu_of() {
  local stat
  stat="$(cat "/proc/$1/stat" 2>/dev/null)" || return 0
  # Fields after the ")" that ends the command name: utime is 14, stime 15, cutime 16,
  # cstime 17 of the whole line, so 12..15 of what follows it.
  awk -v tck="$clk_tck" '{ printf "%.1f", ($12 + $13 + $14 + $15) / tck }' <<<"${stat##*) }"
}

run_one() {
  local t="$1"
  local work="fuzz/target/corpus/$t" artifacts="fuzz/artifacts/$t"
  local log="$results/$t.log"
  mkdir -p "$work" "$artifacts" "fuzz/corpus/$t"
  if $brief; then
    # CI: new inputs go to a scratch directory; the committed corpus is replayed first.
    work="$results/$t.corpus"
    mkdir -p "$work"
  fi
  # Wall-time backstop, generous: niced fuzzers get little CPU on a busy machine.
  local max_wall=$((seconds * 20 + 120))
  nice -n 19 "$bin_dir/$t" "$work" "fuzz/corpus/$t" \
    -rss_limit_mb="$rss_limit_mb" -timeout="$timeout" -max_total_time="$max_wall" \
    -artifact_prefix="$artifacts/" -print_final_stats=1 >"$log" 2>&1 &
  local pid=$! cpu=0
  while kill -0 "$pid" 2>/dev/null; do
    local now
    now="$(cpu_of "$pid")"
    [[ -n "$now" ]] && cpu="$now"
    if awk -v c="$cpu" -v s="$seconds" 'BEGIN { exit !(c >= s) }'; then
      kill -USR1 "$pid" 2>/dev/null || true # libFuzzer's graceful stop: final stats, exit 0
      break
    fi
    sleep 1
  done
  local status=0
  wait "$pid" || status=$?
  local execs result
  execs="$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n 1)"
  if grep -q 'ERROR: libFuzzer: out-of-memory' "$log"; then
    result=oom
  elif grep -q 'ERROR: libFuzzer: timeout' "$log"; then
    result=timeout
  elif grep -qE 'ERROR: libFuzzer: deadly signal|ERROR: AddressSanitizer|panicked at' "$log"; then
    result=crash
  elif grep -q 'ERROR: libFuzzer: leak' "$log"; then
    result=leak
  elif ((status != 0)); then
    result="error(exit $status)"
  else
    result=ok
  fi
  local artifact=""
  if [[ "$result" != ok ]]; then
    artifact="$(sed -n 's/.*Test unit written to \(.*\)$/\1/p' "$log" | tail -n 1)"
    cp "$log" "$artifacts/last-failure.log" 2>/dev/null || true
  fi
  printf '%s\t%s\t%s\t%s\t%s\n' "$t" "${execs:-?}" "$cpu" "$result" "$artifact" >"$results/$t.row"
}

echo "==> fuzzing ${#targets[@]} target(s), $seconds CPU-seconds each, $jobs at a time," \
  "-rss_limit_mb=$rss_limit_mb -timeout=$timeout"
fuzz_started=$SECONDS
running=0
for t in "${targets[@]}"; do
  run_one "$t" &
  running=$((running + 1))
  if ((running >= jobs)); then
    wait -n || true
    running=$((running - 1))
  fi
done
wait || true

echo
echo "==> fuzzed in $((SECONDS - fuzz_started)) s"
printf '%-24s %14s %10s  %s\n' target executions cpu_s result
failed=0
for t in "${targets[@]}"; do
  if [[ ! -f "$results/$t.row" ]]; then
    printf '%-24s %14s %10s  %s\n' "$t" - - "did not run"
    failed=1
    continue
  fi
  IFS=$'\t' read -r name execs cpu result artifact <"$results/$t.row"
  printf '%-24s %14s %10s  %s\n' "$name" "$execs" "$cpu" "$result${artifact:+ ($artifact)}"
  if [[ "$result" != ok ]]; then
    failed=1
    echo "---- $t: the end of its log (all of it in fuzz/artifacts/$t/last-failure.log)" >&2
    tail -n 40 "$results/$t.log" >&2
  fi
done
exit "$failed"
