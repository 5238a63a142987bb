#!/usr/bin/env bash
# The one command that runs pullcache's whole test suite:
#   1. installs the Debian packages the end-to-end tests need (only if missing),
#   2. builds everything (debug),
#   3. runs all unit and integration tests (cargo test --all-targets),
#   4. runs the end-to-end tests against the debug binary: scripts/e2e.sh (skopeo, a real
#      registry, the dashboard in chromium) and scripts/e2e-dockerd.sh (real dockerd, ctr).
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
dockerd_out=$(mktemp "${TMPDIR:-/tmp}/pullcache-dockerd-out.XXXXXX")
trap 'rm -f "$e2e_out" "$dockerd_out"' EXIT
rc=0
E2E_NO_BUILD=1 "$HERE/e2e.sh" 2>&1 | tee "$e2e_out" || rc=$?

pc_section "end-to-end with real dockerd and containerd (scripts/e2e-dockerd.sh)"
dockerd_rc=0
E2E_NO_BUILD=1 "$HERE/e2e-dockerd.sh" 2>&1 | tee "$dockerd_out" || dockerd_rc=$?

# "N passed, M failed" of each script, summed for the closing line.
counts() { sed -nE "s/^$1: ([0-9]+) passed, ([0-9]+) failed.*/\\1 \\2/p" "$2" | tail -n 1; }
read -r e2e_pass e2e_fail <<<"$(counts e2e "$e2e_out")" || true
read -r dk_pass dk_fail <<<"$(counts dockerd-e2e "$dockerd_out")" || true
if grep -q '^dockerd-e2e: SKIP' "$dockerd_out"; then
    dk_pass=0 dk_fail=0 # the kernel cannot run dockerd here; the script said why
fi
echo
pc_section "summary"
echo "cargo build: ok"
if [ "$test_rc" -eq 0 ]; then
    echo "cargo test:  ok"
else
    echo "cargo test:  FAILED (exit $test_rc)"
fi
[ "$rc" -eq 0 ] || echo "e2e:         FAILED (exit $rc)"
[ "$dockerd_rc" -eq 0 ] || echo "dockerd e2e: FAILED (exit $dockerd_rc)"
echo "e2e.sh:         ${e2e_pass:-0} passed, ${e2e_fail:-?} failed"
echo "e2e-dockerd.sh: ${dk_pass:-0} passed, ${dk_fail:-?} failed"
# Last line: the plain summary of both end-to-end scripts (a failing one if either died early).
passed=$(( ${e2e_pass:-0} + ${dk_pass:-0} ))
failed=$(( ${e2e_fail:-1} + ${dk_fail:-1} ))
[ "$rc" -ne 0 ] || rc=$dockerd_rc
[ "$rc" -ne 0 ] || rc=$test_rc
if [ "$rc" -ne 0 ] && [ "$failed" -eq 0 ]; then
    failed=1
fi
echo "e2e: $passed passed, $failed failed"
exit "$rc"
