# Step runner and registry-log helpers shared by scripts/e2e.sh and scripts/e2e-dockerd.sh.
#   step NAME NEEDS FUNC [ARGS...]
#   Runs FUNC in a subshell with errexit on, so any failing command fails the
#   step without ending the run.  Steps hand results to later steps with
#   `state KEY VALUE` (persisted in $STATE and re-read after every step); a
#   step whose NEEDS keys are unset is skipped because something before it
#   failed.  The caller sets W (work dir, with a steps/ subdir) and STATE, and
#   stops STEP_PID's process tree in its exit trap.
# shellcheck shell=bash
# shellcheck disable=SC2034 # PASSED etc. are read by the sourcing script

PASSED=0
FAILED=0
SKIPPED=0
FAILED_NAMES=()

state() {
    printf '%s=%q\n' "$1" "$2" >>"$STATE"
    printf -v "$1" '%s' "$2"
}

step() {
    local name="$1" needs="$2" k
    shift 2
    for k in $needs; do
        if [ -z "${!k:-}" ]; then
            printf 'SKIP  %s (needs %s from an earlier step)\n' "$name" "$k"
            SKIPPED=$((SKIPPED + 1))
            FAILED_NAMES+=("$name (skipped)")
            return 0
        fi
    done
    local n=$((PASSED + FAILED + SKIPPED + 1)) log t0 rc
    log="$W/steps/$(printf %02d "$n").log"
    t0=$(pc_now)
    # The step runs in the background and is waited for, so that a signal to
    # this script is handled at once (bash runs traps only between foreground
    # commands) and on_exit can stop the step's whole process tree.
    if [ "${E2E_VERBOSE:-0}" = 1 ]; then
        run_step_body "$@" > >(tee "$log") 2>&1 &
    else
        run_step_body "$@" >"$log" 2>&1 &
    fi
    STEP_PID=$!
    rc=0
    wait "$STEP_PID" || rc=$?
    STEP_PID=""
    # shellcheck disable=SC1090
    source "$STATE"
    if [ "$rc" -eq 0 ]; then
        PASSED=$((PASSED + 1))
        printf 'PASS  %s (%ss)\n' "$name" "$(pc_elapsed "$t0")"
    else
        FAILED=$((FAILED + 1))
        FAILED_NAMES+=("$name")
        printf 'FAIL  %s (%ss, exit %s)\n' "$name" "$(pc_elapsed "$t0")" "$rc"
        if [ "${E2E_VERBOSE:-0}" != 1 ]; then
            sed -e 's/^/      | /' "$log" | tail -n 60
        fi
    fi
}

run_step_body() (
    set -euo pipefail
    shopt -s inherit_errexit
    "$@"
)

# Fail the current step with a message.
fail() {
    echo "check failed: $*" >&2
    return 1
}

# --- the docker.io registry's access log (REG_LOG, REG_PORT, PKI set by the caller) -------

# Byte offset of the docker.io registry's log once every request made so far
# has been logged: make a uniquely named request and wait until it shows up
# (the registry logs a request when its response completes).
reg_log_mark() {
    local tag
    tag="sentinel$(date +%s%N)"
    curl -s -o /dev/null --noproxy '*' --max-time 5 --cacert "$PKI/testca.crt" \
        "https://127.0.0.1:$REG_PORT/v2/$tag/tags/list" || true
    pc_wait_until 15 grep -q "/v2/$tag/" "$REG_LOG" || fail "registry log sentinel not seen"
    stat -c %s "$REG_LOG"
}

# Lines of the registry log between two byte offsets.
reg_log_between() { tail -c +"$(($1 + 1))" "$REG_LOG" | head -c "$(($2 - $1))"; }

# Blob GETs in registry log text on stdin.  The registry writes one
# combined-format access line per request: "GET /v2/<name>/blobs/<dgst> HTTP/1.1".
blob_gets() { grep -E '"GET /v2/[^ ]+/blobs/sha256:[0-9a-f]{64} HTTP' || true; }

