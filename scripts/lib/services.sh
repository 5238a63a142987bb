# shellcheck shell=bash
# Start the real programs the end-to-end tests run against: the token server
# (scripts/tokenserver.py), a CNCF distribution registry with token auth, and
# pullcache itself.  Source after common.sh.  Every start function records its
# PID with pc_track_pid, so pc_cleanup_pids (in an EXIT trap) stops it.
#
# Results are returned in global variables (documented per function) so that
# callers can keep them; nothing is printed on stdout.
# shellcheck disable=SC2034  # the PC_* result variables are for the callers

PC_TOKEN_ISSUER="pullcache-test-issuer"
PC_TOKEN_SERVICE="registry.docker.io"

# pc_start_tokenserver PKI_DIR WORKDIR
#   sets PC_TOK_PORT PC_TOK_PID PC_TOK_LOG
pc_start_tokenserver() {
    local pki="$1" w="$2"
    PC_TOK_LOG="$w/tokenserver.log"
    local portfile="$w/tokenserver.port"
    rm -f "$portfile"
    PC_TOK_PID=$(pc_spawn tokenserver "$PC_TOK_LOG" \
        python3 "$PC_REPO_ROOT/scripts/tokenserver.py" \
        --cert "$pki/auth.crt" --key "$pki/auth.key" \
        --signing-cert "$pki/signing.crt" --signing-key "$pki/signing.key" \
        --issuer "$PC_TOKEN_ISSUER" --service "$PC_TOKEN_SERVICE" \
        --port-file "$portfile")
    if ! pc_wait_until 20 test -s "$portfile"; then
        pc_show_log "$PC_TOK_LOG"
        pc_log "token server did not report its port"
        return 1
    fi
    PC_TOK_PORT=$(cat "$portfile")
    # Health: a real TLS request validated against the test CA.
    if ! pc_wait_until 20 curl -fsS -o /dev/null --noproxy '*' --max-time 2 \
        --cacert "$pki/testca.crt" --resolve "auth.docker.io:$PC_TOK_PORT:127.0.0.1" \
        "https://auth.docker.io:$PC_TOK_PORT/healthz"; then
        pc_show_log "$PC_TOK_LOG"
        pc_log "token server not healthy"
        return 1
    fi
}

# pc_write_registry_config FILE PORT STORAGE_DIR PKI_DIR REALM
pc_write_registry_config() {
    local cfg="$1" port="$2" storage="$3" pki="$4" realm="$5"
    cat >"$cfg" <<EOF
version: 0.1
log:
  # text lines like: level=info msg="response completed" ...
  #   http.request.method=GET http.request.uri="/v2/<name>/blobs/sha256:..."
  level: info
  formatter: text
  fields:
    service: registry
storage:
  filesystem:
    rootdirectory: $storage
  delete:
    enabled: true
  maintenance:
    # Several registry processes may share one storage dir; never let one
    # purge another's uploads.
    uploadpurging:
      enabled: false
  redirect:
    disable: true
http:
  addr: 127.0.0.1:$port
  secret: $(openssl rand -hex 16)
  tls:
    certificate: $pki/registry.crt
    key: $pki/registry.key
  headers:
    X-Content-Type-Options: [nosniff]
auth:
  token:
    realm: $realm
    service: $PC_TOKEN_SERVICE
    issuer: $PC_TOKEN_ISSUER
    rootcertbundle: $pki/signing.crt
EOF
}

# pc_start_registry NAME WORKDIR STORAGE_DIR PKI_DIR REALM
#   Starts `docker-registry serve` on a free loopback port with TLS (the
#   registry-1.docker.io cert) and token auth.  Retries with a new port if the
#   one picked got taken in the meantime.
#   sets PC_REG_PORT PC_REG_PID PC_REG_LOG PC_REG_CONFIG
pc_start_registry() {
    local name="$1" w="$2" storage="$3" pki="$4" realm="$5" attempt port pid
    mkdir -p "$storage"
    PC_REG_LOG="$w/$name.log"
    PC_REG_CONFIG="$w/$name.yml"
    for attempt in 1 2 3; do
        port=$(pc_free_port)
        pc_write_registry_config "$PC_REG_CONFIG" "$port" "$storage" "$pki" "$realm"
        pid=$(pc_spawn "$name" "$PC_REG_LOG" docker-registry serve "$PC_REG_CONFIG")
        if pc_wait_until 30 _pc_registry_settled "$port" "$pid" "$pki/testca.crt" && pc_alive "$pid"; then
            PC_REG_PORT=$port
            PC_REG_PID=$pid
            return 0
        fi
        pc_log "registry $name failed to start on port $port (attempt $attempt)"
        pc_show_log "$PC_REG_LOG" 20
        pc_stop_pid "$pid" "$name"
    done
    return 1
}

# _pc_registry_settled PORT PID CA: true once the registry is up -- /v2/
# answers 401 with a Bearer challenge, i.e. token auth is active -- or once
# the process has died (so a bind failure is noticed at once).
_pc_registry_settled() {
    local code
    pc_alive "$2" || return 0
    code=$(curl -sS -o /dev/null -w '%{http_code}' --noproxy '*' --max-time 2 \
        --cacert "$3" "https://127.0.0.1:$1/v2/" 2>/dev/null) || true
    [ "$code" = 401 ]
}

# pc_start_pullcache BIN WORKDIR ARGS... (args after `serve`)
#   Runs `BIN serve ARGS...` with output in WORKDIR/pullcache.log, waits for
#   the `proxy_addr=127.0.0.1:PORT` log line (text or json log format).
#   sets PC_PROXY_PORT PC_PROXY_PID PC_PROXY_LOG PC_ADMIN_PORT (if logged)
pc_start_pullcache() {
    local bin="$1" w="$2" line
    shift 2
    PC_PROXY_LOG="$w/pullcache.log"
    # NO_COLOR: tracing's text format would otherwise colour the fields and
    # break the log parsing (pc_wait_log_match strips colours as well).
    PC_PROXY_PID=$(NO_COLOR=1 RUST_BACKTRACE=1 pc_spawn pullcache "$PC_PROXY_LOG" "$bin" serve "$@")
    line=$(pc_wait_log_match "$PC_PROXY_LOG" 'proxy_addr"?[=:] *"?127\.0\.0\.1:[0-9]+' 30 "$PC_PROXY_PID") || {
        pc_show_log "$PC_PROXY_LOG"
        return 1
    }
    PC_PROXY_PORT=${line##*:}
    PC_ADMIN_PORT=""
    line=$(pc_strip_ansi <"$PC_PROXY_LOG" | grep -Eo -m1 'admin_addr"?[=:] *"?127\.0\.0\.1:[0-9]+' || true)
    [ -z "$line" ] || PC_ADMIN_PORT=${line##*:}
    pc_wait_port_open "$PC_PROXY_PORT" 10
}
