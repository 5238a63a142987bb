#!/usr/bin/env bash
# Checks pullcache's dashboard in a real browser: loads GET / of a running pullcache's admin
# port in headless Chromium (Debian's package, installed if missing), lets the page's script
# fetch the API, dumps the resulting DOM and checks that every figure on the page matches
# /api/stats (and the top repositories, recent requests and chart match their endpoints).
# A screenshot is kept as a CI artifact.
#
# Meant to run after some pulls through that pullcache (scripts/e2e.sh calls it); each check
# prints ok/FAIL, and the last line is `dashboard: N passed, M failed` (exit 1 if M > 0).
#
# Environment:
#   PULLCACHE_ADMIN_URL     admin base URL (required), e.g. http://127.0.0.1:3129
#   PULLCACHE_ADMIN_TOKEN   its bearer token, if pullcache runs with --admin-token
#   DASHBOARD_SCREENSHOT    where the PNG goes (default: <repo>/target/dashboard.png)
#   DASHBOARD_BUDGET_MS     virtual time the page's script gets (default 5000)
#   DASHBOARD_TIMEOUT       bound for one chromium run, seconds (default 90)
#   DASHBOARD_KEEP=1        keep the work directory (DOM dump, JSON, chromium logs)
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=scripts/lib/common.sh
source "$HERE/lib/common.sh"

URL="${PULLCACHE_ADMIN_URL:-}"
URL="${URL%/}"
TOKEN="${PULLCACHE_ADMIN_TOKEN:-}"
SHOT="${DASHBOARD_SCREENSHOT:-$PC_REPO_ROOT/target/dashboard.png}"
BUDGET_MS="${DASHBOARD_BUDGET_MS:-5000}"
TIMEOUT="${DASHBOARD_TIMEOUT:-90}"

PASSED=0
FAILED=0
ok() { PASSED=$((PASSED + 1)); echo "ok   - $*"; }
bad() { FAILED=$((FAILED + 1)); echo "FAIL - $*"; }
finish() {
    echo "dashboard: $PASSED passed, $FAILED failed"
    [ "$FAILED" -eq 0 ]
}

if [ -z "$URL" ]; then
    bad "PULLCACHE_ADMIN_URL is not set (the admin URL of a running pullcache)"
    finish
    exit 1
fi

W=$(mktemp -d "${TMPDIR:-/tmp}/pullcache-dashboard.XXXXXX")
cleanup() {
    if [ "${DASHBOARD_KEEP:-0}" = 1 ]; then
        pc_log "dashboard work directory kept: $W"
    else
        rm -rf "$W"
    fi
}
trap cleanup EXIT

# --- the browser ---------------------------------------------------------------------------

# chromium itself, a font for the screenshot, and the tools used below.
PC_APT_PACKAGES=(chromium fonts-dejavu-core curl python3 ca-certificates)
# In a subshell: pc_ensure_packages exits when it cannot install, and this script must still
# print its summary.
if (pc_ensure_packages) >"$W/apt.log" 2>&1 && command -v chromium >/dev/null; then
    ok "chromium is installed ($(chromium --version 2>/dev/null | head -n1))"
else
    tail -n 20 "$W/apt.log"
    bad "chromium could not be installed"
    finish
    exit 1
fi

# chromium NAME ARGS... : one headless run with a fresh profile; output in $W/NAME.out,
# diagnostics in $W/NAME.log.
run_chromium() {
    local name="$1"
    shift
    local profile="$W/profile-$name"
    mkdir -p "$profile"
    timeout --kill-after=5 "$TIMEOUT" chromium \
        --headless --no-sandbox --disable-gpu --disable-quic --no-first-run \
        --disable-background-networking --disable-component-update --disable-sync \
        --disable-dev-shm-usage --no-proxy-server --hide-scrollbars \
        --user-data-dir="$profile" "$@" >"$W/$name.out" 2>"$W/$name.log"
}

