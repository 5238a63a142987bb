#!/usr/bin/env bash
# Benchmark of pullcache against a real registry, all on loopback:
#
#   curl/skopeo --direct (TLS)-------------------------> docker-registry 2.8
#   curl/skopeo --HTTPS_PROXY--> pullcache --TLS------> docker-registry 2.8
#                                                        (same storage, token auth)
#
# Run on demand, never by CI or the tests.  It prints figures and asserts no
# timings: machines are shared and noisy, so every figure is a ratio against a
# baseline measured in the same run (direct from the registry), with the raw
# numbers beside it; each measurement is repeated BENCH_REPS times and the
# median is reported.  It does check correctness (HTTP status, sizes, one
# SHA-256 per blob, image digests) and stops if a transfer is wrong.
#
# What is measured (sizes are the defaults):
#   1. cached blob throughput: a 1 GiB random blob, direct vs pullcache (HIT),
#      one client, then 8 concurrent clients (aggregate MiB/s);
#   2. pullcache's peak memory (VmHWM) around those transfers and after cold
#      fills of blobs of two sizes: it must not grow with the blob size;
#   3. cold fill: first fetch of the 1 GiB blob through a pullcache with an
#      empty cache (download + verify + write + stream) vs direct;
#   4. coalescing: 32 concurrent cold clients on one 256 MiB blob (upstream
#      blob GETs counted in the registry's access log) vs one cold client;
#   5. skopeo pulls of a 3 x 32 MiB image: direct, cold and warm through
#      pullcache.
# "Cold" always means a freshly started pullcache with an empty cache
# directory (the CA is kept), so every repetition sees the same blob cold.
#
# Ends with a summary block, also written to <cargo target dir>/bench-summary.txt.
#
# Environment knobs:
#   PULLCACHE_BIN=PATH        binary to measure (default: cargo build --release)
#   BENCH_NO_BUILD=1          do not run cargo build (use target/release/pullcache)
#   BENCH_BLOB_MIB=N          the big blob, MiB (default 1024)
#   BENCH_REPS=N              repetitions of every measurement (default 3)
#   BENCH_CLIENTS=N           concurrent clients on the cached blob (default 8)
#   BENCH_COALESCE_CLIENTS=N  concurrent cold clients (default 32)
#   BENCH_COALESCE_MIB=N      blob for the coalescing test, MiB (default 256)
#   BENCH_IMAGE_LAYERS=N      layers of the skopeo image (default 3)
#   BENCH_IMAGE_LAYER_MIB=N   size of each layer, MiB (default 32)
#   BENCH_TMPDIR=DIR          where the work directory (blobs, caches) goes
#                             (default ${TMPDIR:-/tmp}); deleted at the end
#   BENCH_KEEP=1              keep the work directory
#   BENCH_CURL_TIMEOUT=S      bound for one curl transfer (default 600)
#   PC_SKOPEO_TIMEOUT=S       bound for one skopeo command (default 180)
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
FILLWATCH="$HERE/bench/fillwatch.py"

case "${1:-}" in
    -h | --help)
        sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed -e '$d' -e 's/^# \{0,1\}//'
        exit 0
        ;;
    "") ;;
    *) pc_die "usage: $0 [--help]  (configure with BENCH_* variables)" ;;
esac

# Nothing from the caller's environment may route our traffic elsewhere.
unset HTTP_PROXY HTTPS_PROXY ALL_PROXY NO_PROXY http_proxy https_proxy all_proxy no_proxy
unset SSL_CERT_FILE SSL_CERT_DIR CURL_HOME
for v in $(compgen -e | grep '^PULLCACHE_' || true); do
    case "$v" in PULLCACHE_BIN | PULLCACHE_PROFILE) ;; *) unset "$v" ;; esac
done

# --- knobs -----------------------------------------------------------------------

knob() { # NAME DEFAULT -> validated positive integer
    local v="${!1:-$2}"
    [[ "$v" =~ ^[1-9][0-9]*$ ]] || pc_die "$1 must be a positive integer (got '$v')"
    echo "$v"
}
BLOB_MIB=$(knob BENCH_BLOB_MIB 1024)
REPS=$(knob BENCH_REPS 3)
CLIENTS=$(knob BENCH_CLIENTS 8)
CO_CLIENTS=$(knob BENCH_COALESCE_CLIENTS 32)
CO_MIB=$(knob BENCH_COALESCE_MIB 256)
IMG_LAYERS=$(knob BENCH_IMAGE_LAYERS 3)
IMG_LAYER_MIB=$(knob BENCH_IMAGE_LAYER_MIB 32)
CURL_MAX=$(knob BENCH_CURL_TIMEOUT 600)

REPO_BIG="bench/big"
REPO_CO="bench/coalesce"
REPO_IMG="bench/image"
HUB="registry-1.docker.io"

pc_ensure_packages

# --- work directory and cleanup -----------------------------------------------------

BASE="${BENCH_TMPDIR:-${TMPDIR:-/tmp}}"
mkdir -p "$BASE"
W=$(mktemp -d "$BASE/pullcache-bench.XXXXXX")
export PC_PIDFILE="$W/pids"
: >"$PC_PIDFILE"
BATCH_PIDS=()
WATCH_PID=""

on_exit() {
    local rc=$? p
    trap - EXIT INT TERM
    for p in "${BATCH_PIDS[@]}" $WATCH_PID; do
        kill -TERM "$p" 2>/dev/null || true
    done
    pc_cleanup_pids
    if [ "${BENCH_KEEP:-0}" = 1 ]; then
        pc_log "work directory kept: $W"
    else
        rm -rf "$W"
    fi
    exit "$rc"
}
trap on_exit EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