# --- the Docker-Hub-shaped fixture: test PKI, token server, registries (W set by the caller) --

s_pki() {
    pc_make_test_pki "$W/pki"
    state PKI "$W/pki"
    pc_skopeo_setup "$W/skopeo"
    state PC_SKOPEO_DIR "$W/skopeo"
}

s_tokenserver() {
    pc_start_tokenserver "$PKI" "$W"
    state TOK_PORT "$PC_TOK_PORT"
    state TOK_LOG "$PC_TOK_LOG"
}

s_registry_hub() {
    # realm is the real Docker Hub one: clients must reach auth.docker.io
    # through pullcache's tunnel, as they would on the internet.
    pc_start_registry registry-hub "$W" "$W/storage" "$PKI" "https://auth.docker.io/token"
    state REG_PORT "$PC_REG_PORT"
    state REG_LOG "$PC_REG_LOG"
    local hdr
    hdr=$(curl -sS -D - -o /dev/null --noproxy '*' --max-time 5 --cacert "$PKI/testca.crt" \
        --resolve "registry-1.docker.io:$PC_REG_PORT:127.0.0.1" "https://registry-1.docker.io:$PC_REG_PORT/v2/")
    echo "$hdr"
    grep -qi '^www-authenticate: Bearer realm="https://auth.docker.io/token",service="registry.docker.io"' <<<"$hdr" ||
        fail "unexpected /v2/ challenge"
}

s_registry_direct() {
    # Same storage, but the realm is the token server's real loopback address:
    # used to push the test images and for the no-proxy baseline pull, where
    # no proxy can map auth.docker.io (a Go client never proxies 127.0.0.1 and
    # the name auth.docker.io would resolve to the real Docker Hub).
    pc_start_registry registry-direct "$W" "$W/storage" "$PKI" "https://127.0.0.1:$TOK_PORT/token"
    state DREG_PORT "$PC_REG_PORT"
}

# --- pullcache steps (W, PKI, REG_PORT, TOK_PORT set by the caller) ---------------------

s_build_pullcache() {
    if [ -n "${PULLCACHE_BIN:-}" ] || [ "${E2E_NO_BUILD:-0}" = 1 ]; then
        echo "not building (PULLCACHE_BIN or E2E_NO_BUILD set)"
    else
        (cd "$PC_REPO_ROOT" && cargo build --bin pullcache)
    fi
    local bin
    bin=$(pc_pullcache_bin)
    [ -x "$bin" ] || fail "no pullcache binary at $bin"
    state BIN "$bin"
}

s_start_pullcache() {
    pc_start_pullcache "$BIN" "$W" \
        --listen 127.0.0.1:0 --admin-listen 127.0.0.1:0 \
        --ca-dir "$W/pc-ca" --cache-dir "$W/pc-cache" \
        --connect-to "registry-1.docker.io:443=127.0.0.1:$REG_PORT" \
        --connect-to "auth.docker.io:443=127.0.0.1:$TOK_PORT" \
        --upstream-ca "$PKI/testca.crt" \
        --log-format text
    state PC_LOG "$PC_PROXY_LOG"
    state PC_PID "$PC_PROXY_PID"
    echo "pullcache pid $PC_PROXY_PID proxy port $PC_PROXY_PORT admin port ${PC_ADMIN_PORT:-?}"
    pc_wait_until 10 test -s "$W/pc-ca/ca.crt" || fail "pullcache did not write $W/pc-ca/ca.crt"
    cat "$W/pc-ca/ca.crt" "$PKI/testca.crt" >"$W/client-bundle.pem"
    state BUNDLE "$W/client-bundle.pem"
    state PPORT "$PC_PROXY_PORT"
    if [ -n "${PC_ADMIN_PORT:-}" ]; then
        state APORT "$PC_ADMIN_PORT"
    fi
}