# The token travels in the URL fragment: the page's script reads it, the browser never sends
# it to a server (see src/admin/dashboard.rs).
PAGE="$URL/"
if [ -n "$TOKEN" ]; then
    PAGE="$URL/#token=$(python3 -c 'import sys, urllib.parse; print(urllib.parse.quote(sys.argv[1], safe=""))' "$TOKEN")"
fi

# --- what the API says ---------------------------------------------------------------------

api() { # PATH OUT
    local auth=()
    [ -z "$TOKEN" ] || auth=(-H "Authorization: Bearer $TOKEN")
    curl -fsS --noproxy '*' --max-time 10 "${auth[@]}" "$URL$1" -o "$2"
}

if api /api/stats "$W/stats.json" && api "/api/repos?limit=10" "$W/repos.json" &&
    api "/api/requests?limit=25" "$W/requests.json" && api /api/history "$W/history.json"; then
    ok "the admin API answers at $URL"
else
    bad "the admin API at $URL does not answer (is pullcache running? is the token right?)"
    finish
    exit 1
fi

if [ -n "$TOKEN" ]; then
    code=$(curl -sS --noproxy '*' --max-time 10 -o /dev/null -w '%{http_code}' "$URL/api/stats" || true)
    if [ "$code" = 401 ]; then
        ok "without the token the API answers 401"
    else
        bad "without the token the API answered $code, not 401"
    fi
fi

ctype=$(curl -fsS --noproxy '*' --max-time 10 -o "$W/page.html" -w '%{content_type}' "$URL/" || true)
if [[ "$ctype" == text/html* ]]; then
    ok "GET / serves the page ($ctype)"
else
    bad "GET / did not serve HTML (content type: ${ctype:-none})"
fi

# --- the page, after its script ran --------------------------------------------------------

if run_chromium dom --virtual-time-budget="$BUDGET_MS" --dump-dom "$PAGE" && [ -s "$W/dom.out" ]; then
    ok "chromium loaded the dashboard ($(wc -c <"$W/dom.out") bytes of DOM)"
else
    bad "chromium could not load $URL/"
    tail -n 20 "$W/dom.log"
fi

mkdir -p "$(dirname "$SHOT")"
rm -f "$SHOT"
if run_chromium shot --virtual-time-budget="$BUDGET_MS" --window-size=1280,1000 \
    --screenshot="$SHOT" "$PAGE" && [ "$(head -c 8 "$SHOT" 2>/dev/null | od -An -tx1 | tr -d ' \n')" = 89504e470d0a1a0a ]; then
    ok "screenshot saved: $SHOT ($(wc -c <"$SHOT") bytes)"
else
    bad "no screenshot at $SHOT"
    tail -n 20 "$W/shot.log"
fi

# Compares the DOM with the JSON; prints one "ok|FAIL<TAB>message" line per check.
py_rc=0
python3 - "$W" >"$W/compare.out" 2>"$W/compare.err" <<'PY' || py_rc=$?
import json, math, sys
from html.parser import HTMLParser

w = sys.argv[1]
load = lambda name: json.load(open(f"{w}/{name}.json"))
stats, repos, requests, history = (load(n) for n in ("stats", "repos", "requests", "history"))
try:
    dom = open(f"{w}/dom.out", encoding="utf-8").read()
except OSError:
    dom = ""

class Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.by_id, self.text, self.repo_rows, self.request_rows = {}, {}, [], []
        self.body_state, self.external, self._open = None, [], []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "body":
            self.body_state = a.get("data-state")
        if "id" in a:
            self.by_id[a["id"]] = a
            self.text[a["id"]] = ""
        self._open.append(a.get("id"))
        if tag == "tr" and "data-repo" in a:
            self.repo_rows.append(a["data-repo"])
        if tag == "tr" and "data-cache" in a:
            self.request_rows.append(a["data-cache"])
        for attr in ("src", "href"):
            v = a.get(attr) or ""
            if v.startswith(("http:", "https:", "//")):
                self.external.append(v)

    def handle_endtag(self, tag):
        if self._open:
            self._open.pop()

    def handle_data(self, data):
        for i in self._open:
            if i is not None:
                self.text[i] += data