pc_log "bench work directory: $W ($(stat -f -c %T "$W"))"

# Rough disk need: big blob in registry + cache (+ source while pushing),
# coalesce blob twice, the image a few times over; plus a margin.
need_mib=$((3 * BLOB_MIB + 3 * CO_MIB + 6 * IMG_LAYERS * IMG_LAYER_MIB + 512))
have_mib=$(df -Pm "$W" | awk 'NR == 2 { print $4 }')
[ "$have_mib" -ge "$need_mib" ] || pc_die "need ~${need_mib} MiB free in $BASE, have ${have_mib} MiB (set BENCH_TMPDIR)"

# --- the binary under test -------------------------------------------------------------

if [ -n "${PULLCACHE_BIN:-}" ] || [ "${BENCH_NO_BUILD:-0}" = 1 ]; then
    pc_log "not building (PULLCACHE_BIN or BENCH_NO_BUILD set)"
else
    pc_log "cargo build --release --bin pullcache"
    t0=$(pc_now)
    (cd "$PC_REPO_ROOT" && cargo build --release --bin pullcache) || pc_die "release build failed"
    pc_log "built in $(pc_elapsed "$t0")s"
fi
BIN=$(PULLCACHE_PROFILE=${PULLCACHE_PROFILE:-release} pc_pullcache_bin)
[ -x "$BIN" ] || pc_die "no pullcache binary at $BIN"
pc_log "binary: $BIN"

# --- small numeric helpers (awk; bash has no floats) ---------------------------------

# secs START END -> seconds, 3 decimals
secs() { awk -v s="$1" -v e="$2" 'BEGIN { printf "%.3f", e - s }'; }
# median X... -> median, 3 decimals
median() {
    printf '%s\n' "$@" | sort -g | awk '{ a[NR] = $1 } END {
        if (NR == 0) { print "nan"; exit }
        if (NR % 2) printf "%.3f\n", a[(NR + 1) / 2]; else printf "%.3f\n", (a[NR / 2] + a[NR / 2 + 1]) / 2 }'
}
# median_int X... -> median rounded to an integer (KiB figures)
median_int() { awk -v m="$(median "$@")" 'BEGIN { printf "%.0f\n", m }'; }
# ratio A B -> A/B, 2 decimals
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b + 0 == 0) print "n/a"; else printf "%.2f", a / b }'; }
# mibps MIB SECONDS -> MiB/s, 1 decimal
mibps() { awk -v m="$1" -v s="$2" 'BEGIN { if (s + 0 == 0) print "inf"; else printf "%.1f", m / s }'; }
# list X... -> "x y z" (3 decimals each)
list() { printf '%s ' "$@" | sed -e 's/ $//'; }

SUMMARY=()
# srow KEY LABEL DIRECT PULLCACHE RATIO [NOTE]: a line of the summary table.
srow() { SUMMARY+=("$(printf '%-3s %-31s %12s %12s %6s  %s' "$@")"); }
# sline KEY LABEL TEXT: a free-form line of the summary.
sline() { SUMMARY+=("$(printf '%-3s %-31s %s' "$@")"); }

# --- upstream stand-ins ---------------------------------------------------------------

pc_section "setup"
PKI="$W/pki"
pc_make_test_pki "$PKI"
pc_skopeo_setup "$W/skopeo"
pc_start_tokenserver "$PKI" "$W" || pc_die "token server did not start"
TOK_PORT=$PC_TOK_PORT
# The registry pullcache talks to (realm auth.docker.io, reached through
# pullcache's tunnel); its access log counts pullcache's upstream requests.
pc_start_registry registry-hub "$W" "$W/storage" "$PKI" "https://auth.docker.io/token" ||
    pc_die "registry did not start"
REG_PORT=$PC_REG_PORT
REG_LOG=$PC_REG_LOG
REG_PID=$PC_REG_PID
# Same storage, realm on loopback: pushes and every direct (baseline) fetch,
# so that the first registry's log holds only pullcache's requests.
pc_start_registry registry-direct "$W" "$W/storage" "$PKI" "https://127.0.0.1:$TOK_PORT/token" ||
    pc_die "direct registry did not start"
DREG_PORT=$PC_REG_PORT
DREG_PID=$PC_REG_PID
pc_log "token server :$TOK_PORT, registry (pullcache's upstream) :$REG_PORT, registry (direct) :$DREG_PORT"

# token SCOPE [USER:PASS] -> a bearer token straight from the token server.
# Tokens live 300 s, so every measurement asks for a fresh one.
token() {
    local creds=()
    [ -z "${2:-}" ] || creds=(-u "$2")
    curl -fsS --noproxy '*' --max-time 20 --cacert "$PKI/testca.crt" "${creds[@]}" \
        "https://127.0.0.1:$TOK_PORT/token?service=registry.docker.io&scope=$1" |
        python3 -c 'import json,sys; print(json.load(sys.stdin)["token"])'
}

