#!/bin/sh
# Trust (or stop trusting) pullcache's CA in the operating system's trust store.
#
#   install-ca.sh [--name NAME] CA_FILE        install CA_FILE (PEM); '-' reads stdin
#   install-ca.sh [--name NAME] --url URL      fetch it first, e.g. http://PROXY:3128/ca.crt
#   install-ca.sh [--name NAME] --remove       undo
#
# Debian/Ubuntu and Alpine (ca-certificates): /usr/local/share/ca-certificates/NAME.crt +
# update-ca-certificates.  RHEL/CentOS/Fedora: /etc/pki/ca-trust/source/anchors/NAME.crt +
# update-ca-trust.  Without either tool (an Alpine image with only ca-certificates-bundle) the
# PEM goes to /etc/ssl/certs/NAME.pem, which Go programs (dockerd, containerd) read as well.
#
# Idempotent: installing the same CA again changes nothing; --remove of an absent CA is fine.
# Programs load their roots when they start: restart dockerd/containerd afterwards.
# POSIX sh (runs under busybox); NAME defaults to "pullcache".
set -eu

NAME=pullcache
MODE=install
SRC=""
URL=""

usage() {
    sed -n '2,14p' "$0" 2>/dev/null | sed 's/^# \{0,1\}//' >&2 || true
    exit 64
}
die() {
    echo "install-ca: $*" >&2
    exit 1
}

while [ $# -gt 0 ]; do
    case "$1" in
        --name)
            [ $# -ge 2 ] || usage
            NAME="$2"
            shift 2
            ;;
        --remove) MODE=remove; shift ;;
        --url)
            [ $# -ge 2 ] || usage
            URL="$2"
            shift 2
            ;;
        -h | --help) usage ;;
        -) SRC="-"; shift ;;
        -*) echo "install-ca: unknown option $1" >&2; usage ;;
        *) SRC="$1"; shift ;;
    esac
done

case "$NAME" in
    '' | *[!A-Za-z0-9._-]*) die "--name must be letters, digits, '.', '_' or '-'" ;;
esac
[ "$(id -u)" = 0 ] || die "must run as root (it changes the system trust store)"

DEB_DIR=/usr/local/share/ca-certificates
RH_DIR=/etc/pki/ca-trust/source/anchors
PEM_DIR=/etc/ssl/certs

# Which trust store this system has.
if command -v update-ca-trust >/dev/null 2>&1 && [ -d /etc/pki/ca-trust/source ]; then
    FLAVOUR=rhel
    DEST="$RH_DIR/$NAME.crt"
elif command -v update-ca-certificates >/dev/null 2>&1; then
    FLAVOUR=debian # Debian, Ubuntu, Alpine with the ca-certificates package
    DEST="$DEB_DIR/$NAME.crt"
else
    FLAVOUR=pemdir
    DEST="$PEM_DIR/$NAME.pem"
fi

refresh() {
    case "$FLAVOUR" in
        rhel) update-ca-trust extract ;;
        debian) update-ca-certificates >/dev/null ;;
        pemdir) : ;;
    esac
}

if [ "$MODE" = remove ]; then
    removed=""
    for f in "$DEB_DIR/$NAME.crt" "$RH_DIR/$NAME.crt" "$PEM_DIR/$NAME.pem"; do
        if [ -e "$f" ]; then
            rm -f "$f"
            removed="$removed $f"
        fi
    done
    refresh
    if [ -n "$removed" ]; then
        echo "install-ca: removed$removed; restart dockerd/containerd to drop it from running daemons"
    else
        echo "install-ca: $NAME was not installed; nothing to do"
    fi
    exit 0
fi

TMP=$(mktemp)
trap 'rm -f "$TMP"' EXIT
if [ -n "$URL" ]; then
    if command -v curl >/dev/null 2>&1; then
        curl -fsS --noproxy '*' --max-time 30 -o "$TMP" "$URL" || die "cannot fetch $URL"
    elif command -v wget >/dev/null 2>&1; then
        no_proxy='*' wget -q -T 30 -O "$TMP" "$URL" || die "cannot fetch $URL"
    else
        die "neither curl nor wget to fetch $URL"
    fi
elif [ "$SRC" = - ]; then
    cat >"$TMP"
elif [ -n "$SRC" ]; then
    [ -r "$SRC" ] || die "cannot read $SRC"
    cat "$SRC" >"$TMP"
else
    usage
fi

n=$(grep -c -- '-----BEGIN CERTIFICATE-----' "$TMP" || true)
[ "$n" = 1 ] || die "expected exactly one PEM certificate, found $n"
if grep -q -- 'PRIVATE KEY' "$TMP"; then
    die "the input contains a private key; give the CA certificate (ca.crt) only"
fi
if command -v openssl >/dev/null 2>&1; then
    openssl x509 -noout -in "$TMP" 2>/dev/null || die "the input is not a valid certificate"
fi

mkdir -p "$(dirname "$DEST")"
if [ -f "$DEST" ] && cmp -s "$TMP" "$DEST"; then
    echo "install-ca: $DEST already up to date"
else
    cp "$TMP" "$DEST"
    chmod 0644 "$DEST"
    echo "install-ca: installed $DEST"
fi
refresh
if [ "$FLAVOUR" = pemdir ]; then
    echo "install-ca: no update-ca-certificates/update-ca-trust here; Go programs read $DEST," \
        "others may need the ca-certificates package" >&2
fi
echo "install-ca: trusted; restart dockerd/containerd (Go loads roots once per process)"
