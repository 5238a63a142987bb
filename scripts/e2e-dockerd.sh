#!/usr/bin/env bash
# End-to-end test of the client recipes (`pullcache setup`) with the real daemons, all on
# loopback:
#
#   docker CLI -> dockerd 20.10 --HTTPS_PROXY--> pullcache --TLS--> docker-registry 2.8
#   ctr (client-side pull) ------HTTPS_PROXY-->     |        (as registry-1.docker.io)
#                                                   +--tunnel--> tokenserver.py (auth.docker.io)
#
# The Docker-Hub-shaped fixture of scripts/e2e.sh (distribution registry with token auth as
# registry-1.docker.io, the token server as auth.docker.io, pullcache told where those names
# live with --connect-to). The daemons are configured by running the recipes themselves:
#
#   * dockerd-systemd: the recipe served at GET /setup/dockerd-systemd runs as root in a
#     private mount namespace whose /etc/ssl/certs, /usr/local/share/ca-certificates,
#     /etc/systemd/system, /etc/docker, /etc/containerd and /run are throw-away copies; its
#     `systemctl restart docker` is a stand-in that starts dockerd with exactly the
#     Environment= lines of the drop-in the recipe wrote. dockerd lives in that namespace, so
#     it trusts what the recipe put in the system store and nothing leaks to the host.
#   * containerd: the same, with containerd started from its drop-in; ctr runs inside that
#     namespace with HTTPS_PROXY as the recipe tells ctr users.
#   * gitlab-dind: a second dockerd plays the docker:dind service: the CA bind-mounted as a
#     PEM in /etc/ssl/certs (the runner volume line, no update-ca-certificates), proxy
#     variables from the printed .gitlab-ci.yml; the "job" docker CLI reaches it as tcp://docker
#     with those variables, and fails without `docker` in NO_PROXY.
#   * daemon-json: refused on Engine 20.10 (which cannot read "proxies"); the merge is checked.
#
# dockerd runs without systemd: --iptables=false --bridge=none --storage-driver=vfs, its
# own data/exec roots and sockets under the work directory. Every process is stopped and
# every mount and directory removed in the EXIT trap.
#
# Ends with `dockerd-e2e: N passed, M failed` (exit non-zero on any failure), or
# `dockerd-e2e: SKIP (reason)` (exit 0) when this kernel cannot run dockerd.
#
# Environment knobs:
#   PULLCACHE_BIN=PATH   binary to test (default: cargo build, target/debug)
#   E2E_NO_BUILD=1       do not run `cargo build --bin pullcache` first
#   E2E_KEEP=1           keep the work directory (processes are still stopped)
#   E2E_VERBOSE=1        show every step's output, not just failing ones
#   PC_DOCKER_TIMEOUT=S  bound for one docker/ctr command (default 180)
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
DOCKER=/usr/bin/docker # Debian's CLI, the same release as its dockerd
: "${PC_DOCKER_TIMEOUT:=180}"

unset HTTP_PROXY HTTPS_PROXY ALL_PROXY NO_PROXY http_proxy https_proxy all_proxy no_proxy
unset SSL_CERT_FILE SSL_CERT_DIR DOCKER_HOST DOCKER_TLS_VERIFY DOCKER_CERT_PATH DOCKER_CONTEXT
for v in $(compgen -e | grep '^PULLCACHE_' || true); do
    case "$v" in PULLCACHE_BIN | PULLCACHE_PROFILE) ;; *) unset "$v" ;; esac
done

if [ "$(id -u)" -ne 0 ]; then
    echo "dockerd-e2e: SKIP (needs root to run dockerd and mount namespaces)"
    exit 0
fi

PC_APT_PACKAGES+=(docker.io containerd runc util-linux)
pc_ensure_packages

# --- can this kernel run dockerd at all? -----------------------------------------------------
# Only a genuine kernel limitation is a SKIP; anything else is a failure below.
kernel_cannot() {
    if ! unshare --mount --propagation private --pid --fork --mount-proc true 2>/dev/null; then
        echo "mount/PID namespaces unavailable (unshare failed)"
        return 0
    fi
    if ! grep -q cgroup /proc/filesystems || ! grep -Eq ' /sys/fs/cgroup[ /]' /proc/mounts; then
        echo "no cgroup filesystem mounted"
        return 0
    fi
    if ! grep -qw tmpfs /proc/filesystems; then
        echo "no tmpfs filesystem"
        return 0
    fi
    return 1
}
if reason=$(kernel_cannot); then
    echo "dockerd-e2e: SKIP ($reason)"
    exit 0
fi

W=$(mktemp -d "${TMPDIR:-/tmp}/pullcache-dockerd-e2e.XXXXXX")
export PC_PIDFILE="$W/pids"
: >"$PC_PIDFILE"
STATE="$W/state.env"
: >"$STATE"
mkdir -p "$W/steps"

# Unmount anything still mounted under the work directory (deepest first). Daemons live in
# private mount namespaces that vanish with them; this is for what a daemon mounted in the
# host namespace anyway.
unmount_work() {
    local m
    while read -r m; do
        umount -l "$m" 2>/dev/null || true
    done < <(awk -v w="$W" 'index($2, w) == 1 { print $2 }' /proc/self/mounts | sort -r)
}

STEP_PID=""
on_exit() {
    local rc=$?
    [ -z "$STEP_PID" ] || pc_kill_tree "$STEP_PID"
    pc_cleanup_pids
    unmount_work
    if [ "${E2E_KEEP:-0}" = 1 ]; then
        pc_log "work directory kept: $W"
    else
        # vfs layers can hold read-only directories; make them removable first.
        chmod -R u+w "$W" 2>/dev/null || true
        rm -rf "$W"
    fi
    exit "$rc"
}
trap on_exit EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

pc_log "dockerd e2e work directory: $W"