# push_blob REPO FILE DIGEST: monolithic upload (POST, then PUT with the body).
push_blob() {
    local repo="$1" file="$2" digest="$3" tok loc sep base="https://127.0.0.1:$DREG_PORT"
    local ca=(--noproxy '*' --cacert "$PKI/testca.crt")
    tok=$(token "repository:$repo:pull,push" user:secret)
    loc=$(curl -fsS "${ca[@]}" --max-time 30 -D - -o /dev/null -X POST \
        -H "Authorization: Bearer $tok" "$base/v2/$repo/blobs/uploads/" |
        tr -d '\r' | awk 'tolower($1) == "location:" { print $2 }')
    [ -n "$loc" ] || pc_die "upload to $repo: no Location"
    case "$loc" in http*) ;; *) loc="$base$loc" ;; esac
    sep='?'
    [[ "$loc" != *\?* ]] || sep='&'
    curl -fsS "${ca[@]}" --max-time "$CURL_MAX" -o /dev/null -X PUT -T "$file" \
        -H "Authorization: Bearer $tok" -H 'Content-Type: application/octet-stream' \
        "$loc${sep}digest=$digest"
    local len
    len=$(curl -fsS "${ca[@]}" --max-time 30 -I -H "Authorization: Bearer $tok" \
        "$base/v2/$repo/blobs/$digest" | tr -d '\r' | awk 'tolower($1) == "content-length:" { print $2 }')
    [ "$len" = "$(stat -c %s "$file")" ] || pc_die "registry has $digest at ${len:-no} bytes"
}

# sha256_hex < data -> hex digest (openssl: faster than sha256sum where the CPU
# has no SHA extensions)
sha256_hex() { openssl dgst -sha256 -r | cut -d' ' -f1; }

# make_blob MIB FILE -> prints sha256:<hex>; random (incompressible) bytes.
make_blob() {
    local hex
    hex=$(head -c "$(($1 * 1048576))" /dev/urandom | tee "$2" | sha256_hex)
    echo "sha256:$hex"
}

mkdir -p "$W/data"
t0=$(pc_now)
BIG_DIGEST=$(make_blob "$BLOB_MIB" "$W/data/big.bin")
push_blob "$REPO_BIG" "$W/data/big.bin" "$BIG_DIGEST"
rm -f "$W/data/big.bin"
pc_log "pushed $BLOB_MIB MiB blob $BIG_DIGEST to $REPO_BIG ($(pc_elapsed "$t0")s)"
t0=$(pc_now)
CO_DIGEST=$(make_blob "$CO_MIB" "$W/data/co.bin")
push_blob "$REPO_CO" "$W/data/co.bin" "$CO_DIGEST"
rm -f "$W/data/co.bin"
pc_log "pushed $CO_MIB MiB blob $CO_DIGEST to $REPO_CO ($(pc_elapsed "$t0")s)"
t0=$(pc_now)
python3 "$OCITOOL" make "$W/image" v1 --layers "$IMG_LAYERS" --layer-kib "$((IMG_LAYER_MIB * 1024))" >/dev/null
python3 "$OCITOOL" inspect "$W/image" v1 >"$W/image.json"
pc_skopeo copy --quiet --preserve-digests --dest-creds user:secret --dest-cert-dir "$PKI/certdir" \
    "oci:$W/image:v1" "docker://127.0.0.1:$DREG_PORT/$REPO_IMG:v1"
rm -rf "$W/image"
IMG_MIB=$(awk -v k="$IMG_LAYERS" -v m="$IMG_LAYER_MIB" 'BEGIN { print k * m }')
pc_log "pushed $REPO_IMG:v1, $IMG_LAYERS x $IMG_LAYER_MIB MiB layers ($(pc_elapsed "$t0")s)"

# --- pullcache ---------------------------------------------------------------------------


PC_PID=""
PPORT=""
PC_N=0
PC_CA="$W/pc-ca/ca.crt"
BUNDLE="$W/client-bundle.pem"

# fresh_pullcache: stop the running instance (if any), empty the cache
# directory and start a new instance (same CA).  Sets PC_PID PPORT.
fresh_pullcache() {
    if [ -n "$PC_PID" ]; then
        pc_stop_pid "$PC_PID" pullcache
        # Forget it, so the EXIT trap never signals a recycled PID.
        sed -i "/^$PC_PID /d" "$PC_PIDFILE"
        PC_PID=""
    fi
    rm -rf "$W/pc-cache"
    PC_N=$((PC_N + 1))
    mkdir -p "$W/pc-$PC_N"
    pc_start_pullcache "$BIN" "$W/pc-$PC_N" \
        --listen 127.0.0.1:0 --admin-listen 127.0.0.1:0 \
        --ca-dir "$W/pc-ca" --cache-dir "$W/pc-cache" \
        --connect-to "$HUB:443=127.0.0.1:$REG_PORT" \
        --connect-to "auth.docker.io:443=127.0.0.1:$TOK_PORT" \
        --upstream-ca "$PKI/testca.crt" \
        --log-format text || pc_die "pullcache did not start"
    PC_PID=$PC_PROXY_PID
    PPORT=$PC_PROXY_PORT
    if [ ! -s "$BUNDLE" ]; then
        pc_wait_until 10 test -s "$PC_CA" || pc_die "pullcache wrote no $PC_CA"
        # skopeo (Go) needs one root file: pullcache's CA for the intercepted
        # registry, the test CA for auth.docker.io (only tunnelled).
        cat "$PC_CA" "$PKI/testca.crt" >"$BUNDLE"
    fi
}

