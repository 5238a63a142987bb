# shellcheck shell=bash
# Test PKI made with openssl.  Source after common.sh.
#
# Layout produced by pc_make_test_pki DIR:
#   DIR/testca.crt, testca.key       test root CA (EC P-256); stands in for the
#                                    public CAs that sign Docker Hub's certs
#   DIR/registry.crt, registry.key   leaf for registry-1.docker.io (+127.0.0.1)
#   DIR/auth.crt, auth.key           leaf for auth.docker.io (+127.0.0.1)
#   DIR/signing.crt, signing.key     self-signed RSA-2048 cert whose key signs
#                                    registry tokens (RS256); it is also the
#                                    registry's auth.token.rootcertbundle
#   DIR/certdir/ca.crt               copy of testca.crt, for skopeo --*-cert-dir

# Random positive serial: rustls/webpki and Go both want serials that are
# unique per issuer; 64 random bits is plenty.
_pc_serial() { echo "0x$(openssl rand -hex 8)"; }

# pc_make_ca CRT KEY SUBJECT_CN
pc_make_ca() {
    local crt="$1" key="$2" cn="$3"
    openssl ecparam -name prime256v1 -genkey -noout -out "$key" 2>/dev/null
    openssl req -x509 -new -key "$key" -sha256 -days 30 -subj "/CN=$cn" \
        -set_serial "$(_pc_serial)" \
        -addext "basicConstraints=critical,CA:TRUE" \
        -addext "keyUsage=critical,keyCertSign,cRLSign" \
        -addext "subjectKeyIdentifier=hash" \
        -out "$crt" 2>/dev/null
}

# pc_make_leaf CA_CRT CA_KEY CRT KEY CN SAN   (SAN like "DNS:a.example,IP:127.0.0.1")
pc_make_leaf() {
    local ca_crt="$1" ca_key="$2" crt="$3" key="$4" cn="$5" san="$6"
    local csr="$crt.csr" ext="$crt.ext"
    openssl ecparam -name prime256v1 -genkey -noout -out "$key" 2>/dev/null
    openssl req -new -key "$key" -subj "/CN=$cn" -out "$csr" 2>/dev/null
    # Go and rustls ignore the CN: the SAN is what gets checked.
    cat >"$ext" <<EOF
basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature
extendedKeyUsage=serverAuth
subjectAltName=$san
subjectKeyIdentifier=hash
authorityKeyIdentifier=keyid
EOF
    openssl x509 -req -in "$csr" -CA "$ca_crt" -CAkey "$ca_key" -set_serial "$(_pc_serial)" \
        -sha256 -days 30 -extfile "$ext" -out "$crt" 2>/dev/null
    rm -f "$csr" "$ext"
}

# pc_make_signing_cert CRT KEY : self-signed RSA cert for token signing.
pc_make_signing_cert() {
    local crt="$1" key="$2"
    openssl genrsa -out "$key" 2048 2>/dev/null
    openssl req -x509 -new -key "$key" -sha256 -days 30 -subj "/CN=pullcache-test-token-signer" \
        -set_serial "$(_pc_serial)" \
        -addext "keyUsage=critical,digitalSignature" \
        -out "$crt" 2>/dev/null
}

# pc_make_test_pki DIR
pc_make_test_pki() {
    local d="$1"
    mkdir -p "$d/certdir"
    pc_make_ca "$d/testca.crt" "$d/testca.key" "pullcache e2e test root CA"
    pc_make_leaf "$d/testca.crt" "$d/testca.key" "$d/registry.crt" "$d/registry.key" \
        registry-1.docker.io "DNS:registry-1.docker.io,IP:127.0.0.1"
    pc_make_leaf "$d/testca.crt" "$d/testca.key" "$d/auth.crt" "$d/auth.key" \
        auth.docker.io "DNS:auth.docker.io,IP:127.0.0.1"
    pc_make_signing_cert "$d/signing.crt" "$d/signing.key"
    cp "$d/testca.crt" "$d/certdir/ca.crt"
    # Sanity: the leaves verify against the CA for the names clients will use.
    openssl verify -CAfile "$d/testca.crt" -verify_hostname registry-1.docker.io "$d/registry.crt" >/dev/null
    openssl verify -CAfile "$d/testca.crt" -verify_hostname auth.docker.io "$d/auth.crt" >/dev/null
}
