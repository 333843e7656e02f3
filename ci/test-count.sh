#!/usr/bin/env bash
# Workspace test count, checked against ci/test-count.baseline (issue #12: "the
# workspace test count does not drop" while tests move between crates).
#
#   ci/test-count.sh            print the count, compare with the baseline: exit 1 if
#                               lower (the difference is printed either way)
#   ci/test-count.sh --update   write the current count to the baseline (do this in
#                               the commit that adds tests, or deliberately drops some,
#                               and say why in its message)
#   ci/test-count.sh --help
#
# The count is the number of lines ending in ": test" of
# `cargo test --workspace -- --list`: unit, integration and doc tests of every
# workspace member, #[ignore]d ones included, benchmarks not. The loom models
# (crates/blockmap/tests/loom.rs) are `#![cfg(loom)]`, so they list nothing unless
# RUSTFLAGS has `--cfg loom`; this script removes any such flag to keep them out.
#
# Not run by ci/test.sh: it builds every test target (a debug build ci/test.sh's own
# `cargo test --workspace` repeats with other flags). Run it before a merge of #12,
# once the branch builds; after ci/test.sh the build is mostly shared and it takes
# seconds.
set -euo pipefail
cd "$(dirname "$0")/.."

BASELINE=ci/test-count.baseline
UPDATE=0
usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }
while [ $# -gt 0 ]; do
    case "$1" in
        --update) UPDATE=1 ;;
        -h|--help) usage; exit 0 ;;
        *) echo "test-count.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done

export CARGO_TERM_COLOR=never
RUSTFLAGS=$(printf '%s' "${RUSTFLAGS:-}" | sed 's/--cfg[= ]*loom//g')
export RUSTFLAGS
[ -n "$RUSTFLAGS" ] || unset RUSTFLAGS

list=$(mktemp)
err=$(mktemp)
trap 'rm -f "$list" "$err"' EXIT
if ! cargo test --workspace --quiet -- --list > "$list" 2> "$err"; then
    cat "$err" >&2
    echo "test-count.sh: \`cargo test --workspace -- --list\` failed (see above)" >&2
    exit 2
fi
count=$(grep -c ': test$' "$list" || true)
echo "workspace tests: $count"

if [ "$UPDATE" = 1 ]; then
    {
        echo "# workspace test count (ci/test-count.sh --update) at $(git rev-parse --short HEAD)"
        echo "$count"
    } > "$BASELINE"
    echo "wrote $BASELINE"
    exit 0
fi
[ -f "$BASELINE" ] || { echo "test-count.sh: $BASELINE missing (--update creates it)" >&2; exit 2; }
base=$(grep -v '^#' "$BASELINE" | head -n1 | tr -d '[:space:]')
case "$base" in
    ''|*[!0-9]*) echo "test-count.sh: $BASELINE does not hold a number" >&2; exit 2 ;;
esac
diff=$((count - base))
printf 'baseline: %s, difference: %+d\n' "$base" "$diff"
if [ "$diff" -lt 0 ]; then
    echo "test-count.sh: FAILED: $(( -diff )) test(s) fewer than $BASELINE records;" \
         "find what was lost (or, if deliberate, run --update and say why in the commit)" >&2
    exit 1
fi
echo "ok"
