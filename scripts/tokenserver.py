#!/usr/bin/env python3
"""Minimal Docker registry token server for pullcache's end-to-end tests.

Stands in for https://auth.docker.io/token.  Python 3 standard library only;
JWTs are signed by shelling out to `openssl dgst -sha256 -sign`, which produces
an RSASSA-PKCS1-v1_5 SHA-256 signature, i.e. exactly JWS "RS256".

Policy (mirrors what the tests need from Docker Hub):
  * anonymous clients get `pull` on every repository except those whose name
    starts with the private prefix (default `private/`);
  * a client presenting valid Basic credentials (default `user:secret`) gets
    every action it asks for (pull, push, ...) on every repository;
  * wrong credentials get 401.

The token header carries `x5c` = [base64 DER of the signing certificate].
distribution 2.8 accepts such a token when the certificate chains to its
`auth.token.rootcertbundle`; the signing certificate is self-signed and *is*
that bundle, so the chain is just the certificate itself.

On start-up the only thing printed on stdout is the bound port number (the
server binds port 0 unless told otherwise), so callers can pick it up without
racing for a free port.  Requests are logged on stderr.
"""

import argparse
import base64
import datetime
import http.server
import json
import os
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import uuid


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def pem_to_der(pem_text: str) -> bytes:
    lines = []
    inside = False
    for line in pem_text.splitlines():
        if line.startswith("-----BEGIN CERTIFICATE-----"):
            inside = True
            continue
        if line.startswith("-----END CERTIFICATE-----"):
            break
        if inside:
            lines.append(line.strip())
    if not lines:
        raise ValueError("no certificate found in PEM")
    return base64.b64decode("".join(lines))


def parse_scope(scope: str):
    """Parse `repository:NAME:act1,act2` (NAME may contain ':' for a port-qualified
    name, so split from both ends).  Returns (type, name, [actions]) or None."""
    first = scope.find(":")
    last = scope.rfind(":")
    if first < 0 or last <= first:
        return None
    rtype = scope[:first]
    name = scope[first + 1:last]
    actions = [a for a in scope[last + 1:].split(",") if a]
    return rtype, name, actions


class Signer:
    def __init__(self, key_path: str, cert_path: str):
        self.key_path = key_path
        with open(cert_path, "r", encoding="ascii") as f:
            self.x5c = [base64.b64encode(pem_to_der(f.read())).decode("ascii")]

    def sign(self, signing_input: bytes) -> bytes:
        # PKCS#1 v1.5 over SHA-256 == RS256.  stdin in, raw signature out.
        res = subprocess.run(
            ["openssl", "dgst", "-sha256", "-sign", self.key_path],
            input=signing_input,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            check=False,
            timeout=30,
        )
        if res.returncode != 0 or not res.stdout:
            raise RuntimeError("openssl sign failed: " + res.stderr.decode(errors="replace"))
        return res.stdout

    def token(self, issuer, subject, audience, access, ttl):
        now = int(time.time())
        header = {"typ": "JWT", "alg": "RS256", "x5c": self.x5c}
        claims = {
            "iss": issuer,
            "sub": subject,
            "aud": audience,
            "exp": now + ttl,
            # Back-date nbf a little: the registry allows some skew, but there
            # is no reason to lean on it.
            "nbf": now - 10,
            "iat": now,
            "jti": uuid.uuid4().hex,
            "access": access,
        }
        signing_input = (
            b64url(json.dumps(header, separators=(",", ":")).encode())
            + "."
            + b64url(json.dumps(claims, separators=(",", ":")).encode())
        ).encode("ascii")
        return signing_input.decode("ascii") + "." + b64url(self.sign(signing_input))


