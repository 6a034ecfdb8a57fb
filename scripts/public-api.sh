#!/usr/bin/env bash
# The public API of the library crates, kept in the repository so that a change
# to it shows up in code review:
#
#   scripts/public-api.sh           # regenerate saga-core/public-api.txt and
#                                   # saga-kafka/public-api.txt (commit them)
#   scripts/public-api.sh --check   # fail, with the diff, if they are out of date
#
# scripts/test.sh runs the check (phase public-api). When it fails and the API
# change is intended, run scripts/public-api.sh and commit the listings with the
# change; when it is not, the diff shows what to put back.
#
# How: rustdoc's JSON output (an unstable rustdoc flag, allowed on the stable
# toolchain by RUSTC_BOOTSTRAP=1) of each crate with --all-features, turned into
# one line per item by scripts/public_api.py (needs python3). The JSON is built
# in its own target dir, ${CARGO_TARGET_DIR:-target}/public-api, so that its
# different RUSTDOCFLAGS never invalidate the normal build: the first run checks
# the dependencies there (a few minutes), later runs only re-document the two
# crates (seconds). A toolchain whose JSON format the script does not know makes
# it fail with the version it expects, rather than list something wrong.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

# The library crates (package names); each has its listing at <package>/public-api.txt.
CRATES=(saga-core saga-kafka)
LISTING="public-api.txt"
TARGET_DIR="${CARGO_TARGET_DIR:-target}/public-api"

usage() {
  echo "usage: scripts/public-api.sh [--check]" >&2
  exit 2
}

CHECK=0
case "${1:-}" in
  "") ;;
  --check) CHECK=1 ;;
  -h | --help) sed -n '2,20s/^# \{0,1\}//p' "${BASH_SOURCE[0]}"; exit 0 ;;
  *) usage ;;
esac
(($# <= 1)) || usage

WORK="$(mktemp -d "${TMPDIR:-/tmp}/saga-public-api.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT

# Build the JSON; cargo's output is shown only if it fails (the doc phase of
# scripts/test.sh reports rustdoc's warnings).
packages=()
for crate in "${CRATES[@]}"; do
  packages+=(-p "$crate")
done
if ! RUSTC_BOOTSTRAP=1 RUSTDOCFLAGS="-Z unstable-options --output-format json" \
  CARGO_TARGET_DIR="$TARGET_DIR" \
  cargo doc "${packages[@]}" --no-deps --all-features >"$WORK/cargo.log" 2>&1; then
  cat "$WORK/cargo.log" >&2
  echo "scripts/public-api.sh: cargo doc (rustdoc JSON) failed" >&2
  exit 1
fi

# One listing per crate, into $WORK/<package>/public-api.txt. The other crates'
# JSON is passed along, so that saga-kafka's listing writes saga-core's items by
# their public path (saga_core::SagaHandle, not saga_core::runtime::SagaHandle).
for crate in "${CRATES[@]}"; do
  externs=()
  for other in "${CRATES[@]}"; do
    [[ "$other" == "$crate" ]] || externs+=(--extern "$TARGET_DIR/doc/${other//-/_}.json")
  done
  mkdir -p "$WORK/$crate"
  python3 scripts/public_api.py "$TARGET_DIR/doc/${crate//-/_}.json" "${externs[@]}" \
    >"$WORK/$crate/$LISTING"
done

if ((CHECK)); then
  changed=0
  for crate in "${CRATES[@]}"; do
    committed="$crate/$LISTING"
    [[ -f "$committed" ]] || committed=/dev/null
    if ! diff -u --label "a/$crate/$LISTING (committed)" --label "b/$crate/$LISTING (the code now)" \
      "$committed" "$WORK/$crate/$LISTING"; then
      changed=1
    fi
  done
  if ((changed)); then
    echo "scripts/public-api.sh: the public API differs from the committed listing (diff above)." >&2
    echo "If the change is intended, run scripts/public-api.sh and commit the result." >&2
    exit 1
  fi
  for crate in "${CRATES[@]}"; do
    echo "$crate/$LISTING: up to date ($(wc -l <"$crate/$LISTING") lines)"
  done
else
  for crate in "${CRATES[@]}"; do
    if cmp -s "$WORK/$crate/$LISTING" "$crate/$LISTING"; then
      echo "$crate/$LISTING: unchanged ($(wc -l <"$crate/$LISTING") lines)"
    else
      cp "$WORK/$crate/$LISTING" "$crate/$LISTING"
      echo "$crate/$LISTING: written ($(wc -l <"$crate/$LISTING") lines)"
    fi
  done
fi