# --- step runner (as in scripts/e2e.sh) ---------------------------------------------------
# shellcheck source=scripts/lib/steps.sh
source "$HERE/lib/steps.sh"

# (registry log helpers reg_log_mark, reg_log_between, blob_gets: scripts/lib/steps.sh)

# blobs_of JSON_FILE -> config and layer digests of an image (ocitool inspect output).
blobs_of() {
    python3 -c 'import json,sys; j=json.load(open(sys.argv[1])); print(" ".join([j["config"]]+j["layers"]))' "$1"
}
# multi_digest -> digest of the two-platform index in the built layout.
multi_digest() {
    python3 -c '
import json, sys
for m in json.load(open(sys.argv[1]))["manifests"]:
    if m.get("annotations", {}).get("org.opencontainers.image.ref.name") == "multi":
        print(m["digest"])' "$W/image/index.json"
}
json_field() { python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))[sys.argv[2]])' "$1" "$2"; }

# --- daemons in private mount namespaces -------------------------------------------------------
#
# ns_prepare DIR: writes DIR/enter.sh, run under `unshare -m`: it replaces every place a
# recipe writes with a private copy, and DIR/bin/systemctl, a stand-in that starts a unit's
# command (DIR/units/NAME) with the Environment= lines of its drop-ins, as systemd would.
ns_prepare() {
    local d="$1"
    mkdir -p "$d/bin" "$d/units" "$d/root" "$d/run"
    cat >"$d/enter.sh" <<'EOF'
#!/bin/bash
# enter.sh DIR CMD...: private copies of the system's config and trust dirs, then CMD.
set -euo pipefail
d="$1"
shift
mount --make-rprivate /
for p in /etc/ssl/certs /usr/local/share/ca-certificates; do
    mkdir -p "$d/root$p"
    cp -a "$p/." "$d/root$p/"
    mount --bind "$d/root$p" "$p"
done
# Empty: no unit drop-ins, no docker/containerd config, no ca-certificates hooks (the Java
# keystore hook would write outside), a fresh /run with systemd "running".
for p in /etc/systemd/system /etc/docker /etc/containerd /etc/ca-certificates/update.d; do
    mkdir -p "$d/root$p" "$p"
    mount --bind "$d/root$p" "$p"
done
mount -t tmpfs -o mode=755 pullcache-e2e-run /run
mkdir -p /run/systemd/system /run/lock
exec "$@"
EOF
    cat >"$d/bin/systemctl" <<'EOF'
#!/bin/bash
# systemctl stand-in for the e2e: daemon-reload, restart UNIT, show UNIT --property=Environment.
set -euo pipefail
d="$(cd "$(dirname "$0")/.." && pwd)"
echo "systemctl $*" >>"$d/systemctl.log"
unit_env() { # UNIT -> one NAME=VALUE per line, from the drop-ins in lexical order
    local f
    for f in /etc/systemd/system/"$1".service.d/*.conf; do
        [ -e "$f" ] || continue
        sed -n 's/^Environment="\(.*\)"$/\1/p' "$f"
    done
}
case "$1" in
    daemon-reload) ;;
    restart)
        unit="${2%.service}"
        [ -f "$d/units/$unit" ] || { echo "no such unit $unit" >&2; exit 5; }
        if [ -s "$d/$unit.pid" ]; then
            kill "$(cat "$d/$unit.pid")" 2>/dev/null || true
            for _ in $(seq 50); do kill -0 "$(cat "$d/$unit.pid")" 2>/dev/null || break; sleep 0.1; done
        fi
        mapfile -t envs < <(unit_env "$unit")
        mapfile -t cmd <"$d/units/$unit"
        printf '%s\n' "${envs[@]}" >"$d/$unit.env"
        env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin "${envs[@]}" \
            setsid "${cmd[@]}" </dev/null >>"$d/$unit.log" 2>&1 &
        echo $! >"$d/$unit.pid"
        [ -z "${PC_PIDFILE:-}" ] || echo "$! $unit" >>"$PC_PIDFILE"
        ;;
    show)
        printf 'Environment=%s\n' "$(unit_env "${2%.service}" | tr '\n' ' ')"
        ;;
    *) echo "systemctl stand-in: unsupported: $*" >&2; exit 1 ;;
esac
EOF
    chmod +x "$d/enter.sh" "$d/bin/systemctl"
}

# ns_unit DIR NAME CMD...: the command `systemctl restart NAME` runs (one word per line).
ns_unit() {
    local d="$1" name="$2"
    shift 2
    printf '%s\n' "$@" >"$d/units/$name"
}

# in_ns PID CMD...: run CMD in the mount namespace of PID (a daemon started there).
in_ns() {
    local pid="$1"
    shift
    nsenter -t "$pid" -m -- "$@"
}

dockerd_cmd() { # NAME -> argv of a dockerd without systemd, state under $W/NAME
    local n="$1"
    mkdir -p "$W/$n"
    printf '%s\n' dockerd --iptables=false --ip6tables=false --bridge=none \
        --storage-driver=vfs --data-root "$W/$n/data" --exec-root "$W/$n/exec" \
        --pidfile "$W/$n/dockerd.pid" -H "unix://$W/$n/docker.sock" \
        --containerd "$W/$n/containerd.sock"
}

containerd_config() { # DIR SOCKET -> DIR/containerd.toml
    cat >"$1/containerd.toml" <<EOF
version = 2
root = "$1/containerd-root"
state = "$1/containerd-state"
[grpc]
  address = "$2"
[ttrpc]
  address = "$2.ttrpc"
[debug]
  address = "$2.debug"
[plugins."io.containerd.grpc.v1.cri"]
  disable_tcp_service = true
EOF
}

# make_client_cert CRT KEY: a TLS client certificate from the test CA (the job's, for dind).
make_client_cert() {
    openssl ecparam -name prime256v1 -genkey -noout -out "$2" 2>/dev/null
    openssl req -new -key "$2" -subj /CN=job -out "$1.csr" 2>/dev/null
    printf '%s\n' 'basicConstraints=critical,CA:FALSE' 'keyUsage=critical,digitalSignature' \
        'extendedKeyUsage=clientAuth' >"$1.ext"
    openssl x509 -req -in "$1.csr" -CA "$PKI/testca.crt" -CAkey "$PKI/testca.key" \
        -set_serial "0x$(openssl rand -hex 8)" -sha256 -days 30 -extfile "$1.ext" -out "$1" 2>/dev/null
    rm -f "$1.csr" "$1.ext"
}

docker_cli() { # NAME ARGS... : Debian's docker CLI against dockerd NAME, bounded
    local n="$1"
    shift
    DOCKER_HOST="unix://$W/$n/docker.sock" DOCKER_CONFIG="$W/$n/cli-config" \
        timeout --kill-after=10 "$PC_DOCKER_TIMEOUT" "$DOCKER" "$@"
}

# --- steps: the Docker-Hub-shaped fixture (as in scripts/e2e.sh) -------------------------------

# (s_pki, s_tokenserver, s_registry_hub, s_registry_direct: scripts/lib/steps.sh)

s_build_images() {
    local img="$W/image"
    # A multi-layer image, and a two-platform index whose amd64 and arm64 images have their
    # own layers (so a warm pull of one cannot be served by the other's blobs).
    python3 "$OCITOOL" make "$img" v1 --layers 4 --layer-kib 512 >/dev/null
    python3 "$OCITOOL" inspect "$img" v1 >"$W/image-v1.json"
    python3 "$OCITOOL" make "$img" amd64 --arch amd64 --layers 2 --layer-kib 256 >/dev/null
    python3 "$OCITOOL" make "$img" arm64 --arch arm64 --layers 2 --layer-kib 256 >/dev/null
    python3 "$OCITOOL" inspect "$img" amd64 >"$W/image-amd64.json"
    python3 - "$img" <<'EOF'
import hashlib, json, os, sys
layout = sys.argv[1]
path = os.path.join(layout, "index.json")
idx = json.load(open(path))
by_tag = {m["annotations"]["org.opencontainers.image.ref.name"]: m for m in idx["manifests"]}
index = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
         "manifests": [{k: by_tag[t][k] for k in ("mediaType", "digest", "size", "platform")}
                       for t in ("amd64", "arm64")]}
data = json.dumps(index, separators=(",", ":")).encode()
digest = "sha256:" + hashlib.sha256(data).hexdigest()
open(os.path.join(layout, "blobs", "sha256", digest[7:]), "wb").write(data)
idx["manifests"].append({"mediaType": index["mediaType"], "digest": digest, "size": len(data),
                         "annotations": {"org.opencontainers.image.ref.name": "multi"}})
json.dump(idx, open(path, "w"))
print(digest)
EOF
    cat "$W/image-v1.json" "$W/image-amd64.json"
    state IMAGES 1
}

s_push_images() {
    local args=(--dest-creds user:secret --dest-cert-dir "$PKI/certdir")
    pc_skopeo copy --preserve-digests "${args[@]}" "oci:$W/image:v1" \
        "docker://127.0.0.1:$DREG_PORT/library/e2etest:v1"
    pc_skopeo copy --all --preserve-digests "${args[@]}" "oci:$W/image:multi" \
        "docker://127.0.0.1:$DREG_PORT/library/e2emulti:v1"
    pc_skopeo inspect --raw --creds user:secret --cert-dir "$PKI/certdir" \
        "docker://127.0.0.1:$DREG_PORT/library/e2emulti:v1" | tee "$W/multi-index.json"
    echo
    grep -q '"arm64"' "$W/multi-index.json" || fail "e2emulti:v1 is not a multi-platform index"
    state PUSHED 1
}

# (s_build_pullcache and s_start_pullcache: scripts/lib/steps.sh)

# --- steps: the recipes ----------------------------------------------------------------------

s_fetch_recipes() {
    local t
    mkdir -p "$W/recipes"
    curl -fsS --noproxy '*' --max-time 10 "http://127.0.0.1:$PPORT/setup" | tee "$W/recipes/index.txt"
    for t in dockerd-systemd daemon-json gitlab-dind containerd kind; do
        curl -fsS --noproxy '*' --max-time 10 -D "$W/recipes/$t.headers" \
            "http://127.0.0.1:$PPORT/setup/$t" -o "$W/recipes/$t.sh"
        grep -qi '^content-type: text/x-shellscript' "$W/recipes/$t.headers" ||
            fail "/setup/$t is not served as text/x-shellscript"
        # The CLI renders the same script for the same address.
        "$BIN" setup "$t" --ca-dir "$W/pc-ca" --proxy-url "http://127.0.0.1:$PPORT" >"$W/recipes/$t.cli.sh"
        cmp "$W/recipes/$t.sh" "$W/recipes/$t.cli.sh" || fail "GET /setup/$t differs from 'pullcache setup $t'"
        sh -n "$W/recipes/$t.sh" || fail "$t: not valid sh"
        grep -q "PROXY_URL='http://127.0.0.1:$PPORT'" "$W/recipes/$t.sh" || fail "$t: wrong proxy URL"
        echo "$t: $(wc -l <"$W/recipes/$t.sh") lines, same as the CLI's"
    done
    local code
    code=$(curl -sS -o /dev/null -w '%{http_code}' --noproxy '*' --max-time 10 "http://127.0.0.1:$PPORT/setup/nope")
    [ "$code" = 404 ] || fail "unknown target answered $code"
    state RECIPES "$W/recipes"
}

s_dockerd_systemd_recipe() {
    local d="$W/ns-docker"
    ns_prepare "$d"
    mapfile -t cmd < <(dockerd_cmd docker)
    ns_unit "$d" docker "${cmd[@]}"
    containerd_config "$W/docker" "$W/docker/containerd.sock"
    # The namespace's first process is containerd (docker.service requires containerd.service);
    # then the recipe runs in the same namespace and its `systemctl restart docker` starts
    # dockerd there. Test CA = the public CAs auth.docker.io's certificate chains to.
    cat >"$d/boot.sh" <<EOF
#!/bin/bash
set -euo pipefail
cp '$PKI/testca.crt' /usr/local/share/ca-certificates/e2e-public-standin.crt
containerd --config '$W/docker/containerd.toml' </dev/null >>'$d/containerd.log' 2>&1 &
echo \$! >'$d/containerd.pid'
echo "\$! containerd-docker" >>"\$PC_PIDFILE"
for _ in \$(seq 100); do [ -S '$W/docker/containerd.sock' ] && break; sleep 0.1; done
PATH='$d/bin':\$PATH sh '$RECIPES/dockerd-systemd.sh' >'$d/recipe.out' 2>&1
EOF
    chmod +x "$d/boot.sh"
    local rc=0
    unshare --mount --propagation private "$d/enter.sh" "$d" "$d/boot.sh" || rc=$?
    # containerd and then dockerd (by the systemctl stand-in) are in $PC_PIDFILE: the trap
    # stops dockerd first.
    cat "$d/recipe.out"
    [ "$rc" -eq 0 ] || fail "the recipe failed (exit $rc)"
    echo "--- drop-in environment dockerd was started with:"
    cat "$d/docker.env"
    grep -qx "HTTPS_PROXY=http://127.0.0.1:$PPORT" "$d/docker.env" || fail "dockerd has no HTTPS_PROXY"
    grep -q '^NO_PROXY=' "$d/docker.env" || fail "dockerd has no NO_PROXY"
    grep -qx 'systemctl restart docker' "$d/systemctl.log" || fail "the recipe did not restart docker"
    pc_wait_until 30 "$DOCKER" -H "unix://$W/docker/docker.sock" version >/dev/null 2>&1 || {
        pc_show_log "$d/docker.log" 30
        fail "dockerd did not come up"
    }
    docker_cli docker version --format 'dockerd {{.Server.Version}}, API {{.Server.APIVersion}}'
    state DOCKERD_PID "$(cat "$d/docker.pid")"
    state DOCKER_NS "$d"
    # Nothing leaked: the host's trust store and unit dirs are untouched.
    [ ! -e /usr/local/share/ca-certificates/pullcache.crt ] || fail "CA leaked into the host store"
    [ ! -e /etc/systemd/system/docker.service.d/pullcache.conf ] || fail "drop-in leaked to the host"
    # Inside, the recipe's CA is in the bundle dockerd reads, and in certs.d.
    in_ns "$DOCKERD_PID" grep -q "$(sed -n 2p "$W/pc-ca/ca.crt")" /etc/ssl/certs/ca-certificates.crt ||
        fail "pullcache's CA is not in the namespace's system bundle"
    in_ns "$DOCKERD_PID" cmp /etc/docker/certs.d/docker.io/pullcache-ca.crt "$W/pc-ca/ca.crt" ||
        fail "certs.d/docker.io/pullcache-ca.crt differs from the CA"
}

# docker_pull_twice NAME IMAGE EXPECT_JSON PREFIX: cold pull, remove, warm pull; checks the
# image ID (= config digest), that every blob came from the registry the first time and none
# the second time; records PREFIX_COLD/PREFIX_WARM seconds.
docker_pull_twice() {
    local n="$1" image="$2" want="$3" prefix="$4" m0 m1 t0 cold warm gets d id
    docker_cli "$n" rmi -f "$image" >/dev/null 2>&1 || true
    m0=$(reg_log_mark)
    t0=$(pc_now)
    docker_cli "$n" pull "$image"
    cold=$(pc_elapsed "$t0")
    m1=$(reg_log_mark)
    id=$(docker_cli "$n" image inspect --format '{{.Id}}' "$image")
    [ "$id" = "$(json_field "$want" config)" ] || fail "image ID $id is not the pushed config"
    gets=$(reg_log_between "$m0" "$m1" | blob_gets)
    for d in $(blobs_of "$want"); do
        grep -q "$d" <<<"$gets" || fail "cold pull: the registry never served $d"
    done
    echo "cold pull: $cold s, $(grep -c . <<<"$gets") blob GETs upstream"
    docker_cli "$n" rmi "$image" >/dev/null
    docker_cli "$n" image inspect "$image" >/dev/null 2>&1 && fail "image still present after rmi"
    m0=$(reg_log_mark)
    t0=$(pc_now)
    docker_cli "$n" pull "$image"
    warm=$(pc_elapsed "$t0")
    m1=$(reg_log_mark)
    id=$(docker_cli "$n" image inspect --format '{{.Id}}' "$image")
    [ "$id" = "$(json_field "$want" config)" ] || fail "warm pull: image ID $id is not the pushed config"
    echo "upstream requests during the warm pull:"
    reg_log_between "$m0" "$m1" | grep -E '"(GET|HEAD) /v2/' | grep -v sentinel || true
    gets=$(reg_log_between "$m0" "$m1" | blob_gets)
    [ -z "$gets" ] || fail "warm pull fetched $(grep -c . <<<"$gets") blob(s) from the registry"
    echo "warm pull: $warm s, 0 blob GETs upstream"
    state "${prefix}_COLD" "$cold"
    state "${prefix}_WARM" "$warm"
}

s_docker_pull_multilayer() {
    docker_pull_twice docker docker.io/library/e2etest:v1 "$W/image-v1.json" PULL1
    state DOCKER_PULLED 1
}

s_docker_pull_index() {
    docker_pull_twice docker docker.io/library/e2emulti:v1 "$W/image-amd64.json" PULL2
    docker_cli docker image inspect --format '{{.Architecture}} {{.RepoDigests}}' docker.io/library/e2emulti:v1
    local idx
    idx=$(multi_digest)
    docker_cli docker image inspect --format '{{.RepoDigests}}' docker.io/library/e2emulti:v1 | grep "$idx" ||
        fail "RepoDigests does not name the index digest $idx"
}

s_docker_push() {
    printf 'secret' | docker_cli docker login -u user --password-stdin
    docker_cli docker tag docker.io/library/e2etest:v1 docker.io/user/pushed:v1
    docker_cli docker push docker.io/user/pushed:v1 || {
        echo "--- pullcache's requests for user/pushed:"
        pc_strip_ansi <"$PC_LOG" | grep 'user/pushed' | sed -e 's/.*pullcache::registry: request //' || true
        echo "--- the registry's:"
        grep -E '"[A-Z]+ /v2/user/pushed' "$REG_LOG" || true
        fail "docker push failed"
    }
    local got
    got=$(pc_skopeo inspect --format '{{.Digest}} {{.Layers}}' --creds user:secret --cert-dir "$PKI/certdir" \
        "docker://127.0.0.1:$DREG_PORT/user/pushed:v1")
    echo "registry has user/pushed:v1 = $got"
    [ -n "$got" ] || fail "the pushed image is not in the registry"
    # What was pushed is the image that was pulled: same config (image ID).
    local cfg
    cfg=$(pc_skopeo inspect --config --raw --creds user:secret --cert-dir "$PKI/certdir" \
        "docker://127.0.0.1:$DREG_PORT/user/pushed:v1" | sha256sum | cut -d' ' -f1)
    [ "sha256:$cfg" = "$(json_field "$W/image-v1.json" config)" ] || fail "pushed config differs"
    grep -E 'PUT /v2/user/pushed/manifests/v1' "$REG_LOG" | tail -n 1
    grep -q 'PUT /v2/user/pushed/manifests/v1' "$REG_LOG" || fail "no manifest PUT reached the registry"
}

s_daemon_json_recipe() {
    local d="$DOCKER_NS" out rc=0
    # Engine 20.10 cannot read "proxies": the recipe must refuse before changing anything.
    out=$(in_ns "$DOCKERD_PID" env DOCKER_HOST="unix://$W/docker/docker.sock" \
        sh "$RECIPES/daemon-json.sh" 2>&1) || rc=$?
    echo "$out"
    [ "$rc" -ne 0 ] || fail "daemon-json recipe ran against Engine 20.10"
    grep -q 'dockerd-systemd' <<<"$out" || fail "the refusal does not point to dockerd-systemd"
    in_ns "$DOCKERD_PID" test ! -e /etc/docker/daemon.json || fail "daemon.json written despite the refusal"
    # The merge, on an engine whose version it cannot tell (no docker CLI on PATH), keeping
    # existing keys; twice, to show it is idempotent.
    in_ns "$DOCKERD_PID" sh -c 'echo "{\"log-level\": \"warn\"}" >/etc/docker/daemon.json'
    local i
    mkdir -p "$d/nodocker"
    printf '#!/bin/sh\nexit 1\n' >"$d/nodocker/docker"
    chmod +x "$d/nodocker/docker"
    for i in 1 2; do
        in_ns "$DOCKERD_PID" env PATH="$d/nodocker:/usr/sbin:/usr/bin:/sbin:/bin" PULLCACHE_NO_RESTART=1 \
            /bin/sh "$RECIPES/daemon-json.sh" >"$d/daemon-json.$i.out" 2>&1 || {
            cat "$d/daemon-json.$i.out"
            fail "daemon-json recipe failed (run $i)"
        }
    done
    in_ns "$DOCKERD_PID" cat /etc/docker/daemon.json | tee "$d/daemon.json"
    python3 - "$d/daemon.json" "http://127.0.0.1:$PPORT" <<'EOF'
import json, sys
cfg = json.load(open(sys.argv[1]))
assert cfg["log-level"] == "warn", cfg
assert cfg["proxies"]["https-proxy"] == sys.argv[2], cfg
assert "localhost" in cfg["proxies"]["no-proxy"], cfg
EOF
}

s_gitlab_dind() {
    local d="$W/ns-dind" runner="$W/runner" port out
    mkdir -p "$d" "$runner"
    # On the "runner host": the recipe writes the CA and prints the snippets.
    PULLCACHE_CA_PATH="$runner/pullcache-ca.crt" sh "$RECIPES/gitlab-dind.sh" >"$d/snippets.txt"
    cmp "$runner/pullcache-ca.crt" "$W/pc-ca/ca.crt" || fail "the CA written for the runner differs"
    local https no
    https=$(sed -n 's/^  HTTPS_PROXY: "\(.*\)"$/\1/p' "$d/snippets.txt" | head -1)
    no=$(sed -n 's/^  NO_PROXY: "\(.*\)"$/\1/p' "$d/snippets.txt" | head -1)
    echo "job variables: HTTPS_PROXY=$https NO_PROXY=$no"
    [ "$https" = "http://127.0.0.1:$PPORT" ] || fail "HTTPS_PROXY in .gitlab-ci.yml is $https"
    case ",$no," in *,docker,*) ;; *) fail "NO_PROXY lacks the docker alias: $no" ;; esac
    local vol
    vol=$(grep -o '"[^"]*:/etc/ssl/certs/pullcache-ca.pem:ro"' "$d/snippets.txt" | tr -d '"')
    [ "${vol%%:*}" = "$runner/pullcache-ca.crt" ] || fail "no /etc/ssl/certs volume line: $vol"
    # The dind service: its own namespace, where the volume line is a bind mount of the CA
    # into /etc/ssl/certs (no update-ca-certificates) and the test CA stands in for the
    # public roots the image ships. Mutual TLS on tcp, as DOCKER_TLS_CERTDIR gives.
    pc_make_leaf "$PKI/testca.crt" "$PKI/testca.key" "$d/server.crt" "$d/server.key" docker "DNS:docker"
    port=$(pc_free_port)
    mapfile -t cmd < <(dockerd_cmd dind)
    containerd_config "$W/dind" "$W/dind/containerd.sock"
    cat >"$d/boot.sh" <<EOF
#!/bin/bash
set -euo pipefail
mount --make-rprivate /
mkdir -p '$d/certs'
cp -a /etc/ssl/certs/. '$d/certs/'
cp '$PKI/testca.crt' '$d/certs/e2e-public-standin.pem'
touch '$d/certs/pullcache-ca.pem'
mount --bind '$d/certs' /etc/ssl/certs
mount --bind '${vol%%:*}' /etc/ssl/certs/pullcache-ca.pem
mkdir -p '$d/etc-docker'
mount --bind '$d/etc-docker' /etc/docker
mount -t tmpfs -o mode=755 pullcache-e2e-run /run
containerd --config '$W/dind/containerd.toml' </dev/null >>'$d/containerd.log' 2>&1 &
echo \$! >'$d/containerd.pid'
for _ in \$(seq 100); do [ -S '$W/dind/containerd.sock' ] && break; sleep 0.1; done
env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HTTPS_PROXY='$https' NO_PROXY='$no' \
    setsid ${cmd[*]} -H tcp://127.0.0.1:$port --tlsverify --tlscacert '$PKI/testca.crt' \
    --tlscert '$d/server.crt' --tlskey '$d/server.key' \
    </dev/null >>'$d/dockerd.log' 2>&1 &
echo \$! >'$d/dockerd.pid'
EOF
    chmod +x "$d/boot.sh"
    unshare --mount --propagation private "$d/boot.sh"
    pc_track_pid "$(cat "$d/containerd.pid")" containerd-dind
    pc_track_pid "$(cat "$d/dockerd.pid")" dockerd-dind
    pc_wait_until 30 test -S "$W/dind/docker.sock" || {
        pc_show_log "$d/dockerd.log" 30
        fail "dind dockerd did not come up"
    }
    # The job container: /etc/hosts maps the service alias, the job variables are set, and
    # the docker CLI reaches the service over TLS (as docker:cli does with DOCKER_TLS_CERTDIR).
    mkdir -p "$d/client"
    cp "$PKI/testca.crt" "$d/client/ca.pem"
    make_client_cert "$d/client/cert.pem" "$d/client/key.pem"
    printf '127.0.0.1 localhost\n127.0.0.1 docker\n' >"$d/hosts"
    cat >"$d/job.sh" <<EOF
#!/bin/bash
set -euo pipefail
mount --make-rprivate /
mount --bind '$d/hosts' /etc/hosts
export DOCKER_HOST=tcp://docker:$port DOCKER_TLS_VERIFY=1 DOCKER_CERT_PATH='$d/client'
export DOCKER_CONFIG='$d/client-config' HTTPS_PROXY="\$JOB_HTTPS_PROXY" NO_PROXY="\$JOB_NO_PROXY"
exec timeout --kill-after=10 $PC_DOCKER_TIMEOUT $DOCKER "\$@"
EOF
    chmod +x "$d/job.sh"
    job() { JOB_HTTPS_PROXY="$https" JOB_NO_PROXY="$1" unshare --mount --propagation private "$d/job.sh" "${@:2}"; }
    job "$no" version --format 'job CLI -> dind {{.Server.Version}} over tcp://docker:'"$port"
    # The image is in pullcache's cache from the dockerd steps: the dind daemon, trusting
    # the CA only through the mounted PEM, pulls it without a blob from the registry.
    local m0 m1 gets id
    m0=$(reg_log_mark)
    job "$no" pull docker.io/library/e2etest:v1
    m1=$(reg_log_mark)
    id=$(job "$no" image inspect --format '{{.Id}}' docker.io/library/e2etest:v1)
    [ "$id" = "$(json_field "$W/image-v1.json" config)" ] || fail "dind pulled the wrong image: $id"
    gets=$(reg_log_between "$m0" "$m1" | blob_gets)
    [ -z "$gets" ] || fail "dind pull fetched blobs from the registry: $gets"
    echo "dind pull through pullcache: OK, 0 blob GETs upstream"
    # The trap the recipe avoids: without the alias in NO_PROXY the job's CLI sends its
    # daemon traffic to the proxy, which refuses to tunnel to docker:$port.
    if out=$(job "localhost" version 2>&1); then
        fail "the job CLI reached dind through the proxy: NO_PROXY would not matter"
    fi
    echo "without docker in NO_PROXY the job CLI fails, as expected: $(tail -n 1 <<<"$out")"
}

s_gitlab_entrypoint_variant() {
    # Variant B's service entrypoint, extracted from the YAML block and run with sh, in a
    # namespace where dockerd-entrypoint.sh is a stand-in that checks what it left behind.
    local d="$W/ns-dind-b"
    mkdir -p "$d/bin" "$d/certs" "$d/etc-docker"
    awk '/^        - \|$/ { on = 1; next } on && /^        - dockerd-entrypoint.sh$/ { exit }
         on { sub(/^          /, ""); print }' "$W/ns-dind/snippets.txt" >"$d/entrypoint.sh"
    cat "$d/entrypoint.sh"
    grep -q 'BEGIN CERTIFICATE' "$d/entrypoint.sh" || fail "no entrypoint block found"
    cat >"$d/bin/dockerd-entrypoint.sh" <<EOF
#!/bin/sh
set -e
cmp /etc/ssl/certs/pullcache-ca.pem '$W/pc-ca/ca.crt'
cmp /etc/docker/certs.d/docker.io/pullcache-ca.crt '$W/pc-ca/ca.crt'
echo "dockerd-entrypoint.sh reached with \$# args; CA in /etc/ssl/certs and certs.d"
EOF
    chmod +x "$d/bin/dockerd-entrypoint.sh"
    unshare --mount --propagation private bash -c "
        set -e
        mount --make-rprivate /
        mount --bind '$d/certs' /etc/ssl/certs
        mount --bind '$d/etc-docker' /etc/docker
        PATH='$d/bin':\$PATH /bin/sh -c \"\$(cat '$d/entrypoint.sh')\" dockerd-entrypoint.sh"
}

s_containerd_recipe() {
    local d="$W/ns-ctd" sock="$W/ctd/containerd.sock"
    mkdir -p "$W/ctd"
    ns_prepare "$d"
    containerd_config "$W/ctd" "$sock"
    ns_unit "$d" containerd containerd --config "$W/ctd/containerd.toml"
    cat >"$d/boot.sh" <<EOF
#!/bin/bash
set -euo pipefail
cp '$PKI/testca.crt' /usr/local/share/ca-certificates/e2e-public-standin.crt
PATH='$d/bin':\$PATH sh '$RECIPES/containerd.sh' >'$d/recipe.out' 2>&1
EOF
    chmod +x "$d/boot.sh"
    local rc=0
    unshare --mount --propagation private "$d/enter.sh" "$d" "$d/boot.sh" || rc=$?
    cat "$d/recipe.out"
    [ "$rc" -eq 0 ] || fail "the recipe failed (exit $rc)"
    cat "$d/containerd.env"
    grep -qx "HTTPS_PROXY=http://127.0.0.1:$PPORT" "$d/containerd.env" || fail "containerd has no HTTPS_PROXY"
    pc_wait_until 30 test -S "$sock" || {
        pc_show_log "$d/containerd.log" 30
        fail "containerd did not come up"
    }
    local pid
    pid=$(cat "$d/containerd.pid")
    in_ns "$pid" cat /etc/containerd/certs.d/docker.io/hosts.toml
    state CTD_PID "$pid"
    state CTD_SOCK "$sock"
}

ctr_in_ns() { # ENV... -- CTR ARGS: ctr in containerd's namespace, proxy as the recipe says
    local envs=()
    while [ "$1" != -- ]; do
        envs+=("$1")
        shift
    done
    shift
    in_ns "$CTD_PID" env HTTPS_PROXY="http://127.0.0.1:$PPORT" NO_PROXY=localhost "${envs[@]}" \
        timeout --kill-after=10 "$PC_DOCKER_TIMEOUT" ctr -a "$CTD_SOCK" -n pullcache-e2e "$@"
}

# ctr_pull_twice IMAGE EXPECT_JSON DIGEST ENV... -- PULL_FLAGS...
ctr_pull_twice() {
    local image="$1" want="$2" digest="$3" m0 m1 gets d pass
    shift 3
    for pass in cold warm; do
        ctr_in_ns -- image rm --sync "$image" >/dev/null 2>&1 || true
        m0=$(reg_log_mark)
        ctr_in_ns "$@" "$image"
        m1=$(reg_log_mark)
        ctr_in_ns -- image ls | tee /dev/stderr | grep "$digest" >/dev/null || fail "$image is not $digest"
        gets=$(reg_log_between "$m0" "$m1" | blob_gets)
        if [ "$pass" = cold ]; then
            echo "cold ctr pull: $(grep -c . <<<"$gets") blob GETs upstream"
        else
            [ -z "$gets" ] || fail "warm ctr pull fetched blobs upstream: $gets"
            echo "warm ctr pull: 0 blob GETs upstream"
        fi
    done
    # Content really is in containerd's store (every layer of the image).
    for d in $(blobs_of "$want"); do
        ctr_in_ns -- content ls | grep "$d" >/dev/null || fail "blob $d not in containerd's content store"
    done
}

s_ctr_pull_multilayer() {
    # Everything after the DOCKER steps is cached already; remove it from pullcache's view?
    # No: ctr's cold pull may be warm for pullcache. What is asserted is the ctr side plus
    # zero blob GETs on its second pull.
    ctr_pull_twice docker.io/library/e2etest:v1 "$W/image-v1.json" "$(json_field "$W/image-v1.json" manifest)" \
        -- image pull
}

s_ctr_pull_index() {
    local idx
    idx=$(multi_digest)
    ctr_pull_twice docker.io/library/e2emulti:v1 "$W/image-amd64.json" "$idx" -- image pull --platform linux/amd64
}

s_ctr_hosts_toml() {
    # The recipe's hosts.toml alone makes ctr trust pullcache: roots = the public stand-in
    # only (SSL_CERT_FILE, and an empty SSL_CERT_DIR hides /etc/ssl/certs), so without
    # --hosts-dir the pull must fail on the certificate, and with it succeed.
    local out
    mkdir -p "$W/empty-certs"
    if out=$(ctr_in_ns SSL_CERT_FILE="$PKI/testca.crt" SSL_CERT_DIR="$W/empty-certs" -- \
        image pull docker.io/library/e2etest:v1 2>&1); then
        fail "pull without pullcache's CA succeeded: the roots were not restricted"
    fi
    echo "without --hosts-dir: $(tail -n 1 <<<"$out")"
    grep -Eq 'x509|certificate' <<<"$out" || fail "failed, but not on the certificate"
    ctr_in_ns SSL_CERT_FILE="$PKI/testca.crt" SSL_CERT_DIR="$W/empty-certs" -- \
        image pull --hosts-dir /etc/containerd/certs.d docker.io/library/e2etest:v1
    echo "with --hosts-dir /etc/containerd/certs.d: OK"
}

s_install_ca_script() {
    # scripts/install-ca.sh on this Debian host, in a namespace: install, again (no change),
    # remove, remove again.
    local d="$W/ns-installca"
    ns_prepare "$d"
    cat >"$d/boot.sh" <<EOF
#!/bin/bash
set -euo pipefail
s='$PC_REPO_ROOT/scripts/install-ca.sh'
sh "\$s" '$W/pc-ca/ca.crt'
grep -q "$(sed -n 2p "$W/pc-ca/ca.crt")" /etc/ssl/certs/ca-certificates.crt
openssl verify -CApath /etc/ssl/certs '$W/pc-ca/ca.crt'
sh "\$s" - <'$W/pc-ca/ca.crt' | grep 'already up to date'
sh "\$s" --remove | grep removed
if grep -q "$(sed -n 2p "$W/pc-ca/ca.crt")" /etc/ssl/certs/ca-certificates.crt; then exit 1; fi
sh "\$s" --remove | grep 'nothing to do'
if sh "\$s" '$W/pc-ca/ca.key'; then echo "installed a private key" >&2; exit 1; fi
EOF
    chmod +x "$d/boot.sh"
    unshare --mount --propagation private "$d/enter.sh" "$d" "$d/boot.sh"
}

s_pullcache_healthy() {
    pc_alive "$PC_PID" || fail "pullcache exited"
    if pc_strip_ansi <"$PC_LOG" | grep -E 'panicked at'; then
        fail "pullcache log shows a panic"
    fi
    echo "pullcache still running, no panics logged"
}

# --- the run -----------------------------------------------------------------------------------

pc_section "dockerd-e2e: fixture"
step "test PKI" "" s_pki
step "token server (auth.docker.io)" "PKI" s_tokenserver
step "registry (registry-1.docker.io) with token auth" "PKI TOK_PORT" s_registry_hub
step "direct-access registry on the same storage" "PKI TOK_PORT" s_registry_direct
step "multi-layer image and two-platform index built" "" s_build_images
step "images pushed to the registry" "DREG_PORT IMAGES" s_push_images
step "pullcache binary available" "" s_build_pullcache
step "pullcache starts" "BIN REG_PORT TOK_PORT" s_start_pullcache

pc_section "dockerd-e2e: recipes with the real daemons"
step "GET /setup/<target> serves the recipes, same as 'pullcache setup'" "PPORT" s_fetch_recipes
step "dockerd-systemd recipe applied; dockerd started from its drop-in" "RECIPES" s_dockerd_systemd_recipe
step "docker pull multi-layer image twice; warm pull: 0 blob GETs upstream" "DOCKERD_PID PUSHED" s_docker_pull_multilayer
step "docker pull multi-arch index twice; warm pull: 0 blob GETs upstream" "DOCKERD_PID PUSHED" s_docker_pull_index
step "docker login + push through pullcache" "DOCKER_PULLED" s_docker_push
step "daemon-json recipe: refused on Engine 20.10, merge keeps keys" "DOCKERD_PID" s_daemon_json_recipe
step "gitlab-dind: dind with the mounted CA pulls from cache; job CLI needs docker in NO_PROXY" "DOCKER_PULLED" s_gitlab_dind
step "gitlab-dind variant B entrypoint writes the CA before dockerd" "RECIPES" s_gitlab_entrypoint_variant
step "containerd recipe applied; containerd started from its drop-in" "RECIPES" s_containerd_recipe
step "ctr image pull multi-layer twice; warm: 0 blob GETs upstream" "CTD_PID PUSHED" s_ctr_pull_multilayer
step "ctr image pull multi-arch index twice; warm: 0 blob GETs upstream" "CTD_PID PUSHED" s_ctr_pull_index
step "ctr trusts pullcache through the recipe's hosts.toml alone" "CTD_PID PUSHED" s_ctr_hosts_toml
step "scripts/install-ca.sh: install, idempotent, remove" "PPORT" s_install_ca_script
step "pullcache still alive, no panics" "PC_PID" s_pullcache_healthy

for p in PULL1:multi-layer PULL2:multi-arch; do
    k=${p%%:*}
    c="${k}_COLD"
    w="${k}_WARM"
    if [ -n "${!c:-}" ] && [ -n "${!w:-}" ]; then
        # Informational only: small images on loopback; never asserted.
        awk -v n="${p#*:}" -v c="${!c}" -v w="${!w}" 'BEGIN {
            printf "timing: docker pull %s cold=%.2fs warm=%.2fs ratio_warm_over_cold=%.2f\n", n, c, w, (c > 0 ? w / c : 0) }'
    fi
done

if [ "$FAILED" -gt 0 ] || [ "$SKIPPED" -gt 0 ]; then
    pc_section "dockerd-e2e: logs of the services (for the failures above)"
    for f in "${PC_LOG:-}" "${TOK_LOG:-}" "$W/ns-docker/docker.log" "$W/ns-dind/dockerd.log" "$W/ns-ctd/containerd.log"; do
        [ -z "$f" ] || pc_show_log "$f" 30
    done
    [ -z "${REG_LOG:-}" ] || pc_show_log "$REG_LOG" 15
    echo
    echo "not passed:"
    printf '  - %s\n' "${FAILED_NAMES[@]}"
fi

echo
if [ "$SKIPPED" -gt 0 ]; then
    echo "dockerd-e2e: $PASSED passed, $FAILED failed, $SKIPPED skipped"
else
    echo "dockerd-e2e: $PASSED passed, $FAILED failed"
fi
[ "$FAILED" -eq 0 ] && [ "$SKIPPED" -eq 0 ]
