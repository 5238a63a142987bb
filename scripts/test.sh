#!/usr/bin/env bash
# The one command that runs pullcache's whole test suite:
#   1. installs the Debian packages the end-to-end tests need (only if missing),
#   2. builds everything (debug),
#   3. runs all unit and integration tests (cargo test --all-targets),
#   4. runs the end-to-end tests (scripts/e2e.sh) against the debug binary.
# Exits non-zero if anything fails (a cargo test failure still lets the e2e
# tests run, so one CI run shows both); the last line is the e2e summary
# ("e2e: N passed, M failed").
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=scripts/lib/common.sh
source "$HERE/lib/common.sh"
cd "$PC_REPO_ROOT"

pc_section "packages"
pc_ensure_packages
echo "present: ${PC_APT_PACKAGES[*]}"

pc_section "cargo build --all-targets"
cargo build --all-targets

pc_section "cargo test --all-targets --no-fail-fast"
# A failing unit/integration test does not stop the run: the e2e results are
# still worth having.  The script exits non-zero at the end.
test_rc=0
cargo test --all-targets --no-fail-fast || test_rc=$?

pc_section "end-to-end (scripts/e2e.sh)"
# e2e.sh needs no rebuild: the debug binary was just built above.
e2e_out=$(mktemp "${TMPDIR:-/tmp}/pullcache-e2e-out.XXXXXX")
trap 'rm -f "$e2e_out"' EXIT
rc=0
E2E_NO_BUILD=1 "$HERE/e2e.sh" 2>&1 | tee "$e2e_out" || rc=$?

summary=$(grep -E '^e2e: [0-9]+ passed, [0-9]+ failed' "$e2e_out" | tail -n 1 || true)
echo
pc_section "summary"
echo "cargo build: ok"
if [ "$test_rc" -eq 0 ]; then
    echo "cargo test:  ok"
else
    echo "cargo test:  FAILED (exit $test_rc)"
fi
if [ "$rc" -ne 0 ]; then
    echo "e2e:         FAILED (exit $rc)"
fi
# Last line: the plain e2e summary (or a failing one if e2e died early).
echo "${summary:-e2e: 0 passed, 1 failed}"
[ "$rc" -ne 0 ] || rc=$test_rc
exit "$rc"
