# shellcheck shell=bash
# Shared helpers for pullcache's test scripts (e2e.sh, test.sh, bench.sh, ...).
# Source it; it defines functions and a few variables, and runs nothing else.
#
#   PC_LIB_DIR      directory of this file
#   PC_REPO_ROOT    repository root

PC_LIB_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PC_REPO_ROOT="$(cd "$PC_LIB_DIR/../.." && pwd)"
export PC_LIB_DIR PC_REPO_ROOT

# --- logging -----------------------------------------------------------------

pc_log() { printf '%s %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
pc_die() { pc_log "ERROR: $*"; exit 1; }
pc_section() { printf '\n==== %s ====\n' "$*"; }

# Seconds since the epoch with sub-second precision (for timings).
pc_now() { date +%s.%N; }
# pc_elapsed START [END] -> seconds with one decimal.
pc_elapsed() { awk -v s="$1" -v e="${2:-$(pc_now)}" 'BEGIN { printf "%.2f", e - s }'; }

# --- packages ------------------------------------------------------------------

# Debian packages the e2e tests need.  Checked with dpkg (a few ms each), so
# apt is not touched at all when everything is already installed.
PC_APT_PACKAGES=(docker-registry skopeo openssl ca-certificates python3 curl)

pc_ensure_packages() {
    local missing=() p
    for p in "${PC_APT_PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' \
            || missing+=("$p")
    done
    if [ "${#missing[@]}" -eq 0 ]; then
        return 0
    fi
    pc_log "installing missing packages: ${missing[*]}"
    local sudo=()
    if [ "$(id -u)" -ne 0 ]; then
        command -v sudo >/dev/null || pc_die "not root and no sudo; install: ${missing[*]}"
        sudo=(sudo)
    fi
    # update once per run, then install only what is missing.
    DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get update -q
    DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -q --no-install-recommends "${missing[@]}"
}

# --- processes -----------------------------------------------------------------

# Every background process a script starts is recorded in $PC_PIDFILE (one
# "PID NAME" per line) so that pc_cleanup_pids can stop them from an EXIT trap,
# even when they were started in a subshell.
: "${PC_PIDFILE:=}"

pc_track_pid() { # PID NAME
    [ -n "$PC_PIDFILE" ] || pc_die "PC_PIDFILE not set"
    printf '%s %s\n' "$1" "$2" >>"$PC_PIDFILE"
}

# pc_spawn NAME LOGFILE CMD... -> prints the PID; output and stdin detached so
# that the process never holds a caller's pipe open.
pc_spawn() {
    local name="$1" log="$2"
    shift 2
    "$@" </dev/null >>"$log" 2>&1 &
    local pid=$!
    pc_track_pid "$pid" "$name"
    echo "$pid"
}

# Stop one process: TERM, wait up to ~5s, then KILL.
pc_stop_pid() { # PID [NAME]
    local pid="$1"
    pc_alive "$pid" || return 0
    kill -TERM "$pid" 2>/dev/null || true
    pc_wait_until 5 _pc_gone "$pid" && return 0
    pc_log "process ${2:-$pid} ($pid) ignored SIGTERM; killing"
    kill -KILL "$pid" 2>/dev/null || true
}

pc_cleanup_pids() {
    [ -n "$PC_PIDFILE" ] && [ -f "$PC_PIDFILE" ] || return 0
    local pid name
    # Reverse start order: proxy before the services it talks to.
    while read -r pid name; do
        [ -n "$pid" ] && pc_stop_pid "$pid" "$name"
    done < <(tac "$PC_PIDFILE")
    : >"$PC_PIDFILE"
}

# Process state letter from /proc (R, S, Z, ...), empty if there is no such
# process.  The command name in field 2 may contain spaces, hence the strip up
# to the last ")".
_pc_proc_state() {
    local line
    read -r line 2>/dev/null <"/proc/$1/stat" || return 0
    line=${line##*) }
    echo "${line%% *}"
}

# Alive = exists and is not a zombie.  `kill -0` alone is not enough: our
# services are reparented to PID 1 when the subshell that started them exits,
# and a zombie waiting for PID 1 to reap it still answers kill -0.
pc_alive() {
    local st
    st=$(_pc_proc_state "$1")
    [ -n "$st" ] && [ "$st" != Z ] && [ "$st" != X ]
}
_pc_gone() { ! pc_alive "$1"; }

# PIDs of the direct children of PID (from /proc; procps may be absent).
_pc_children() {
    local f line rest
    for f in /proc/[0-9]*/stat; do
        read -r line 2>/dev/null <"$f" || continue
        rest=${line##*) }
        rest=${rest#* }
        if [ "${rest%% *}" = "$1" ]; then
            f=${f#/proc/}
            echo "${f%/stat}"
        fi
    done
}

# pc_kill_tree PID: stop PID and all its descendants (TERM, then KILL after a
# bounded wait).  The tree is collected first so that reparenting cannot hide
# grandchildren.
pc_kill_tree() {
    local all=("$1") i=0 c p
    while [ "$i" -lt "${#all[@]}" ]; do
        for c in $(_pc_children "${all[$i]}"); do all+=("$c"); done
        i=$((i + 1))
    done
    for p in "${all[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
    for p in "${all[@]}"; do
        pc_wait_until 5 _pc_gone "$p" || kill -KILL "$p" 2>/dev/null || true
    done
}

# --- ports and waiting ---------------------------------------------------------

# A currently free loopback port.  The kernel picks it (bind to port 0); there
# is a small window before the caller binds it, so callers that must pass a
# port to a program retry on a bind failure.
pc_free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'
}

# pc_wait_until TIMEOUT_SECONDS CMD... : poll CMD every 0.1s until it succeeds
# or the time is up (returns 1).  The only way the scripts wait for anything.
pc_wait_until() {
    local timeout="$1"
    shift
    local deadline
    deadline=$(($(date +%s%N) + timeout * 1000000000))
    while :; do
        if "$@"; then return 0; fi
        if [ "$(date +%s%N)" -ge "$deadline" ]; then return 1; fi
        sleep 0.1
    done
}

# pc_wait_port_open PORT [TIMEOUT]
pc_wait_port_open() {
    pc_wait_until "${2:-20}" bash -c "exec 3<>/dev/tcp/127.0.0.1/$1" 2>/dev/null
}

# pc_strip_ansi < in > out
pc_strip_ansi() { sed -e 's/\x1b\[[0-9;]*[A-Za-z]//g'; }

# pc_wait_log_match FILE ERE TIMEOUT [PID] -> prints the first match (after
# stripping colour codes).  Fails early if PID dies.
pc_wait_log_match() {
    local file="$1" re="$2" timeout="$3" pid="${4:-}" deadline line
    deadline=$(($(date +%s%N) + timeout * 1000000000))
    while :; do
        if [ -f "$file" ]; then
            line=$(pc_strip_ansi <"$file" | grep -Eo -m1 -- "$re" || true)
            if [ -n "$line" ]; then
                printf '%s\n' "$line"
                return 0
            fi
        fi
        if [ -n "$pid" ] && ! pc_alive "$pid"; then
            pc_log "process $pid exited while waiting for /$re/ in $file"
            return 1
        fi
        if [ "$(date +%s%N)" -ge "$deadline" ]; then
            pc_log "timed out after ${timeout}s waiting for /$re/ in $file"
            return 1
        fi
        sleep 0.1
    done
}

# Print the last lines of a log for diagnosis.
pc_show_log() { # FILE [LINES]
    [ -f "$1" ] || return 0
    printf -- '----- last %s lines of %s -----\n' "${2:-40}" "$1"
    tail -n "${2:-40}" "$1" | pc_strip_ansi
    printf -- '----- end of %s -----\n' "$1"
}

# --- the pullcache binary ------------------------------------------------------

# Target directory as cargo sees it (honours CARGO_TARGET_DIR and config).
pc_cargo_target_dir() {
    if [ -n "${CARGO_TARGET_DIR:-}" ]; then
        echo "$CARGO_TARGET_DIR"
        return
    fi
    (cd "$PC_REPO_ROOT" && cargo metadata --format-version 1 --no-deps 2>/dev/null) |
        python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])' 2>/dev/null ||
        echo "$PC_REPO_ROOT/target"
}

# pc_pullcache_bin -> path of the binary to test: $PULLCACHE_BIN if set, else
# target/debug/pullcache (built by test.sh / cargo build).
pc_pullcache_bin() {
    if [ -n "${PULLCACHE_BIN:-}" ]; then
        echo "$PULLCACHE_BIN"
        return
    fi
    echo "$(pc_cargo_target_dir)/${PULLCACHE_PROFILE:-debug}/pullcache"
}
