#!/usr/bin/env bash
# End-to-end test of pullcache against real software, all on loopback:
#
#   skopeo --HTTPS_PROXY--> pullcache --TLS (test CA)--> docker-registry 2.8
#                              |  (intercepts registry-1.docker.io)
#                              +--blind tunnel--> tokenserver.py (auth.docker.io)
#
# A CNCF distribution registry with token auth plays registry-1.docker.io
# (its certificate comes from a throw-away test CA that stands in for the
# public CAs), scripts/tokenserver.py plays auth.docker.io, and pullcache is
# told where those names really live with --connect-to, exactly as it would
# reach Docker Hub through DNS.
#
# Every check is a named step; the run ends with `e2e: N passed, M failed`
# and exits non-zero if any step failed (a step whose prerequisite failed is
# reported as skipped and also makes the run fail).
#
# Environment knobs:
#   PULLCACHE_BIN=PATH   binary to test (default: cargo build, target/debug)
#   E2E_NO_BUILD=1       do not run `cargo build --bin pullcache` first
#   E2E_KEEP=1           keep the work directory (printed at the start)
#   E2E_VERBOSE=1        show every step's output, not just failing ones
#   E2E_LAYERS=N         layers in the public test image (default 3)
#   E2E_LAYER_KIB=K      size of each layer in KiB (default 256)
#   PC_SKOPEO_TIMEOUT=S  bound for one skopeo command (default 180)
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=scripts/lib/common.sh
source "$HERE/lib/common.sh"
# shellcheck source=scripts/lib/certs.sh
source "$HERE/lib/certs.sh"
# shellcheck source=scripts/lib/services.sh
source "$HERE/lib/services.sh"
# shellcheck source=scripts/lib/skopeo.sh
source "$HERE/lib/skopeo.sh"

OCITOOL="$HERE/lib/ocitool.py"

# Nothing from the caller's environment may route our traffic elsewhere; the
# proxy is set per command where it is meant to be used.
unset HTTP_PROXY HTTPS_PROXY ALL_PROXY NO_PROXY http_proxy https_proxy all_proxy no_proxy
unset SSL_CERT_FILE SSL_CERT_DIR
# pullcache reads PULLCACHE_<FLAG> variables; only the flags given below may
# configure the instance under test (PULLCACHE_BIN/PROFILE are ours).
for v in $(compgen -e | grep '^PULLCACHE_' || true); do
    case "$v" in PULLCACHE_BIN | PULLCACHE_PROFILE) ;; *) unset "$v" ;; esac
done

pc_ensure_packages

W=$(mktemp -d "${TMPDIR:-/tmp}/pullcache-e2e.XXXXXX")
export PC_PIDFILE="$W/pids"
: >"$PC_PIDFILE"
STATE="$W/state.env"
: >"$STATE"
mkdir -p "$W/steps"

STEP_PID=""
on_exit() {
    local rc=$?
    [ -z "$STEP_PID" ] || pc_kill_tree "$STEP_PID"
    pc_cleanup_pids
    if [ "${E2E_KEEP:-0}" = 1 ]; then
        pc_log "work directory kept: $W"
    else
        rm -rf "$W"
    fi
    exit "$rc"
}
trap on_exit EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

pc_log "e2e work directory: $W"

# --- step runner (step NAME "NEEDS..." FUNC [ARGS...], state KEY VALUE, fail MSG) ---------
# shellcheck source=scripts/lib/steps.sh
source "$HERE/lib/steps.sh"

# --- shared bits for the steps ---------------------------------------------------

# check_layout LAYOUT TAG EXPECTED_JSON_FILE: the pulled image (manifest,
# config and layer digests; every blob re-hashed) equals what was pushed.
check_layout() {
    local got want
    got=$(python3 "$OCITOOL" inspect "$1" "$2")
    want=$(cat "$3")
    if [ "$got" != "$want" ]; then
        echo "pulled:  $got" >&2
        echo "pushed:  $want" >&2
        fail "pulled image $1:$2 differs from the pushed one"
    fi
    echo "image digests match: $got"
}