class Handler(http.server.BaseHTTPRequestHandler):
    server_version = "pullcache-test-tokenserver/1"
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt, *args):  # noqa: N802 (stdlib naming)
        sys.stderr.write("%s tokenserver %s %s\n" % (
            datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
            self.address_string(), fmt % args))
        sys.stderr.flush()

    # --- helpers -----------------------------------------------------------
    def send_json(self, code, obj, extra_headers=()):
        body = json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for k, v in extra_headers:
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def basic_user(self):
        """Returns (user or None, ok).  ok is False for presented-but-wrong creds."""
        auth = self.headers.get("Authorization", "")
        if not auth:
            return None, True
        scheme, _, value = auth.partition(" ")
        if scheme.lower() != "basic":
            # Bearer / other schemes: treat as anonymous, like Hub does for
            # schemes it does not understand on this endpoint.
            return None, True
        try:
            user, _, password = base64.b64decode(value.strip()).decode().partition(":")
        except Exception:  # malformed header
            return None, False
        return self.check_creds(user, password)

    def check_creds(self, user, password):
        if self.server.users.get(user) == password:
            return user, True
        return None, False

    def grant(self, user, scopes):
        access = []
        for scope in scopes:
            parsed = parse_scope(scope)
            if parsed is None:
                continue
            rtype, name, actions = parsed
            if rtype != "repository":
                continue  # e.g. registry:catalog:* -> nothing
            if user is not None:
                granted = actions
            elif name.startswith(self.server.private_prefix):
                granted = []
            else:
                granted = [a for a in actions if a == "pull"]
            if granted:
                access.append({"type": "repository", "name": name, "actions": granted})
        return access

    def issue(self, user, service, scopes, oauth=False):
        access = self.grant(user, scopes)
        token = self.server.signer.token(
            issuer=self.server.issuer,
            subject=user or "",
            audience=service or self.server.service,
            access=access,
            ttl=self.server.ttl,
        )
        issued_at = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        self.log_message("issued token user=%s service=%s scopes=%s access=%s",
                         user or "-", service, scopes, json.dumps(access))
        body = {"token": token, "access_token": token,
                "expires_in": self.server.ttl, "issued_at": issued_at}
        if oauth:
            body["scope"] = " ".join(scopes)
        self.send_json(200, body)

    def unauthorized(self):
        self.send_json(401, {"errors": [{"code": "UNAUTHORIZED",
                                         "message": "incorrect username or password"}]},
                       [("WWW-Authenticate", 'Basic realm="pullcache-test-tokenserver"')])

    # --- endpoints ---------------------------------------------------------
    def do_GET(self):  # noqa: N802
        url = urllib.parse.urlsplit(self.path)
        if url.path == "/healthz":
            self.send_json(200, {"ok": True})
            return
        if url.path != "/token":
            self.send_json(404, {"errors": [{"code": "NOT_FOUND", "message": url.path}]})
            return
        q = urllib.parse.parse_qs(url.query)
        user, ok = self.basic_user()
        if not ok:
            self.unauthorized()
            return
        # scope may be repeated and each value may itself hold several
        # space-separated scopes.
        scopes = [s for v in q.get("scope", []) for s in v.split(" ") if s]
        self.issue(user, q.get("service", [self.server.service])[0], scopes)

    def do_POST(self):  # noqa: N802
        # OAuth2 password / refresh-token grant, used by some clients (dockerd
        # with an identity token).  Same policy as GET.
        url = urllib.parse.urlsplit(self.path)
        if url.path != "/token":
            self.send_json(404, {"errors": [{"code": "NOT_FOUND", "message": url.path}]})
            return
        length = int(self.headers.get("Content-Length", "0") or 0)
        form = urllib.parse.parse_qs(self.rfile.read(length).decode(errors="replace"))
        grant = form.get("grant_type", [""])[0]
        user = None
        if grant == "password":
            user, ok = self.check_creds(form.get("username", [""])[0], form.get("password", [""])[0])
            if not ok:
                self.unauthorized()
                return
        elif grant == "refresh_token":
            # We never hand out refresh tokens; treat as anonymous.
            user = None
        else:
            self.send_json(400, {"error": "unsupported_grant_type"})
            return
        scopes = [s for v in form.get("scope", []) for s in v.split(" ") if s]
        self.issue(user, form.get("service", [self.server.service])[0], scopes, oauth=True)


class TLSThreadingServer(http.server.ThreadingHTTPServer):
    daemon_threads = True
    # TLS handshake happens in the per-connection thread (finish_request), not
    # in accept(): a stalled client must not block the listener.
    ssl_context = None

    def finish_request(self, request, client_address):
        try:
            request = self.ssl_context.wrap_socket(request, server_side=True)
        except (ssl.SSLError, OSError) as e:
            sys.stderr.write("tokenserver: TLS handshake from %s failed: %s\n" % (client_address, e))
            sys.stderr.flush()
            return
        super().finish_request(request, client_address)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--cert", required=True, help="TLS certificate (PEM) for auth.docker.io")
    ap.add_argument("--key", required=True, help="TLS private key (PEM)")
    ap.add_argument("--signing-cert", required=True, help="self-signed RSA cert put in x5c")
    ap.add_argument("--signing-key", required=True, help="RSA private key that signs tokens")
    ap.add_argument("--issuer", default="pullcache-test-issuer")
    ap.add_argument("--service", default="registry.docker.io",
                    help="default audience when the request has no service=")
    ap.add_argument("--user", action="append", default=None,
                    help="USER:PASSWORD granted every action (repeatable; default user:secret)")
    ap.add_argument("--private-prefix", default="private/")
    ap.add_argument("--ttl", type=int, default=300)
    ap.add_argument("--port-file", help="also write the port to this file (atomically)")
    args = ap.parse_args()

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(args.cert, args.key)

    server = TLSThreadingServer((args.host, args.port), Handler)
    server.ssl_context = ctx
    server.signer = Signer(args.signing_key, args.signing_cert)
    server.issuer = args.issuer
    server.service = args.service
    server.private_prefix = args.private_prefix
    server.ttl = args.ttl
    server.users = dict(u.split(":", 1) for u in (args.user or ["user:secret"]))

    port = server.server_address[1]
    if args.port_file:
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(args.port_file)))
        with os.fdopen(fd, "w") as f:
            f.write("%d\n" % port)
        os.replace(tmp, args.port_file)
    print(port, flush=True)
    sys.stderr.write("tokenserver: listening on https://%s:%d\n" % (args.host, port))
    sys.stderr.flush()

    # Exit promptly on SIGTERM (default action) or Ctrl-C.
    t = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2}, daemon=True)
    t.start()
    try:
        t.join()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
