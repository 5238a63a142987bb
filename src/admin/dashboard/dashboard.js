// pullcache dashboard: fetches the admin JSON API and renders it. No dependencies; served from
// the binary. Every figure element gets its raw value in data-value (empty when unknown).
'use strict';

(function () {
  const REFRESH_MS = 5000;
  const HUB = 'registry-1.docker.io';
  const TOKEN_KEY = 'pullcache-admin-token';
  const SVG_NS = 'http://www.w3.org/2000/svg';
  const count = new Intl.NumberFormat('en-US');

  let token = null;
  let timer = null;

  const $ = (id) => document.getElementById(id);

  // --- token: #token=… in the URL (never sent to the server), then sessionStorage ---------

  function initToken() {
    const m = /(?:^#|&)token=([^&]*)/.exec(location.hash);
    if (m) {
      token = decodeURIComponent(m[1]);
      try { sessionStorage.setItem(TOKEN_KEY, token); } catch (e) { /* private mode */ }
      history.replaceState(null, '', location.pathname + location.search);
    } else {
      try { token = sessionStorage.getItem(TOKEN_KEY); } catch (e) { token = null; }
    }
  }

  class Unauthorized extends Error {}

  async function api(path) {
    const headers = { Accept: 'application/json' };
    if (token) headers.Authorization = 'Bearer ' + token;
    const resp = await fetch(path, { headers, cache: 'no-store' });
    if (resp.status === 401) throw new Unauthorized('unauthorized');
    const body = await resp.json().catch(() => ({}));
    if (!resp.ok) throw new Error(path + ': ' + (body.error || resp.status));
    return body;
  }

  // --- formatting ------------------------------------------------------------------------

  function bytes(n) {
    if (n == null) return '–';
    const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB', 'PiB'];
    let v = n;
    let i = 0;
    while (v >= 1024 && i < units.length - 1) { v /= 1024; i += 1; }
    return (i === 0 ? String(v) : v.toFixed(v < 10 ? 2 : 1)) + ' ' + units[i];
  }

  function percent(r) {
    return (r * 100).toFixed(1) + '%';
  }

  function duration(secs) {
    const d = Math.floor(secs / 86400);
    const h = Math.floor((secs % 86400) / 3600);
    const m = Math.floor((secs % 3600) / 60);
    const s = secs % 60;
    if (d > 0) return h ? d + 'd ' + h + 'h' : d + 'd';
    if (h > 0) return m ? h + 'h ' + m + 'm' : h + 'h';
    if (m > 0) return s ? m + 'm ' + s + 's' : m + 'm';
    return secs + 's';
  }

  function ago(unixSecs) {
    const secs = Math.max(0, Math.round(Date.now() / 1000 - unixSecs));
    return duration(secs) + ' ago';
  }

  function clock(d) {
    const p = (n) => String(n).padStart(2, '0');
    return p(d.getHours()) + ':' + p(d.getMinutes()) + ':' + p(d.getSeconds());
  }

  // Sets a figure: raw value in data-value, text for people.
  function figure(id, value, text) {
    const el = $(id);
    if (!el) return;
    el.dataset.value = value == null ? '' : String(value);
    el.textContent = value == null ? '–' : text;
  }

  function cell(tr, text, cls) {
    const td = document.createElement('td');
    td.textContent = text;
    if (cls) td.className = cls;
    tr.appendChild(td);
    return td;
  }

  // --- rendering -------------------------------------------------------------------------

  function renderStats(s) {
    $('version').textContent = 'v' + s.version;
    figure('uptime', s.uptime_s, duration(s.uptime_s));
    figure('hit-ratio', s.hit_ratio, percent(s.hit_ratio));
    for (const k of ['requests', 'hits', 'misses', 'coalesced', 'stale']) {
      figure(k, s[k], count.format(s[k]));
    }
    figure('upstream-manifest-gets', s.upstream_manifest_gets, count.format(s.upstream_manifest_gets));
    figure('bytes-from-cache', s.bytes_from_cache, bytes(s.bytes_from_cache));
    figure('bytes-from-upstream', s.bytes_from_upstream, bytes(s.bytes_from_upstream));

    const hub = (s.registries || {})[HUB];
    const rl = hub && hub.ratelimit ? hub.ratelimit : {};
    figure('quota-remaining', rl.remaining, count.format(rl.remaining));
    figure('quota-limit', rl.limit, count.format(rl.limit));
    $('quota-window').textContent = rl.window_s ? ' per ' + duration(rl.window_s) : '';
    $('quota-of').hidden = rl.limit == null;
    $('quota-seen').textContent = rl.seen_at
      ? 'as of ' + ago(rl.seen_at)
      : 'Docker Hub has not reported it yet';

    const c = s.cache;
    figure('cache-bytes', c.bytes, bytes(c.bytes));
    figure('cache-entries', c.entries, count.format(c.entries));
    figure('cache-max-bytes', c.max_bytes, bytes(c.max_bytes));
    if (c.max_bytes == null) $('cache-max-bytes').textContent = 'none set';
    const fill = c.max_bytes ? Math.min(1, c.bytes / c.max_bytes) : 0;
    $('cache-fill').style.width = (fill * 100).toFixed(1) + '%';
    $('cache-meter').dataset.value = c.max_bytes ? String(fill) : '';
  }

  function renderRepos(r) {
    const body = $('top-repos').tBodies[0];
    const rows = [];
    for (const repo of r.repos) {
      const tr = document.createElement('tr');
      tr.dataset.repo = repo.registry + '/' + repo.repo;
      tr.dataset.bytesFromCache = String(repo.bytes_from_cache);
      const name = cell(tr, repo.repo);
      name.title = repo.registry;
      cell(tr, count.format(repo.requests), 'num');
      cell(tr, percent(repo.hit_ratio), 'num');
      cell(tr, bytes(repo.bytes_from_cache), 'num');
      rows.push(tr);
    }
    if (rows.length === 0) rows.push(emptyRow(4, 'nothing pulled yet'));
    body.replaceChildren(...rows);
    $('top-repos').dataset.rows = String(r.repos.length);
  }

  function emptyRow(span, text) {
    const tr = document.createElement('tr');
    tr.className = 'empty';
    const td = cell(tr, text);
    td.colSpan = span;
    return tr;
  }

  function renderRequests(r) {
    const body = $('recent-requests').tBodies[0];
    const rows = [];
    for (const q of r.requests) {
      const tr = document.createElement('tr');
      tr.dataset.cache = q.cache;
      cell(tr, clock(new Date(q.time))).title = q.time + ' from ' + q.client;
      cell(tr, q.repo || q.kind).title = q.registry;
      const ref = q.reference || '';
      cell(tr, ref.length > 24 ? ref.slice(0, 19) + '…' + ref.slice(-4) : ref).title = ref;
      const outcome = cell(tr, q.cache, 'outcome');
      outcome.classList.add(q.cache.toLowerCase());
      cell(tr, String(q.status) + (q.complete ? '' : ' (cut)'), 'num');
      cell(tr, bytes(q.bytes), 'num');
      cell(tr, q.dur_ms.toFixed(q.dur_ms < 10 ? 1 : 0), 'num');
      rows.push(tr);
    }
    if (rows.length === 0) rows.push(emptyRow(7, 'no requests since start'));
    body.replaceChildren(...rows);
    $('recent-requests').dataset.rows = String(r.requests.length);
  }

  function svg(name, attrs, parent) {
    const el = document.createElementNS(SVG_NS, name);
    for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, String(v));
    if (parent) parent.appendChild(el);
    return el;
  }

  function renderChart(h) {
    const chart = $('chart');
    // Draw in the element's own pixels, so text is never stretched.
    const W = Math.max(320, Math.round(chart.clientWidth || 640));
    const H = 180;
    chart.setAttribute('viewBox', '0 0 ' + W + ' ' + H);
    const top = 14;
    const bottom = 18;
    const plot = H - top - bottom;
    const mins = h.minutes;
    const series = mins.map((m) => ({
      start: m.start,
      hits: m.hits + m.revalidated + m.stale,
      misses: m.misses + m.coalesced,
    }));
    const max = Math.max(1, ...series.map((m) => m.hits + m.misses));
    const slot = W / Math.max(1, series.length);
    const nodes = [];
    const g = svg('g', {});
    svg('line', { x1: 0, y1: top + plot, x2: W, y2: top + plot, class: 'axis' }, g);
    svg('line', { x1: 0, y1: top, x2: W, y2: top, class: 'grid' }, g);
    const label = (x, y, text, anchor) => {
      const t = svg('text', { x, y, 'text-anchor': anchor, class: 'label' }, g);
      t.textContent = text;
    };
    label(2, top - 3, count.format(max) + ' / min', 'start');
    label(2, H - 4, series.length + ' min ago', 'start');
    label(W - 2, H - 4, 'now', 'end');
    let hits = 0;
    let misses = 0;
    series.forEach((m, i) => {
      hits += m.hits;
      misses += m.misses;
      const x = i * slot + 1;
      const w = Math.max(1, slot - 2);
      const hh = (m.hits / max) * plot;
      const mh = (m.misses / max) * plot;
      const bar = svg('g', { class: 'bar' }, g);
      const title = svg('title', {}, bar);
      title.textContent = clock(new Date(m.start * 1000)).slice(0, 5) + ': ' +
        m.hits + ' from cache, ' + m.misses + ' from upstream';
      svg('rect', { x, y: top, width: w, height: plot, class: 'hover' }, bar);
      if (hh > 0) svg('rect', { x, y: top + plot - hh, width: w, height: hh, class: 'hit' }, bar);
      if (mh > 0) svg('rect', { x, y: top + plot - hh - mh, width: w, height: mh, class: 'miss' }, bar);
    });
    nodes.push(g);
    chart.replaceChildren(...nodes);
    chart.dataset.hits = String(hits);
    chart.dataset.misses = String(misses);
    chart.dataset.minutes = String(series.length);
  }

  // --- refresh loop ----------------------------------------------------------------------

  function schedule() {
    clearTimeout(timer);
    timer = setTimeout(refresh, REFRESH_MS);
  }

  async function refresh() {
    try {
      const [stats, repos, requests, history] = await Promise.all([
        api('/api/stats'),
        api('/api/repos?limit=10'),
        api('/api/requests?limit=25'),
        api('/api/history'),
      ]);
      renderStats(stats);
      renderRepos(repos);
      renderRequests(requests);
      renderChart(history);
      $('error').hidden = true;
      $('login').hidden = true;
      $('updated-at').textContent = clock(new Date());
      document.body.dataset.state = 'ok';
      schedule();
    } catch (e) {
      if (e instanceof Unauthorized) {
        $('login').hidden = false;
        $('error').hidden = true;
        document.body.dataset.state = 'unauthorized';
        return; // waits for a token
      }
      $('error').textContent = 'Cannot read pullcache\'s admin API: ' + e.message + ' (retrying)';
      $('error').hidden = false;
      document.body.dataset.state = 'error';
      schedule();
    }
  }

  function start() {
    initToken();
    $('login').addEventListener('submit', (ev) => {
      ev.preventDefault();
      token = $('token-input').value.trim();
      try { sessionStorage.setItem(TOKEN_KEY, token); } catch (e) { /* private mode */ }
      refresh();
    });
    refresh();
  }

  if (document.readyState === 'loading') {
    document.addEventListener('DOMContentLoaded', start);
  } else {
    start();
  }
})();