# Skopeo through pullcache.  The client trusts a bundle of two CAs, for two
# different reasons (mirroring a real client = pullcache CA + system roots):
#   * pullcache's CA, because pullcache terminates TLS for the intercepted
#     registry-1.docker.io and presents a leaf it minted;
#   * the test CA, because auth.docker.io is NOT intercepted: pullcache only
#     tunnels those bytes, so the client sees the token server's own cert.
# The interception step below proves registry-1.docker.io is verified against
# pullcache's CA only.
via_proxy() {
    HTTPS_PROXY="http://127.0.0.1:$PPORT" SSL_CERT_FILE="$BUNDLE" "$@"
}

# Get a registry token from auth.docker.io through pullcache's tunnel.
# proxy_token SCOPE [USER:PASS]
proxy_token() {
    local creds=()
    [ -z "${2:-}" ] || creds=(-u "$2")
    curl -fsS --max-time 20 --proxy "http://127.0.0.1:$PPORT" --cacert "$BUNDLE" "${creds[@]}" \
        "https://auth.docker.io/token?service=registry.docker.io&scope=$1" |
        python3 -c 'import json,sys; print(json.load(sys.stdin)["token"])'
}

ACCEPT_MANIFESTS="application/vnd.oci.image.manifest.v1+json,application/vnd.docker.distribution.manifest.v2+json,application/vnd.oci.image.index.v1+json,application/vnd.docker.distribution.manifest.list.v2+json"

# --- steps: upstream stand-ins (no pullcache involved) ----------------------------

# (s_pki, s_tokenserver, s_registry_hub, s_registry_direct: scripts/lib/steps.sh)

s_token_policy() {
    local tok="https://127.0.0.1:$TOK_PORT/token?service=registry.docker.io"
    local ca=(--noproxy '*' --max-time 10 --cacert "$PKI/testca.crt")
    # decode_access prints the JWT's access claim.
    decode_access() {
        python3 -c '
import base64, json, sys
t = json.load(sys.stdin)["token"].split(".")[1]
print(json.dumps(json.loads(base64.urlsafe_b64decode(t + "=" * (-len(t) % 4)))["access"], sort_keys=True))'
    }
    local a
    a=$(curl -fsS "${ca[@]}" "$tok&scope=repository:library/e2etest:pull,push" | decode_access)
    echo "anonymous library/e2etest pull,push -> $a"
    [ "$a" = '[{"actions": ["pull"], "name": "library/e2etest", "type": "repository"}]' ] || fail "anonymous grant"
    a=$(curl -fsS "${ca[@]}" "$tok&scope=repository:private/secret:pull" | decode_access)
    echo "anonymous private/secret pull -> $a"
    [ "$a" = '[]' ] || fail "anonymous must get nothing on private/"
    a=$(curl -fsS "${ca[@]}" -u user:secret "$tok&scope=repository:private/secret:pull,push" | decode_access)
    echo "user private/secret pull,push -> $a"
    [ "$a" = '[{"actions": ["pull", "push"], "name": "private/secret", "type": "repository"}]' ] || fail "user grant"
    local code
    code=$(curl -sS -o /dev/null -w '%{http_code}' "${ca[@]}" -u user:wrong "$tok&scope=repository:x/y:pull")
    echo "wrong password -> HTTP $code"
    [ "$code" = 401 ] || fail "wrong password must be 401"
    # The registry accepts the RS256/x5c token: /v2/ with it answers 200.
    local t
    t=$(curl -fsS "${ca[@]}" "$tok&scope=repository:library/e2etest:pull" |
        python3 -c 'import json,sys; print(json.load(sys.stdin)["token"])')
    code=$(curl -sS -o /dev/null -w '%{http_code}' "${ca[@]}" -H "Authorization: Bearer $t" \
        "https://127.0.0.1:$REG_PORT/v2/")
    echo "registry /v2/ with token -> HTTP $code"
    [ "$code" = 200 ] || fail "registry rejected the token (see its log)"
}

s_build_images() {
    local d
    d=$(python3 "$OCITOOL" make "$W/image" v1 --layers "${E2E_LAYERS:-3}" --layer-kib "${E2E_LAYER_KIB:-256}")
    python3 "$OCITOOL" inspect "$W/image" v1 >"$W/image-public.json"
    # The private image has its own layers, so that a leak of a cached private
    # blob to an anonymous client could not be excused as "public content".
    python3 "$OCITOOL" make "$W/image" private --layers 1 --layer-kib 128 >/dev/null
    python3 "$OCITOOL" inspect "$W/image" private >"$W/image-private.json"
    du -sh "$W/image"
    cat "$W/image-public.json" "$W/image-private.json"
    state IMG_DIGEST "$d"
}

