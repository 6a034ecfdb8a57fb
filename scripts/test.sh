#!/usr/bin/env bash
# The one test command of this repository (README and .ci/run call it):
#
#   scripts/test.sh
#
# It checks formatting, lints, docs, the committed public API listings
# (scripts/public-api.sh), the Prometheus alert rules (promtool, installed
# from Debian's `prometheus` package when missing and possible) and runs
# every test, including the ones that
# need a real Kafka broker (`#[ignore = "needs Kafka: ..."]`, run here with
# --include-ignored, so none of them passes by being skipped).
#
# Kafka: if KAFKA_BOOTSTRAP_SERVERS is set, the tests use that broker. Otherwise
# this script starts a local single-node broker from Maven Central jars
# (scripts/kafka/broker.sh; needs Java 17+, Maven 3 and python3) and stops it
# when it exits, also on failure or ctrl-c. A broker that `scripts/kafka/broker.sh
# start` already runs for this checkout is used and left running.
#
# Chromium: the operators' page is tested in a real headless Chromium
# (examples/ecommerce/tests/ui.rs, `#[ignore = "needs Chromium: ..."]`, run
# here with the others). The browser is Debian's `chromium` package, installed
# here when missing (as root, or with `sudo -n`); CHROME names another binary.
# Without one the run fails, saying so: the test is never skipped.
#
# Every phase runs even if an earlier one failed, so one run reports everything;
# the script exits non-zero if any phase failed.
set -euo pipefail
shopt -s extglob

cd "$(dirname "${BASH_SOURCE[0]}")/.."
BROKER="scripts/kafka/broker.sh"
# One run builds every target once: incremental compilation's caches would
# only take disk (several GB). A developer's own setting wins.
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"

now_us() {
  if [[ -n "${EPOCHREALTIME:-}" ]]; then
    local t="${EPOCHREALTIME/[.,]/}"
    echo "$((10#$t))"
  else
    echo "$(( $(date +%s) * 1000000 ))"
  fi
}

# seconds since $1 (microseconds), with one decimal
since() {
  local d=$(( ($(now_us) - $1) / 100000 ))
  printf '%d.%ds' $((d / 10)) $((d % 10))
}

T_START="$(now_us)"
SUMMARY=()
FAILED=()
STARTED_BROKER=0
TEST_LOG="$(mktemp "${TMPDIR:-/tmp}/saga-test-output.XXXXXX")"

# Run one phase: `phase NAME command...`; records its time and result.
phase() {
  local name="$1" t0 rc=0
  shift
  echo
  echo "==> [$name] $*"
  t0="$(now_us)"
  "$@" || rc=$?
  local took
  took="$(since "$t0")"
  if ((rc == 0)); then
    SUMMARY+=("$(printf '  ok      %8s  %s' "$took" "$name")")
    echo "==> [$name] ok in $took"
  else
    SUMMARY+=("$(printf '  FAILED  %8s  %s (exit %d)' "$took" "$name" "$rc")")
    FAILED+=("$name")
    echo "==> [$name] FAILED (exit $rc) after $took"
  fi
}

# cargo test, with its output also kept to count the results at the end.
cargo_test() {
  cargo test "$@" 2>&1 | tee -a "$TEST_LOG"
}

# Sum the libtest "test result:" lines of all cargo test runs.
test_totals() {
  sed 's/\x1b\[[0-9;]*m//g' "$TEST_LOG" | awk '
    /^test result: / {
      for (i = 1; i <= NF; i++) {
        if ($(i+1) ~ /^passed/) p += $i
        if ($(i+1) ~ /^failed/) f += $i
        if ($(i+1) ~ /^ignored/) g += $i
      }
      n++
    }
    END { printf "%d %d %d %d\n", p, f, g, n }'
}

cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  if ((STARTED_BROKER)); then
    echo
    echo "==> stopping the Kafka broker started for this run"
    "$BROKER" stop || true
  fi
  echo
  echo "==> summary"
  if ((${#SUMMARY[@]})); then
    printf '%s\n' "${SUMMARY[@]}"
  fi
  if [[ -s "$TEST_LOG" ]]; then
    local passed failed ignored runs
    read -r passed failed ignored runs < <(test_totals)
    echo "  test binaries run: $runs, ignored (not run): $ignored"
    echo "tests: $passed passed, $failed failed"
  fi
  rm -f "$TEST_LOG"
  # Disk use, to tell a full disk (a linker killed by SIGBUS) from a real failure.
  echo "disk: ${CARGO_TARGET_DIR:-target}/ $(du -sh "${CARGO_TARGET_DIR:-target}" 2>/dev/null | cut -f1), $(df -h --output=avail . 2>/dev/null | tail -n 1 | tr -d ' ') free"
  echo "total: $(since "$T_START")"
  if ((${#FAILED[@]})); then
    echo "scripts/test.sh: FAILED: ${FAILED[*]}"
    ((rc != 0)) || rc=1
  elif ((rc != 0)); then
    echo "scripts/test.sh: FAILED (exit $rc)"
  else
    echo "scripts/test.sh: all checks passed"
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'echo "scripts/test.sh: interrupted" >&2; exit 130' INT
trap 'echo "scripts/test.sh: terminated" >&2; exit 143' TERM

echo "==> tools"
version() {
  local out
  if out="$("$@" 2>&1)"; then
    out="${out%%$'\n'*}"
    echo "  ${out//$'\e'\[*([0-9;])m/}"
  else
    echo "  $*: not available"
  fi
}
version rustc --version
version cargo --version
version cargo fmt --version
version cargo clippy --version
version python3 --version
echo "  disk: $(df -h --output=avail . 2>/dev/null | tail -n 1 | tr -d ' ') free (a full build and test run takes ~4 GB)"
if [[ -z "${KAFKA_BOOTSTRAP_SERVERS:-}" ]]; then
  version java -version
  version mvn -B --version
fi

export RUST_BACKTRACE="${RUST_BACKTRACE:-1}"

# The browser of the UI test: CHROME if set, else Debian's `chromium`,
# installed with apt-get when missing.
chromium_needed() {
  echo "scripts/test.sh: the operators' page test needs Chromium: install Debian's" \
    "package \`chromium\` (apt-get install -y --no-install-recommends chromium, as" \
    "root), or set CHROME to a Chromium binary. $*" >&2
  return 1
}
ensure_chromium() {
  local bin
  if [[ -n "${CHROME:-}" ]]; then
    bin="$(command -v "$CHROME")" || chromium_needed "CHROME=$CHROME is not a program."
  else
    bin="$(command -v chromium || command -v chromium-browser)" || {
      local sudo=()
      if ((EUID != 0)); then
        if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
          sudo=(sudo -n)
        else
          chromium_needed "It is missing, and installing it needs root (or sudo -n)."
          return 1
        fi
      fi
      command -v apt-get >/dev/null 2>&1 \
        || { chromium_needed "It is missing, and there is no apt-get here."; return 1; }
      echo "  chromium is missing: installing Debian's package"
      "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -qq \
        && "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive \
          apt-get install -y -qq --no-install-recommends chromium \
        || { chromium_needed "apt-get could not install it."; return 1; }
      bin="$(command -v chromium)" || { chromium_needed "apt-get installed no chromium."; return 1; }
    }
  fi
  [[ -n "${bin:-}" ]] || return 1
  # Debian's wrapper script prints a shell warning on stderr; the version is on stdout.
  echo "  $("$bin" --version 2>/dev/null | head -n 1) ($bin)"
}

if [[ -n "${KAFKA_BOOTSTRAP_SERVERS:-}" ]]; then
  echo
  echo "==> using the Kafka broker at KAFKA_BOOTSTRAP_SERVERS=$KAFKA_BOOTSTRAP_SERVERS"
elif "$BROKER" status >/dev/null 2>&1; then
  KAFKA_BOOTSTRAP_SERVERS="$("$BROKER" address)"
  echo
  echo "==> using the Kafka broker already started by $BROKER at $KAFKA_BOOTSTRAP_SERVERS (left running)"
else
  # Set before starting, so that an interrupted start is cleaned up too.
  STARTED_BROKER=1
  phase kafka-broker "$BROKER" start
  if ((${#FAILED[@]})); then
    echo "scripts/test.sh: the Kafka broker did not start; the tests that need it cannot run" >&2
    exit 1
  fi
  KAFKA_BOOTSTRAP_SERVERS="$("$BROKER" address)"
fi
export KAFKA_BOOTSTRAP_SERVERS

phase chromium ensure_chromium
phase fmt cargo fmt --all -- --check
phase clippy cargo clippy --workspace --all-targets --all-features -- -D warnings
phase doc env RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --all-features
# The committed public API listings (saga-core/public-api.txt,
# saga-kafka/public-api.txt) match the code; scripts/public-api.sh updates them.
phase public-api scripts/public-api.sh --check
# The alert rules (deploy/prometheus/rules.yml) and their unit tests
# (rules_test.yml), by promtool.
promtool_rules() {
  promtool check rules deploy/prometheus/rules.yml &&
    promtool test rules deploy/prometheus/rules_test.yml
}
# promtool comes with Debian's `prometheus` package: installed when missing,
# if this runs as root or may use sudo without a password.
ensure_promtool() {
  command -v promtool >/dev/null 2>&1 && return 0
  command -v apt-get >/dev/null 2>&1 || return 1
  local as_root=()
  if ((EUID != 0)); then
    sudo -n true 2>/dev/null || return 1
    as_root=(sudo -n)
  fi
  local install=("${as_root[@]}" env DEBIAN_FRONTEND=noninteractive
    apt-get install -y -qq --no-install-recommends prometheus)
  echo "==> installing promtool (Debian package prometheus)"
  "${install[@]}" >/dev/null ||
    { "${as_root[@]}" apt-get update -qq && "${install[@]}" >/dev/null; } ||
    return 1
  command -v promtool >/dev/null 2>&1
}
echo
if ensure_promtool; then
  version promtool --version
  phase promtool promtool_rules
else
  echo "==> NOTE: promtool is not available and could not be installed (needs apt-get"
  echo "    as root or passwordless sudo): the alert rules are not checked by promtool."
  SUMMARY+=("$(printf '  skipped %8s  %s' "-" "promtool (not available)")")
fi
# Doc tests first, so that the output ends with the main test run.
phase doctest cargo_test --workspace --doc --all-features
phase test cargo_test --workspace --all-targets --all-features --no-fail-fast -- --include-ignored