p = Page()
p.feed(dom)

def check(good, msg):
    print(("ok" if good else "FAIL") + "\t" + msg)

def same(page_value, api_value):
    if api_value is None:
        return page_value == ""
    try:
        return math.isclose(float(page_value), float(api_value), rel_tol=1e-9, abs_tol=1e-12)
    except (TypeError, ValueError):
        return False

check(p.body_state == "ok", f"the page's script loaded the data (body data-state={p.body_state!r})")
check(stats["requests"] > 0, f"the API shows traffic to compare ({stats['requests']} requests)")

hub = stats.get("registries", {}).get("registry-1.docker.io", {}).get("ratelimit", {})
figures = {
    "requests": stats["requests"],
    "hits": stats["hits"],
    "misses": stats["misses"],
    "coalesced": stats["coalesced"],
    "stale": stats["stale"],
    "hit-ratio": stats["hit_ratio"],
    "bytes-from-cache": stats["bytes_from_cache"],
    "bytes-from-upstream": stats["bytes_from_upstream"],
    "upstream-manifest-gets": stats["upstream_manifest_gets"],
    "cache-entries": stats["cache"]["entries"],
    "cache-bytes": stats["cache"]["bytes"],
    "cache-max-bytes": stats["cache"]["max_bytes"],
    "quota-remaining": hub.get("remaining"),
    "quota-limit": hub.get("limit"),
}
for fid, want in figures.items():
    el = p.by_id.get(fid)
    if el is None:
        check(False, f"#{fid} is on the page")
        continue
    got = el.get("data-value")
    shown = p.text.get(fid, "").strip()
    check(same(got, want), f"#{fid} shows {shown!r} (data-value {got!r}); /api/stats says {want!r}")

ratio_text = p.text.get("hit-ratio", "").strip()
check(ratio_text == f"{stats['hit_ratio'] * 100:.1f}%",
      f"#hit-ratio reads {ratio_text!r} for hit_ratio {stats['hit_ratio']}")

want_repos = [f"{r['registry']}/{r['repo']}" for r in repos["repos"]]
check(p.repo_rows == want_repos, f"top repositories {p.repo_rows} match /api/repos {want_repos}")

want_outcomes = [r["cache"] for r in requests["requests"]]
check(p.request_rows == want_outcomes,
      f"recent requests ({len(p.request_rows)} rows) match /api/requests ({len(want_outcomes)})")

mins = history["minutes"]
hits = sum(m["hits"] + m["revalidated"] + m["stale"] for m in mins)
misses = sum(m["misses"] + m["coalesced"] for m in mins)
chart = p.by_id.get("chart", {})
check(same(chart.get("data-hits"), hits) and same(chart.get("data-misses"), misses),
      f"the chart counts {chart.get('data-hits')} from cache / {chart.get('data-misses')} from "
      f"upstream; /api/history: {hits} / {misses}")

check(not p.external, f"the page loads nothing from elsewhere {p.external or ''}")
PY

while IFS=$'\t' read -r verdict msg; do
    case "$verdict" in
        ok) ok "$msg" ;;
        *) bad "$msg" ;;
    esac
done <"$W/compare.out"
if [ "$py_rc" -ne 0 ]; then
    bad "the comparison script failed (exit $py_rc): $(tail -n 3 "$W/compare.err" | tr '\n' ' ')"
elif [ ! -s "$W/compare.out" ]; then
    bad "the comparison script produced no result"
fi

if [ "$FAILED" -gt 0 ] && [ -s "$W/dom.log" ]; then
    echo "----- chromium (DOM run) said -----"
    grep -v -e 'dbus' -e 'Fontconfig' "$W/dom.log" | tail -n 20 || true
fi
finish