s_push() { # TAG-IN-LAYOUT REPO:TAG
    # --preserve-digests: fail rather than silently convert the manifest, so
    # the digests checked after every pull are the ones built here.
    pc_skopeo copy --preserve-digests --dest-creds user:secret --dest-cert-dir "$PKI/certdir" \
        "oci:$W/image:$1" "docker://127.0.0.1:$DREG_PORT/$2"
    local got
    got=$(pc_skopeo inspect --format '{{.Digest}}' --creds user:secret --cert-dir "$PKI/certdir" \
        "docker://127.0.0.1:$DREG_PORT/$2")
    echo "registry reports $2 = $got"
}

s_push_public() {
    s_push v1 library/e2etest:v1
    state PUSHED_PUBLIC 1
}

s_push_private() {
    s_push private private/secret:v1
    state PUSHED_PRIVATE 1
}

s_direct_private_anon_refused() {
    local out
    if out=$(pc_skopeo copy --src-no-creds --src-cert-dir "$PKI/certdir" \
        "docker://127.0.0.1:$DREG_PORT/private/secret:v1" "oci:$W/direct-private-anon:v1" 2>&1); then
        fail "anonymous pull of private/secret succeeded directly: token policy broken"
    fi
    echo "$out" | tail -n 3
    grep -Eqi 'denied|unauthorized|authentication required' <<<"$out" || fail "failed for another reason"
}

s_direct_pull() {
    local t0
    t0=$(pc_now)
    pc_skopeo copy --src-no-creds --src-cert-dir "$PKI/certdir" \
        "docker://127.0.0.1:$DREG_PORT/library/e2etest:v1" "oci:$W/pull-direct:v1"
    state DIRECT_SECS "$(pc_elapsed "$t0")"
    check_layout "$W/pull-direct" v1 "$W/image-public.json"
}

# --- steps: pullcache ---------------------------------------------------------------

# (s_build_pullcache and s_start_pullcache: scripts/lib/steps.sh)

der_fingerprint() { openssl x509 -noout -fingerprint -sha256 | cut -d= -f2; }

s_ca_endpoint() {
    local served printed onfile
    served=$(curl -fsS --noproxy '*' --max-time 10 "http://127.0.0.1:$PPORT/ca.crt" | der_fingerprint)
    printed=$("$BIN" ca print --ca-dir "$W/pc-ca" | der_fingerprint)
    onfile=$(der_fingerprint <"$W/pc-ca/ca.crt")
    echo "GET /ca.crt: $served"
    echo "ca print:    $printed"
    echo "ca.crt file: $onfile"
    if [ -z "$served" ] || [ "$served" != "$printed" ] || [ "$printed" != "$onfile" ]; then
        fail "CA certificates differ"
    fi
}

s_cold_pull() {
    local m0 m1 t0 d gets
    m0=$(reg_log_mark)
    t0=$(pc_now)
    via_proxy pc_skopeo copy --src-no-creds \
        docker://docker.io/library/e2etest:v1 "oci:$W/pull-cold:v1"
    state COLD_SECS "$(pc_elapsed "$t0")"
    check_layout "$W/pull-cold" v1 "$W/image-public.json"
    # The bytes really came from the registry behind --connect-to: each blob
    # of the image was fetched from it during this pull.
    m1=$(reg_log_mark)
    gets=$(reg_log_between "$m0" "$m1" | blob_gets)
    for d in $(python3 -c 'import json,sys; j=json.load(open(sys.argv[1])); print(" ".join([j["config"]]+j["layers"]))' "$W/image-public.json"); do
        grep -q "$d" <<<"$gets" || fail "upstream registry never served blob $d"
    done
    echo "upstream blob GETs during cold pull: $(grep -c . <<<"$gets")"
    state COLD_OK 1
}