# cpu_ticks PID -> user + system CPU time of PID (all its threads) in clock
# ticks, 0 if it is gone.  Fields 14 and 15 of /proc/PID/stat, counted after
# the command name (which may contain spaces).
CLK_TCK=$(getconf CLK_TCK)
cpu_ticks() {
    local line
    read -r line 2>/dev/null <"/proc/$1/stat" || {
        echo 0
        return
    }
    line=${line##*) }
    awk '{ print $12 + $13 }' <<<"$line"
}
# cpu_per_gib TICKS MIB -> CPU seconds per GiB moved
cpu_per_gib() { awk -v t="$1" -v hz="$CLK_TCK" -v m="$2" 'BEGIN { printf "%.2f", t / hz / (m / 1024) }'; }

# hwm -> peak resident set (VmHWM) of the running pullcache, in KiB.
hwm() { awk '/^VmHWM:/ { print $2 }' "/proc/$PC_PID/status"; }

# Byte offset of the upstream registry's log once everything requested so far
# has been logged (a uniquely named request is waited for; the registry logs a
# request when its response completes).
reg_log_mark() {
    local tag
    tag="sentinel$(date +%s%N)"
    curl -s -o /dev/null --noproxy '*' --max-time 5 --cacert "$PKI/testca.crt" \
        "https://127.0.0.1:$REG_PORT/v2/$tag/tags/list" || true
    pc_wait_until 15 grep -q "/v2/$tag/" "$REG_LOG" || pc_die "registry log sentinel not seen"
    stat -c %s "$REG_LOG"
}
# upstream_count FROM TO METHOD REPO DIGEST -> requests in the access log between marks
upstream_count() {
    tail -c +"$(($1 + 1))" "$REG_LOG" | head -c "$(($2 - $1))" |
        grep -c "\"$3 /v2/$4/blobs/$5 HTTP" || true
}

# fetch MODE N REPO DIGEST SIZE: N concurrent curls of one blob, output to
# /dev/null, MODE direct (registry, --connect-to) or proxy (through pullcache).
# Checks every client got 200 and SIZE bytes.  Sets BATCH_SECS (wall time of
# the batch), BATCH_T0/BATCH_T1 (its start and end), BATCH_TTFB (median time
# to first byte), BATCH_XCACHE, and the CPU ticks the servers spent meanwhile:
# BATCH_CPU_PC (pullcache), BATCH_CPU_REG (its upstream registry),
# BATCH_CPU_DREG (the direct registry).
fetch() {
    local mode="$1" n="$2" repo="$3" digest="$4" size="$5" tok d i t0 t1 rc code got ttfb conn=()
    case "$mode" in
        direct) conn=(--noproxy '*' --connect-to "$HUB:443:127.0.0.1:$DREG_PORT" --cacert "$PKI/testca.crt") ;;
        proxy) conn=(--proxy "http://127.0.0.1:$PPORT" --cacert "$PC_CA") ;;
        *) pc_die "fetch: bad mode $mode" ;;
    esac
    tok=$(token "repository:$repo:pull")
    d=$(mktemp -d "$W/batch.XXXXXX")
    BATCH_PIDS=()
    local c0_pc c0_reg c0_dreg
    c0_pc=$(cpu_ticks "${PC_PID:-0}")
    c0_reg=$(cpu_ticks "$REG_PID")
    c0_dreg=$(cpu_ticks "$DREG_PID")
    t0=$(pc_now)
    for ((i = 0; i < n; i++)); do
        # --http1.1: what pullcache speaks on both sides; the baseline uses the same.
        curl -sS --http1.1 --max-time "$CURL_MAX" "${conn[@]}" -H "Authorization: Bearer $tok" \
            -o /dev/null -D "$d/$i.h" -w '%{http_code} %{size_download} %{time_starttransfer}\n' \
            "https://$HUB/v2/$repo/blobs/$digest" >"$d/$i.w" 2>"$d/$i.e" &
        BATCH_PIDS+=("$!")
    done
    for ((i = 0; i < n; i++)); do
        rc=0
        wait "${BATCH_PIDS[$i]}" || rc=$?
        echo "$rc" >"$d/$i.rc"
    done
    t1=$(pc_now)
    BATCH_CPU_PC=$(($(cpu_ticks "${PC_PID:-0}") - c0_pc))
    BATCH_CPU_REG=$(($(cpu_ticks "$REG_PID") - c0_reg))
    BATCH_CPU_DREG=$(($(cpu_ticks "$DREG_PID") - c0_dreg))
    BATCH_PIDS=()
    local ttfbs=()
    for ((i = 0; i < n; i++)); do
        code="" got="" ttfb=""
        read -r code got ttfb <"$d/$i.w" || true
        if [ "$(cat "$d/$i.rc")" != 0 ] || [ "${code:-}" != 200 ] || [ "${got:-}" != "$size" ]; then
            cat "$d/$i.e" "$d/$i.h" >&2 || true
            [ "$mode" = direct ] || pc_show_log "$PC_PROXY_LOG" 30 >&2
            pc_die "$mode client $i/$n: exit $(cat "$d/$i.rc"), HTTP ${code:-?}, ${got:-?} of $size bytes"
        fi
        ttfbs+=("$ttfb")
    done
    BATCH_SECS=$(secs "$t0" "$t1")
    BATCH_T0=$t0
    BATCH_T1=$t1
    BATCH_TTFB=$(median "${ttfbs[@]}")
    BATCH_XCACHE=$(cat "$d"/*.h | tr -d '\r' | awk -F': *' 'tolower($1) == "x-cache" { c[$2]++ }
        END { for (k in c) { printf "%s%s*%d", sep, k, c[k]; sep = "," } }')
    rm -rf "$d"
}

# verify_sha MODE REPO DIGEST: one untimed fetch piped through sha256sum.
verify_sha() {
    local mode="$1" repo="$2" digest="$3" tok got conn=()
    case "$mode" in
        direct) conn=(--noproxy '*' --connect-to "$HUB:443:127.0.0.1:$DREG_PORT" --cacert "$PKI/testca.crt") ;;
        proxy) conn=(--proxy "http://127.0.0.1:$PPORT" --cacert "$PC_CA") ;;
    esac
    tok=$(token "repository:$repo:pull")
    got=$(curl -fsS --http1.1 --max-time "$CURL_MAX" "${conn[@]}" -H "Authorization: Bearer $tok" \
        "https://$HUB/v2/$repo/blobs/$digest" | sha256_hex)
    [ "sha256:$got" = "$digest" ] || pc_die "$mode fetch of $digest hashed to sha256:$got"
    pc_log "sha256 verified ($mode): $digest"
}

# row LABEL MIB SECS... : one line of raw runs, median, throughput.
row() {
    local label="$1" mib="$2" m
    shift 2
    m=$(median "$@")
    printf '  %-44s runs %-24s median %7.3f s  %8s MiB/s\n' "$label" "$(list "$@")" "$m" "$(mibps "$mib" "$m")"
}

# --- 3. cold fill (and the instance it leaves warm) ------------------------------------

pc_section "cold fill: first fetch of a $BLOB_MIB MiB blob through an empty pullcache vs direct"
BIG_BYTES=$((BLOB_MIB * 1048576))
D_COLD=()
P_COLD=()
P_COLD_TTFB=()
D_COLD_TTFB=()
HWM_START=()
HWM_COLD_BIG=()
CPU_COLD_PC=()
CPU_COLD_REG=()
CPU_COLD_DREG=()
PH_HEAD=()
PH_STREAM=()
PH_COMMIT=()
PH_TAIL=()
for ((r = 1; r <= REPS; r++)); do
    fetch direct 1 "$REPO_BIG" "$BIG_DIGEST" "$BIG_BYTES"
    D_COLD+=("$BATCH_SECS")
    D_COLD_TTFB+=("$BATCH_TTFB")
    CPU_COLD_DREG+=("$BATCH_CPU_DREG")
    fresh_pullcache
    HWM_START+=("$(hwm)")
    m0=$(reg_log_mark)
    # Where the time goes, from the temp file's life (diagnostic only).
    rm -f "$W/watch.ready"
    python3 "$FILLWATCH" "$W/pc-cache/tmp" "$BIG_BYTES" "$W/watch.ready" "$CURL_MAX" >"$W/watch.out" &
    WATCH_PID=$!
    pc_wait_until 10 test -e "$W/watch.ready" || pc_die "fillwatch did not start"
    fetch proxy 1 "$REPO_BIG" "$BIG_DIGEST" "$BIG_BYTES"
    P_COLD+=("$BATCH_SECS")
    P_COLD_TTFB+=("$BATCH_TTFB")
    CPU_COLD_PC+=("$BATCH_CPU_PC")
    CPU_COLD_REG+=("$BATCH_CPU_REG")
    HWM_COLD_BIG+=("$(hwm)")
    pc_wait_until 10 _pc_gone "$WATCH_PID" || kill "$WATCH_PID" 2>/dev/null || true
    wait "$WATCH_PID" 2>/dev/null || true
    WATCH_PID=""
    seen=- full=- gone=-
    read -r seen full gone <"$W/watch.out" || true
    phases="n/a (temp file not observed)"
    if [ "${seen:--}" != - ] && [ "${full:--}" != - ] && [ "${gone:--}" != - ]; then
        PH_HEAD+=("$(secs "$BATCH_T0" "$seen")")
        PH_STREAM+=("$(secs "$seen" "$full")")
        PH_COMMIT+=("$(secs "$full" "$gone")")
        PH_TAIL+=("$(secs "$gone" "$BATCH_T1")")
        phases="to temp file ${PH_HEAD[-1]} s, download+hash+write ${PH_STREAM[-1]} s, fsync+commit ${PH_COMMIT[-1]} s, to client end ${PH_TAIL[-1]} s"
    fi
    m1=$(reg_log_mark)
    printf '  run %d: direct %.3f s, pullcache cold %.3f s (X-Cache %s, upstream blob GETs %s), VmHWM %s KiB\n' \
        "$r" "${D_COLD[-1]}" "$BATCH_SECS" "$BATCH_XCACHE" \
        "$(upstream_count "$m0" "$m1" GET "$REPO_BIG" "$BIG_DIGEST")" "${HWM_COLD_BIG[-1]}"
    printf '         cold fill timeline: %s\n' "$phases"
done
row "direct" "$BLOB_MIB" "${D_COLD[@]}"
row "pullcache cold (MISS)" "$BLOB_MIB" "${P_COLD[@]}"
printf '  time to first byte (median): direct %s s, pullcache cold %s s\n' \
    "$(median "${D_COLD_TTFB[@]}")" "$(median "${P_COLD_TTFB[@]}")"
if [ "${#PH_STREAM[@]}" -gt 0 ]; then
    printf '  cold fill timeline (median): to temp file %s s, download+hash+write %s s (%s MiB/s), fsync+commit %s s, to client end %s s\n' \
        "$(median "${PH_HEAD[@]}")" "$(median "${PH_STREAM[@]}")" "$(mibps "$BLOB_MIB" "$(median "${PH_STREAM[@]}")")" \
        "$(median "${PH_COMMIT[@]}")" "$(median "${PH_TAIL[@]}")"
fi
printf '  server CPU per GiB (median): direct registry %s s; cold: pullcache %s s + its upstream registry %s s\n' \
    "$(cpu_per_gib "$(median "${CPU_COLD_DREG[@]}")" "$BLOB_MIB")" \
    "$(cpu_per_gib "$(median "${CPU_COLD_PC[@]}")" "$BLOB_MIB")" \
    "$(cpu_per_gib "$(median "${CPU_COLD_REG[@]}")" "$BLOB_MIB")"
cold_d=$(median "${D_COLD[@]}")
cold_p=$(median "${P_COLD[@]}")
printf '  ratio pullcache-cold/direct: time %s, throughput %s\n' \
    "$(ratio "$cold_p" "$cold_d")" "$(ratio "$cold_d" "$cold_p")"
srow 3 "cold fill ${BLOB_MIB} MiB, 1 client" "$(mibps "$BLOB_MIB" "$cold_d") MiB/s" "$(mibps "$BLOB_MIB" "$cold_p") MiB/s" \
    "$(ratio "$cold_d" "$cold_p")" "${cold_d}s vs ${cold_p}s"
if [ "${#PH_STREAM[@]}" -gt 0 ]; then
    sline 3 "" "$(printf 'fill: download+hash+write %ss, fsync+commit %ss; CPU s/GiB: registry %s, pullcache %s' \
        "$(median "${PH_STREAM[@]}")" "$(median "${PH_COMMIT[@]}")" \
        "$(cpu_per_gib "$(median "${CPU_COLD_DREG[@]}")" "$BLOB_MIB")" "$(cpu_per_gib "$(median "${CPU_COLD_PC[@]}")" "$BLOB_MIB")")"
fi

# --- 1. cached blob throughput ------------------------------------------------------------

pc_section "cached blob: $BLOB_MIB MiB, direct vs pullcache HIT"
# The last cold fill left the blob in this instance's cache; one more fetch
# checks what the cache serves, byte for byte.
verify_sha proxy "$REPO_BIG" "$BIG_DIGEST"
HWM_BEFORE_HITS=$(hwm)
D_HIT=()
P_HIT=()
CPU_HIT_D=()
CPU_HIT_P=()
for ((r = 1; r <= REPS; r++)); do
    fetch direct 1 "$REPO_BIG" "$BIG_DIGEST" "$BIG_BYTES"
    D_HIT+=("$BATCH_SECS")
    CPU_HIT_D+=("$BATCH_CPU_DREG")
    fetch proxy 1 "$REPO_BIG" "$BIG_DIGEST" "$BIG_BYTES"
    P_HIT+=("$BATCH_SECS")
    CPU_HIT_P+=("$BATCH_CPU_PC")
    [ "$BATCH_XCACHE" = "HIT*1" ] || pc_log "warning: expected X-Cache HIT, got $BATCH_XCACHE"
done
row "direct, 1 client" "$BLOB_MIB" "${D_HIT[@]}"
row "pullcache HIT, 1 client" "$BLOB_MIB" "${P_HIT[@]}"
hit_d=$(median "${D_HIT[@]}")
hit_p=$(median "${P_HIT[@]}")
hit_cpu_d=$(cpu_per_gib "$(median "${CPU_HIT_D[@]}")" "$BLOB_MIB")
hit_cpu_p=$(cpu_per_gib "$(median "${CPU_HIT_P[@]}")" "$BLOB_MIB")
printf '  server CPU per GiB (median): registry %s s, pullcache %s s\n' "$hit_cpu_d" "$hit_cpu_p"
printf '  ratio pullcache/direct throughput: %s\n' "$(ratio "$hit_d" "$hit_p")"
srow 1a "cached ${BLOB_MIB} MiB, 1 client" "$(mibps "$BLOB_MIB" "$hit_d") MiB/s" "$(mibps "$BLOB_MIB" "$hit_p") MiB/s" \
    "$(ratio "$hit_d" "$hit_p")" "${hit_d}s vs ${hit_p}s; CPU s/GiB: registry $hit_cpu_d, pullcache $hit_cpu_p"

HWM_BEFORE_CONC=$(hwm)
D_CONC=()
P_CONC=()
CPU_CONC_D=()
CPU_CONC_P=()
for ((r = 1; r <= REPS; r++)); do
    fetch direct "$CLIENTS" "$REPO_BIG" "$BIG_DIGEST" "$BIG_BYTES"
    D_CONC+=("$BATCH_SECS")
    CPU_CONC_D+=("$BATCH_CPU_DREG")
    fetch proxy "$CLIENTS" "$REPO_BIG" "$BIG_DIGEST" "$BIG_BYTES"
    P_CONC+=("$BATCH_SECS")
    CPU_CONC_P+=("$BATCH_CPU_PC")
    [ "$BATCH_XCACHE" = "HIT*$CLIENTS" ] || pc_log "warning: expected X-Cache HIT*$CLIENTS, got $BATCH_XCACHE"
done
HWM_AFTER_CONC=$(hwm)
conc_mib=$((CLIENTS * BLOB_MIB))
row "direct, $CLIENTS clients (aggregate)" "$conc_mib" "${D_CONC[@]}"
row "pullcache HIT, $CLIENTS clients (aggregate)" "$conc_mib" "${P_CONC[@]}"
conc_d=$(median "${D_CONC[@]}")
conc_p=$(median "${P_CONC[@]}")
conc_cpu_d=$(cpu_per_gib "$(median "${CPU_CONC_D[@]}")" "$conc_mib")
conc_cpu_p=$(cpu_per_gib "$(median "${CPU_CONC_P[@]}")" "$conc_mib")
printf '  server CPU per GiB (median): registry %s s, pullcache %s s\n' "$conc_cpu_d" "$conc_cpu_p"
printf '  ratio pullcache/direct throughput: %s\n' "$(ratio "$conc_d" "$conc_p")"
srow 1b "cached ${BLOB_MIB} MiB, $CLIENTS clients" "$(mibps "$conc_mib" "$conc_d") MiB/s" "$(mibps "$conc_mib" "$conc_p") MiB/s" \
    "$(ratio "$conc_d" "$conc_p")" "aggregate; ${conc_d}s vs ${conc_p}s; CPU s/GiB: registry $conc_cpu_d, pullcache $conc_cpu_p"

# --- 4. coalescing ------------------------------------------------------------------------

pc_section "coalescing: $CO_CLIENTS concurrent cold clients on one $CO_MIB MiB blob vs 1 cold client"
fresh_pullcache
verify_sha proxy "$REPO_CO" "$CO_DIGEST"
CO_BYTES=$((CO_MIB * 1048576))
S_CO=()
M_CO=()
D_CO=()
GETS_SINGLE=()
GETS_MANY=()
HWM_COLD_SMALL=()
HWM_COALESCED=()
XC_MANY=()
CPU_CO_P=()
CPU_CO_D=()
for ((r = 1; r <= REPS; r++)); do
    fetch direct "$CO_CLIENTS" "$REPO_CO" "$CO_DIGEST" "$CO_BYTES"
    D_CO+=("$BATCH_SECS")
    CPU_CO_D+=("$BATCH_CPU_DREG")
    fresh_pullcache
    m0=$(reg_log_mark)
    fetch proxy 1 "$REPO_CO" "$CO_DIGEST" "$CO_BYTES"
    S_CO+=("$BATCH_SECS")
    m1=$(reg_log_mark)
    GETS_SINGLE+=("$(upstream_count "$m0" "$m1" GET "$REPO_CO" "$CO_DIGEST")")
    HWM_COLD_SMALL+=("$(hwm)")
    fresh_pullcache
    m0=$(reg_log_mark)
    fetch proxy "$CO_CLIENTS" "$REPO_CO" "$CO_DIGEST" "$CO_BYTES"
    M_CO+=("$BATCH_SECS")
    CPU_CO_P+=("$BATCH_CPU_PC")
    XC_MANY+=("$BATCH_XCACHE")
    m1=$(reg_log_mark)
    GETS_MANY+=("$(upstream_count "$m0" "$m1" GET "$REPO_CO" "$CO_DIGEST")")
    HWM_COALESCED+=("$(hwm)")
    printf '  run %d: 1 cold client %.3f s (upstream GETs %s) | %d cold clients %.3f s (upstream GETs %s, X-Cache %s, upstream HEADs %s) | %d direct %.3f s\n' \
        "$r" "${S_CO[-1]}" "${GETS_SINGLE[-1]}" "$CO_CLIENTS" "$BATCH_SECS" "${GETS_MANY[-1]}" "$BATCH_XCACHE" \
        "$(upstream_count "$m0" "$m1" HEAD "$REPO_CO" "$CO_DIGEST")" "$CO_CLIENTS" "${D_CO[-1]}"
done
row "pullcache, 1 cold client" "$CO_MIB" "${S_CO[@]}"
row "pullcache, $CO_CLIENTS cold clients (aggregate)" "$((CO_CLIENTS * CO_MIB))" "${M_CO[@]}"
row "direct, $CO_CLIENTS clients (aggregate, reference)" "$((CO_CLIENTS * CO_MIB))" "${D_CO[@]}"
co_s=$(median "${S_CO[@]}")
co_m=$(median "${M_CO[@]}")
co_d=$(median "${D_CO[@]}")
printf '  upstream blob GETs per run: %d clients: %s; 1 client: %s (expected 1 each)\n' \
    "$CO_CLIENTS" "$(list "${GETS_MANY[@]}")" "$(list "${GETS_SINGLE[@]}")"
printf '  server CPU per GiB delivered (median): %d direct clients: registry %s s; %d cold clients: pullcache %s s\n' \
    "$CO_CLIENTS" "$(cpu_per_gib "$(median "${CPU_CO_D[@]}")" "$((CO_CLIENTS * CO_MIB))")" \
    "$CO_CLIENTS" "$(cpu_per_gib "$(median "${CPU_CO_P[@]}")" "$((CO_CLIENTS * CO_MIB))")"
printf '  ratio wall time %d clients / 1 client: %s (%d x the bytes delivered); vs %d direct clients: %s\n' \
    "$CO_CLIENTS" "$(ratio "$co_m" "$co_s")" "$CO_CLIENTS" "$CO_CLIENTS" "$(ratio "$co_m" "$co_d")"
sline 4 "coalescing $CO_CLIENTS cold x ${CO_MIB} MiB" "$(printf 'upstream blob GETs per run %s; wall %ss vs 1 cold client %ss = %sx (for %dx the bytes); %d direct clients %ss' \
    "$(list "${GETS_MANY[@]}" | tr ' ' ,)" "$co_m" "$co_s" "$(ratio "$co_m" "$co_s")" "$CO_CLIENTS" "$CO_CLIENTS" "$co_d")"

# --- 5. skopeo image pulls -------------------------------------------------------------------

pc_section "skopeo: pull of $REPO_IMG:v1 ($IMG_LAYERS x $IMG_LAYER_MIB MiB layers)"
# skopeo_pull direct|proxy DEST: sets SK_SECS.
skopeo_pull() {
    local t0 t1
    t0=$(pc_now)
    if [ "$1" = direct ]; then
        pc_skopeo copy --quiet --src-no-creds --src-cert-dir "$PKI/certdir" \
            "docker://127.0.0.1:$DREG_PORT/$REPO_IMG:v1" "oci:$2:v1"
    else
        HTTPS_PROXY="http://127.0.0.1:$PPORT" SSL_CERT_FILE="$BUNDLE" pc_skopeo copy --quiet --src-no-creds \
            "docker://docker.io/$REPO_IMG:v1" "oci:$2:v1"
    fi
    t1=$(pc_now)
    # Checked after the clock stopped: every blob re-hashed against the push.
    [ "$(python3 "$OCITOOL" inspect "$2" v1)" = "$(cat "$W/image.json")" ] || pc_die "$1 pull into $2 differs from the pushed image"
    rm -rf "$2"
    SK_SECS=$(secs "$t0" "$t1")
}
K_D=()
K_C=()
K_W=()
for ((r = 1; r <= REPS; r++)); do
    skopeo_pull direct "$W/pull-direct"
    K_D+=("$SK_SECS")
    fresh_pullcache
    skopeo_pull proxy "$W/pull-cold"
    K_C+=("$SK_SECS")
    m0=$(reg_log_mark)
    skopeo_pull proxy "$W/pull-warm"
    K_W+=("$SK_SECS")
    m1=$(reg_log_mark)
    printf '  run %d: direct %.3f s, cold %.3f s, warm %.3f s (upstream blob GETs during warm: %s)\n' \
        "$r" "${K_D[-1]}" "${K_C[-1]}" "${K_W[-1]}" \
        "$(tail -c +"$((m0 + 1))" "$REG_LOG" | head -c "$((m1 - m0))" | grep -c '"GET /v2/[^ ]*/blobs/' || true)"
done
row "direct" "$IMG_MIB" "${K_D[@]}"
row "pullcache cold" "$IMG_MIB" "${K_C[@]}"
row "pullcache warm" "$IMG_MIB" "${K_W[@]}"
k_d=$(median "${K_D[@]}")
k_c=$(median "${K_C[@]}")
k_w=$(median "${K_W[@]}")
printf '  ratio time cold/direct %s, warm/direct %s\n' "$(ratio "$k_c" "$k_d")" "$(ratio "$k_w" "$k_d")"
sline 5 "skopeo pull ${IMG_LAYERS} x ${IMG_LAYER_MIB} MiB" "$(printf 'direct %ss; pullcache cold %ss (time ratio %s), warm %ss (time ratio %s)' \
    "$k_d" "$k_c" "$(ratio "$k_c" "$k_d")" "$k_w" "$(ratio "$k_w" "$k_d")")"

# --- 2. memory ---------------------------------------------------------------------------------

pc_section "pullcache peak memory (VmHWM, KiB; medians over runs where repeated)"
printf '  %-52s %10s\n' \
    "fresh process, idle" "$(median_int "${HWM_START[@]}")" \
    "after cold fill of $CO_MIB MiB (1 client)" "$(median_int "${HWM_COLD_SMALL[@]}")" \
    "after coalesced cold fill of $CO_MIB MiB ($CO_CLIENTS clients)" "$(median_int "${HWM_COALESCED[@]}")" \
    "after cold fill of $BLOB_MIB MiB (1 client)" "$(median_int "${HWM_COLD_BIG[@]}")" \
    "before streaming cached $BLOB_MIB MiB" "$HWM_BEFORE_HITS" \
    "before streaming cached $BLOB_MIB MiB x $CLIENTS concurrently" "$HWM_BEFORE_CONC" \
    "after streaming cached $BLOB_MIB MiB x $CLIENTS concurrently" "$HWM_AFTER_CONC"
printf '  raw: idle %s | cold %s MiB %s | coalesced %s | cold %s MiB %s\n' \
    "$(list "${HWM_START[@]}")" "$CO_MIB" "$(list "${HWM_COLD_SMALL[@]}")" "$(list "${HWM_COALESCED[@]}")" \
    "$BLOB_MIB" "$(list "${HWM_COLD_BIG[@]}")"
sline 2 "pullcache VmHWM (KiB)" "$(printf 'idle %s; after cold fill %s MiB %s, %s MiB %s; %d coalesced %s' \
    "$(median_int "${HWM_START[@]}")" "$CO_MIB" "$(median_int "${HWM_COLD_SMALL[@]}")" \
    "$BLOB_MIB" "$(median_int "${HWM_COLD_BIG[@]}")" "$CO_CLIENTS" "$(median_int "${HWM_COALESCED[@]}")")"
sline 2 "" "$(printf 'cached %s MiB x %d concurrently: before %s, after %s' "$BLOB_MIB" "$CLIENTS" "$HWM_BEFORE_CONC" "$HWM_AFTER_CONC")"

if pc_strip_ansi <"$PC_PROXY_LOG" | grep -q 'panicked at'; then
    pc_log "warning: the last pullcache log shows a panic"
fi

# --- summary -----------------------------------------------------------------------------------

OUT="$(pc_cargo_target_dir)/bench-summary.txt"
{
    echo "pullcache bench summary ($(date -u +%Y-%m-%dT%H:%M:%SZ), $(git -C "$PC_REPO_ROOT" describe --always --dirty 2>/dev/null || echo '?'))"
    printf '%s CPUs, work dir on %s, %d runs each, medians; throughput ratio = pullcache/direct (> 1: pullcache faster)\n' \
        "$(nproc)" "$(stat -f -c %T "$W")" "$REPS"
    printf '%-3s %-31s %12s %12s %6s  %s\n' "" "" direct pullcache ratio "median seconds direct vs pullcache"
    printf '%s\n' "${SUMMARY[@]}" | sort -s -k1,1
} >"$W/summary.txt"
pc_section "summary"
cat "$W/summary.txt"
mkdir -p "$(dirname "$OUT")"
cp "$W/summary.txt" "$OUT"
pc_log "summary written to $OUT"
