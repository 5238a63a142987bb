# shellcheck shell=bash
# Run skopeo hermetically: no host policy, registries.conf, stored credentials
# or proxy settings leak into a test.  Source after common.sh.
#
#   pc_skopeo_setup DIR     writes DIR/{policy.json,registries.conf,auth.json}
#   pc_skopeo ARGS...       skopeo with those files, bounded by a timeout
#
# Proxy/CA environment is passed explicitly per call, e.g.
#   HTTPS_PROXY=http://127.0.0.1:$P SSL_CERT_FILE=$bundle pc_skopeo copy ...
# (skopeo is Go: it honours HTTPS_PROXY via CONNECT and SSL_CERT_FILE replaces
# the system root store.)

: "${PC_SKOPEO_TIMEOUT:=180}"
PC_SKOPEO_DIR=""

pc_skopeo_setup() {
    PC_SKOPEO_DIR="$1"
    mkdir -p "$PC_SKOPEO_DIR/tmp" "$PC_SKOPEO_DIR/docker-config"
    # A fresh machine may not ship /etc/containers/policy.json.
    cat >"$PC_SKOPEO_DIR/policy.json" <<'EOF'
{"default": [{"type": "insecureAcceptAnything"}]}
EOF
    # No mirrors, no search registries: docker.io means registry-1.docker.io.
    cat >"$PC_SKOPEO_DIR/registries.conf" <<'EOF'
unqualified-search-registries = []
EOF
    echo '{"auths": {}}' >"$PC_SKOPEO_DIR/auth.json"
    echo '{"auths": {}}' >"$PC_SKOPEO_DIR/docker-config/config.json"
}

pc_skopeo() {
    [ -n "$PC_SKOPEO_DIR" ] || pc_die "pc_skopeo_setup not called"
    REGISTRY_AUTH_FILE="$PC_SKOPEO_DIR/auth.json" \
        CONTAINERS_REGISTRIES_CONF="$PC_SKOPEO_DIR/registries.conf" \
        DOCKER_CONFIG="$PC_SKOPEO_DIR/docker-config" \
        timeout --kill-after=10 "$PC_SKOPEO_TIMEOUT" \
        skopeo --policy "$PC_SKOPEO_DIR/policy.json" --tmpdir "$PC_SKOPEO_DIR/tmp" \
        --override-os linux --override-arch amd64 "$@"
}