s_warm_pull() {
    local m0 m1 t0
    m0=$(reg_log_mark)
    t0=$(pc_now)
    via_proxy pc_skopeo copy --src-no-creds \
        docker://docker.io/library/e2etest:v1 "oci:$W/pull-warm:v1"
    state WARM_SECS "$(pc_elapsed "$t0")"
    m1=$(reg_log_mark)
    state WARM_LOG_FROM "$m0"
    state WARM_LOG_TO "$m1"
    check_layout "$W/pull-warm" v1 "$W/image-public.json"
}

s_warm_from_cache() {
    local gets
    gets=$(reg_log_between "$WARM_LOG_FROM" "$WARM_LOG_TO" | blob_gets)
    local window manifest_gets
    window=$(reg_log_between "$WARM_LOG_FROM" "$WARM_LOG_TO" | grep -E '"(GET|HEAD) /v2/' | grep -v sentinel || true)
    echo "upstream requests during the second pull:"
    echo "$window"
    # One line per request type, for the notes: e.g. "1 HEAD manifests".
    echo "by type:"
    sed -nE 's/.*"(GET|HEAD) \/v2\/([^ ]*\/(blobs|manifests)\/)?[^ ]* HTTP.*/\1 \3/p' <<<"$window" |
        sed -e 's/ $/ ping/' | sort | uniq -c
    [ -z "$gets" ] || fail "second pull fetched $(grep -c . <<<"$gets") blob(s) from upstream"
    manifest_gets=$(grep -Ec '"GET /v2/[^ ]+/manifests/' <<<"$window" || true)
    [ "$manifest_gets" -eq 0 ] || fail "second pull sent $manifest_gets manifest GET(s) upstream (Docker Hub counts those)"
}

s_xcache_headers() {
    local t hdr blob
    t=$(proxy_token "repository:library/e2etest:pull")
    hdr=$(curl -fsS -D - -o /dev/null --max-time 20 --proxy "http://127.0.0.1:$PPORT" --cacert "$BUNDLE" \
        -H "Authorization: Bearer $t" -H "Accept: $ACCEPT_MANIFESTS" \
        "https://registry-1.docker.io/v2/library/e2etest/manifests/v1")
    echo "manifest response:"
    echo "$hdr"
    grep -Eqi '^x-cache: (HIT|MISS|COALESCED|REVALIDATED|STALE|PASS)' <<<"$hdr" ||
        fail "manifest response has no valid X-Cache header"
    blob=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["layers"][0])' "$W/image-public.json")
    hdr=$(curl -fsS -D - -o /dev/null --max-time 20 --proxy "http://127.0.0.1:$PPORT" --cacert "$BUNDLE" \
        -H "Authorization: Bearer $t" "https://registry-1.docker.io/v2/library/e2etest/blobs/$blob")
    echo "blob response:"
    echo "$hdr"
    grep -Eqi '^x-cache: HIT' <<<"$hdr" || fail "blob pulled twice is not an X-Cache: HIT"
}

s_interception_proven() {
    # Trusting ONLY the test CA (which signed the real registry's cert) must
    # fail: the client has to see pullcache's own certificate for
    # registry-1.docker.io, i.e. pullcache terminates TLS rather than tunnels.
    local out
    if out=$(HTTPS_PROXY="http://127.0.0.1:$PPORT" SSL_CERT_FILE="$PKI/testca.crt" pc_skopeo copy \
        --src-no-creds --retry-times 0 docker://docker.io/library/e2etest:v1 "oci:$W/pull-untrusted:v1" 2>&1); then
        fail "pull trusting only the upstream's CA succeeded: registry-1.docker.io was not intercepted"
    fi
    echo "$out" | tail -n 3
    grep -Eq 'x509|certificate' <<<"$out" || fail "failed, but not on certificate verification"
    grep -q 'registry-1.docker.io' <<<"$out" || fail "the failing host is not registry-1.docker.io"
}

s_private_with_creds() {
    via_proxy pc_skopeo copy --src-creds user:secret \
        docker://docker.io/private/secret:v1 "oci:$W/pull-private:v1"
    check_layout "$W/pull-private" v1 "$W/image-private.json"
    state PRIVATE_CACHED 1
}

s_private_anonymous_refused() {
    local out
    if out=$(via_proxy pc_skopeo copy --src-no-creds --retry-times 0 \
        docker://docker.io/private/secret:v1 "oci:$W/pull-private-anon:v1" 2>&1); then
        fail "anonymous pull of private/secret:v1 through pullcache succeeded"
    fi
    echo "$out" | tail -n 3
    grep -Eqi 'denied|unauthorized|authentication required' <<<"$out" ||
        fail "the pull failed, but not with an authorization error"
}

s_private_blob_anonymous_refused() {
    # The private layer is in pullcache's cache now; an anonymous client that
    # asks for it by digest (with an anonymous token, and with none) must not
    # get it.
    local t blob code
    t=$(proxy_token "repository:private/secret:pull")
    blob=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["layers"][0])' "$W/image-private.json")
    for auth in "Authorization: Bearer $t" "X-No-Auth: 1"; do
        code=$(curl -sS -o /dev/null -w '%{http_code}' --max-time 20 --proxy "http://127.0.0.1:$PPORT" \
            --cacert "$BUNDLE" -H "$auth" "https://registry-1.docker.io/v2/private/secret/blobs/$blob")
        echo "${auth%%:*}: HTTP $code"
        case "$code" in
            401 | 403 | 404) ;;
            *) fail "cached private blob answered $code to an anonymous client" ;;
        esac
    done
}

# The operator's view after the pulls: `pullcache stats` and /metrics agree that the warm
# pull was served from cache (printed in full: the closing notes quote them).
s_admin_view() {
    local url="http://127.0.0.1:$APORT" out
    out=$("$BIN" stats --admin "$url")
    echo "$out"
    grep -Eiq 'hit' <<<"$out" || fail "pullcache stats shows no hits line"
    local metrics
    metrics=$(curl -fsS "$url/metrics")
    grep -E '^pullcache_requests_total\{' <<<"$metrics" | head -n 20
    grep -Eq '^pullcache_requests_total\{[^}]*outcome="hit"[^}]*\} [1-9]' <<<"$metrics" ||
        fail "/metrics counts no hit"
    grep -Eq '^pullcache_requests_total\{[^}]*outcome="miss"[^}]*\} [1-9]' <<<"$metrics" ||
        fail "/metrics counts no miss"
}

# The dashboard in a real headless browser shows the same figures as /api/stats.
s_dashboard() {
    PULLCACHE_ADMIN_URL="http://127.0.0.1:$APORT" PULLCACHE_ADMIN_TOKEN="" \
        DASHBOARD_SCREENSHOT="$PC_REPO_ROOT/target/dashboard.png" \
        "$PC_REPO_ROOT/scripts/e2e-dashboard.sh"
}

# Pushes go through the interception too (uploads streamed both ways): push an image whose
# blobs the registry has never seen (so they are really uploaded, not mounted) through
# pullcache, then read it back directly from the registry.
s_push_through_pullcache() {
    python3 "$OCITOOL" make "$W/image" pushed --layers 2 --layer-kib 512 >/dev/null
    python3 "$OCITOOL" inspect "$W/image" pushed >"$W/image-pushed.json"
    local m0 m1 uploads
    m0=$(reg_log_mark)
    via_proxy pc_skopeo copy --preserve-digests --dest-creds user:secret \
        "oci:$W/image:pushed" docker://docker.io/library/pushed-via-proxy:v1
    m1=$(reg_log_mark)
    uploads=$(reg_log_between "$m0" "$m1" | grep -Ec '"(PATCH|PUT) /v2/library/pushed-via-proxy/blobs/uploads/' || true)
    echo "upload requests seen by the registry: $uploads"
    [ "$uploads" -ge 2 ] || fail "the registry saw no blob uploads through pullcache"
    pc_skopeo copy --src-no-creds --src-cert-dir "$PKI/certdir" \
        "docker://127.0.0.1:$DREG_PORT/library/pushed-via-proxy:v1" "oci:$W/pushed-readback:v1"
    check_layout "$W/pushed-readback" v1 "$W/image-pushed.json"
}

s_pullcache_healthy() {
    pc_alive "$PC_PID" || fail "pullcache exited"
    if pc_strip_ansi <"$PC_LOG" | grep -E 'panicked at'; then
        fail "pullcache log shows a panic"
    fi
    echo "pullcache still running, no panics logged"
}

# --- the run ---------------------------------------------------------------------

pc_section "e2e: upstream stand-ins"
step "test PKI (CA, registry/auth certs, token signer)" "" s_pki
step "token server (auth.docker.io) starts" "PKI" s_tokenserver
step "registry (registry-1.docker.io) starts with token auth" "PKI TOK_PORT" s_registry_hub
step "direct-access registry on the same storage starts" "PKI TOK_PORT" s_registry_direct
step "token server policy and RS256/x5c tokens accepted by the registry" "TOK_PORT REG_PORT" s_token_policy
step "test images built as OCI layouts" "" s_build_images
step "push library/e2etest:v1 (direct, with creds)" "DREG_PORT IMG_DIGEST" s_push_public
step "push private/secret:v1 (direct, with creds)" "DREG_PORT IMG_DIGEST" s_push_private
step "anonymous direct pull of private/secret refused" "PUSHED_PRIVATE" s_direct_private_anon_refused
step "direct pull (no proxy) matches pushed digests" "PUSHED_PUBLIC" s_direct_pull

pc_section "e2e: through pullcache"
step "pullcache binary available" "" s_build_pullcache
step "pullcache starts and logs proxy_addr" "BIN REG_PORT TOK_PORT" s_start_pullcache
step "GET /ca.crt equals 'pullcache ca print'" "PPORT" s_ca_endpoint
step "cold pull through pullcache matches pushed digests" "PPORT PUSHED_PUBLIC" s_cold_pull
step "warm pull through pullcache matches pushed digests" "COLD_OK" s_warm_pull
step "second pull served from cache (no upstream blob or manifest GETs)" "WARM_LOG_TO" s_warm_from_cache
step "X-Cache headers on intercepted responses" "COLD_OK" s_xcache_headers
step "registry-1.docker.io is intercepted (upstream CA alone is refused)" "PPORT PUSHED_PUBLIC" s_interception_proven
step "credentialed pull of private/secret through pullcache" "PPORT PUSHED_PRIVATE" s_private_with_creds
step "anonymous pull of cached private/secret refused" "PRIVATE_CACHED" s_private_anonymous_refused
step "anonymous GET of a cached private blob refused" "PRIVATE_CACHED" s_private_blob_anonymous_refused
step "push through pullcache reaches the registry intact" "PPORT PUSHED_PUBLIC" s_push_through_pullcache
step "pullcache stats and /metrics show the hits" "APORT WARM_LOG_TO" s_admin_view
step "dashboard figures match /api/stats (headless chromium)" "APORT WARM_LOG_TO" s_dashboard
step "pullcache still alive, no panics" "PC_PID" s_pullcache_healthy

if [ -n "${DIRECT_SECS:-}" ] && [ -n "${COLD_SECS:-}" ] && [ -n "${WARM_SECS:-}" ]; then
    # Informational only: tiny image, loopback, noisy; never asserted.
    awk -v d="$DIRECT_SECS" -v c="$COLD_SECS" -v w="$WARM_SECS" 'BEGIN {
        printf "timing: direct=%.2fs cold=%.2fs warm=%.2fs ratio_cold=%.2f ratio_warm=%.2f\n", d, c, w, c / d, w / d }'
else
    echo "timing: incomplete (direct=${DIRECT_SECS:-?}s cold=${COLD_SECS:-?}s warm=${WARM_SECS:-?}s)"
fi

if [ "$FAILED" -gt 0 ] || [ "$SKIPPED" -gt 0 ]; then
    pc_section "e2e: logs of the services (for the failures above)"
    for f in "${PC_LOG:-}" "${TOK_LOG:-}"; do
        [ -z "$f" ] || pc_show_log "$f" 40
    done
    [ -z "${REG_LOG:-}" ] || pc_show_log "$REG_LOG" 15
    echo
    echo "not passed:"
    printf '  - %s\n' "${FAILED_NAMES[@]}"
fi

echo
if [ "$SKIPPED" -gt 0 ]; then
    echo "e2e: $PASSED passed, $FAILED failed, $SKIPPED skipped"
else
    echo "e2e: $PASSED passed, $FAILED failed"
fi
[ "$FAILED" -eq 0 ] && [ "$SKIPPED" -eq 0 ]
