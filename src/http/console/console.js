// sbmon's web console: the fleet page (`/`) and a target's page (`/targets/NAME`). It reads
// sbmon's own endpoints only: /console/api/* (the sampler's ring and the watcher's last look,
// which ask the image nothing), /events (GC and journal events, streamed), /monitoring/events
// (the journal), and /rpc for what needs the image (threads, backtraces, heap histograms),
// which it asks only when the person does or at a modest interval. With a token set, the
// page asks for it once per tab and sends it as a Bearer token.
'use strict';
(function () {
  const TOKEN_KEY = 'sbmon-token';
  /** Seconds between two thread listings while the page is visible (each one asks the image). */
  const THREADS_EVERY = 15;
  const MAX_EVENTS = 100;
  const $ = (id) => document.getElementById(id);

  // ---- talking to sbmon -------------------------------------------------------------------

  class Unauthorized extends Error {}

  function authHeaders(extra) {
    const h = Object.assign({}, extra || {});
    const t = sessionStorage.getItem(TOKEN_KEY);
    if (t) h.Authorization = 'Bearer ' + t;
    return h;
  }

  async function request(path, opts) {
    opts = opts || {};
    const init = { method: opts.method || 'GET', cache: 'no-store', headers: authHeaders() };
    if (opts.body !== undefined) {
      init.headers = authHeaders({ 'Content-Type': 'application/json' });
      init.body = JSON.stringify(opts.body);
    }
    if (opts.signal) init.signal = opts.signal;
    const r = await fetch(path, init);
    if (r.status === 401) {
      askToken();
      throw new Unauthorized('this sbmon needs its token');
    }
    return r;
  }

  async function getJson(path, opts) {
    const r = await request(path, opts);
    const body = await r.json().catch(() => null);
    if (!r.ok) throw new Error((body && body.error) || path + ': HTTP ' + r.status);
    return body;
  }

  /** One tool call through JSON-RPC, as every other front end makes it. */
  async function rpc(method, params) {
    const body = await getJson('/rpc', {
      method: 'POST',
      body: { jsonrpc: '2.0', id: 1, method: method, params: params || {} },
    });
    if (body.error) throw new Error(body.error.message);
    return body.result;
  }

  /** Server-Sent Events read through fetch (EventSource cannot send a token). */
  async function follow(path, onEvent, onState) {
    for (;;) {
      try {
        const r = await request(path);
        if (!r.ok) throw new Error(path + ': HTTP ' + r.status);
        onState(true);
        const reader = r.body.getReader();
        const decoder = new TextDecoder();
        let buffer = '';
        for (;;) {
          const chunk = await reader.read();
          if (chunk.done) break;
          buffer += decoder.decode(chunk.value, { stream: true });
          let end;
          while ((end = buffer.indexOf('\n\n')) >= 0) {
            const block = buffer.slice(0, end);
            buffer = buffer.slice(end + 2);
            let kind = 'message';
            const data = [];
            for (const line of block.split('\n')) {
              if (line.startsWith('event:')) kind = line.slice(6).trim();
              else if (line.startsWith('data:')) data.push(line.slice(5).replace(/^ /, ''));
            }
            if (!data.length) continue;
            let value;
            try { value = JSON.parse(data.join('\n')); } catch (_) { continue; }
            onEvent(kind, value);
          }
        }
      } catch (e) {
        if (e instanceof Unauthorized) return;
      }
      onState(false);
      await sleep(2000);
    }
  }

  /** Marks when the page first showed live figures (the README's first-render figure). */
  function firstData() {
    if (!performance.getEntriesByName('sbmon-first-data').length) performance.mark('sbmon-first-data');
  }

  const sleep = (ms) => new Promise((done) => setTimeout(done, ms));

  function askToken() {
    const form = $('token-form');
    if (!form || !form.hidden) return;
    form.hidden = false;
    $('token-input').focus();
  }

  function setupToken() {
    const form = $('token-form');
    form.addEventListener('submit', (e) => {
      e.preventDefault();
      sessionStorage.setItem(TOKEN_KEY, $('token-input').value.trim());
      location.reload();
    });
  }

  function showError(e) {
    if (e instanceof Unauthorized) return;
    const el = $('error');
    el.textContent = String(e && e.message ? e.message : e);
    el.hidden = false;
  }

  function clearError() { $('error').hidden = true; }

  function setLive(on) {
    const el = $('live');
    el.dataset.state = on ? 'live' : 'offline';
    el.textContent = on ? 'live' : 'offline, retrying';
  }

  // ---- formatting ---------------------------------------------------------------------------

  function bytes(n) {
    if (n === null || n === undefined) return '–';
    const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
    let v = Math.abs(n), i = 0;
    while (v >= 1024 && i < units.length - 1) { v /= 1024; i++; }
    return (n < 0 ? '-' : '') + (i ? v.toFixed(1) : String(v)) + ' ' + units[i];
  }

  function duration(s) {
    if (s === null || s === undefined) return '–';
    s = Math.round(s);
    const d = Math.floor(s / 86400), h = Math.floor(s % 86400 / 3600), m = Math.floor(s % 3600 / 60);
    if (d) return d + 'd ' + h + 'h';
    if (h) return h + 'h ' + m + 'm';
    if (m) return m + 'm ' + (s % 60) + 's';
    return s + 's';
  }

  function ms(seconds) {
    return seconds === null || seconds === undefined ? '–' : (seconds * 1000).toFixed(2) + ' ms';
  }

  function clock(unix) {
    return new Date(unix * 1000).toLocaleTimeString([], { hour12: false });
  }

  /** An element with attributes and children (strings become text: nothing is parsed as HTML). */
  function el(tag, attrs, ...children) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k === 'class') e.className = v;
      else if (k.startsWith('data-')) e.dataset[k.slice(5).replace(/-(.)/g, (_, c) => c.toUpperCase())] = v;
      else e.setAttribute(k, v);
    }
    for (const c of children.flat(Infinity)) {
      if (c === null || c === undefined || c === false) continue;
      e.append(c instanceof Node ? c : document.createTextNode(String(c)));
    }
    return e;
  }

  const statusSpan = (s) => el('span', { class: 'status-' + (s || 'unknown') }, s || 'unknown');

  // ---- the fleet page -----------------------------------------------------------------------

  async function fleetPage() {
    const overview = await getJson('/console/api/overview');
    $('version').textContent = 'v' + overview.version;
    $('mcp-url').textContent = location.origin + overview.mcp;
    const tools = $('tools').tBodies[0];
    for (const t of overview.tools) {
      tools.append(el('tr', {}, el('td', {}, el('code', {}, t.name)), el('td', {}, t.class), el('td', {}, t.description)));
    }
    const every = Math.min(5, Math.max(1, overview.sample_interval_seconds || 5)) * 1000;
    for (;;) {
      try {
        renderFleet(await getJson('/console/api/fleet'));
        firstData();
        clearError();
        setLive(true);
      } catch (e) {
        if (e instanceof Unauthorized) return;
        setLive(false);
      }
      await sleep(every);
    }
  }

  function renderFleet(cards) {
    const box = $('cards');
    $('empty').hidden = cards.length > 0;
    const seen = new Set();
    for (const c of cards) {
      seen.add(c.name);
      const fresh = fleetCard(c);
      const old = Array.from(box.children).find((n) => n.dataset.target === c.name);
      if (old) old.replaceWith(fresh); else box.append(fresh);
    }
    for (const n of Array.from(box.children)) if (!seen.has(n.dataset.target)) n.remove();
  }

  function fleetCard(c) {
    const href = '/targets/' + encodeURIComponent(c.name);
    const q = encodeURIComponent(c.name);
    const heap = c.heap_used_bytes === null || c.heap_used_bytes === undefined
      ? '–'
      : el('span', { class: 'heap', 'data-bytes': String(c.heap_used_bytes) }, bytes(c.heap_used_bytes) + ' of ' + bytes(c.heap_limit_bytes));
    const trend = c.trend
      ? [c.trend.verdict, c.trend.retained_last_bytes != null ? ', retained ' + bytes(c.trend.retained_last_bytes) : '',
        c.trend.retained_slope_bytes_per_second != null ? ' (' + bytes(Math.round(c.trend.retained_slope_bytes_per_second)) + '/s)' : ''].join('')
      : '–';
    const threads = c.threads === null || c.threads === undefined
      ? '–'
      : el('span', {}, String(c.threads), c.stuck_threads ? el('span', { class: 'flag' }, c.stuck_threads + ' stuck') : '');
    const rows = [
      ['Lisp', c.lisp_version || '–'],
      ['pid', c.pid === null || c.pid === undefined ? '–' : String(c.pid)],
      ['Uptime', duration(c.uptime_seconds)],
      ['Health', c.health ? statusSpan(c.health) : '–'],
      ['Heap', heap],
      ['Retained', trend],
      ['RSS', bytes(c.rss_bytes) + (c.memory_limit_bytes ? ' of ' + bytes(c.memory_limit_bytes) : '')],
      ['GC p99', ms(c.gc_pause_p99_seconds)],
      ['Threads', threads],
    ];
    const problems = (c.problems || []).map((p) => el('li', {}, statusSpan(p.status), ' ', el('code', {}, p.check), ': ', p.reason));
    return el('article', { class: 'card', 'data-target': c.name, 'data-state': c.state },
      el('h3', {}, el('a', { href: href }, c.name), el('span', { class: 'state' }, c.state)),
      c.reason ? el('p', { class: 'error' }, c.reason) : null,
      el('dl', {}, rows.map(([k, v]) => [el('dt', {}, k), el('dd', {}, v)])),
      problems.length ? el('ul', { class: 'problems' }, problems) : null,
      el('div', { class: 'links' },
        el('a', { href: href }, 'Live view'),
        el('a', { href: '/metrics?target=' + q }, 'metrics'),
        el('a', { href: '/health/targets/' + q }, 'health'),
        el('span', { class: 'muted' }, 'MCP ' + location.origin + '/mcp (target "' + c.name + '")')));
  }

  // ---- the target page ----------------------------------------------------------------------

  const state = {
    name: '',
    since: 0,
    data: null,
    pauses: new Map(),
    charts: {},
    histogramId: null,
    selectedTid: null,
    /** [first, last] unix time of the charts' x axis: the samples held. */
    window: null,
  };

  async function targetPage() {
    const name = decodeURIComponent(location.pathname.slice('/targets/'.length));
    state.name = name;
    document.title = name + ' · sbmon';
    $('name').textContent = name;
    makeCharts();
    // The first figures are asked for at once, beside the overview, so they show sooner.
    const first = Promise.all([loadSamples(), loadSummary()]).then(firstData, () => {});
    const overview = await getJson('/console/api/overview');
    if (!overview.targets.includes(name)) {
      showError('sbmon does not watch a target named "' + name + '"; it watches: ' + (overview.targets.join(', ') || 'none'));
      return;
    }
    state.stuckWarning = overview.stuck_warning_seconds;
    $('threads-refresh').addEventListener('click', () => loadThreads());
    $('threads').addEventListener('click', (e) => {
      const row = e.target.closest('tr[data-tid]');
      if (row) backtrace(Number(row.dataset.tid), row.dataset.name);
    });
    $('histogram-run').addEventListener('click', histogram);
    if (overview.control) {
      $('profile').hidden = false;
      $('profile-run').addEventListener('click', profile);
    }
    loadEvents();
    follow('/events?target=' + encodeURIComponent(name), onStreamEvent, setLive);
    threadsLoop();
    const every = Math.min(5, Math.max(1, overview.sample_interval_seconds || 5)) * 1000;
    await first;
    for (;;) {
      await sleep(every);
      try {
        await Promise.all([loadSamples(), loadSummary()]);
        firstData();
        clearError();
      } catch (e) {
        if (e instanceof Unauthorized) return;
        showError(e);
      }
    }
  }

  async function threadsLoop() {
    for (;;) {
      if (document.visibilityState === 'visible') await loadThreads();
      await sleep(THREADS_EVERY * 1000);
    }
  }

  const chartDefs = {
    heap: { el: 'chart-heap', unit: bytes, series: [
      { label: 'heap used', stroke: '#2b6cb0', width: 2 },
      { label: 'retained', stroke: '#c05621', width: 2, points: { show: true, size: 5 } },
      { label: 'heap limit', stroke: '#a0aec0', dash: [4, 4], show: false }] },
    rss: { el: 'chart-rss', unit: bytes, series: [
      { label: 'RSS', stroke: '#2f855a', width: 2 },
      { label: 'memory limit', stroke: '#a0aec0', dash: [4, 4], show: false }] },
    alloc: { el: 'chart-alloc', unit: (v) => bytes(Math.round(v)) + '/s', series: [
      { label: 'allocated', stroke: '#6b46c1', width: 2 }] },
    pauses: { el: 'chart-pauses', unit: (v) => v.toFixed(2) + ' ms', series: [
      { label: 'pause', stroke: '#c53030', width: 1, paths: () => null, points: { show: true, size: 7, fill: '#c53030' } }] },
    cpu: { el: 'chart-cpu', unit: (v) => v.toFixed(1) + '%', series: [
      { label: 'CPU (100% = one core)', stroke: '#b7791f', width: 2 }] },
  };

  function makeCharts() {
    for (const [key, def] of Object.entries(chartDefs)) {
      const box = $(def.el);
      const fmt = (u, v) => (v === null || v === undefined ? '–' : def.unit(v));
      const opts = {
        width: Math.max(200, box.clientWidth),
        height: 200,
        series: [{}].concat(def.series.map((s) => Object.assign({ value: fmt, spanGaps: false }, s))),
        axes: [{}, { values: (u, ticks) => ticks.map((t) => def.unit(t)), size: 88 }],
        // Every chart spans the sampler's window, the pauses too (which may have none in it).
        scales: {
          x: { time: true, range: (u, min, max) => (state.window ? state.window.slice() : [min, max]) },
          y: { range: (u, min, max) => [Math.min(0, min), max > 0 ? max * 1.1 : 1] },
        },
        legend: { live: true },
      };
      const empty = [[]].concat(def.series.map(() => []));
      state.charts[key] = new uPlot(opts, empty, box);
      box.dataset.points = '0';
    }
    const resize = () => {
      for (const [key, def] of Object.entries(chartDefs)) {
        const box = $(def.el);
        state.charts[key].setSize({ width: Math.max(200, box.clientWidth), height: 200 });
      }
    };
    new ResizeObserver(resize).observe(document.querySelector('.charts'));
  }

  async function loadSamples() {
    const d = await getJson('/console/api/targets/' + encodeURIComponent(state.name) + '/samples?since=' + state.since);
    const c = d.columns;
    if (!state.data) {
      state.data = { time: [], heap_used: [], retained: [], heap_limit: [], rss: [], allocation_rate: [], cpu_percent: [] };
    }
    const keep = d.history_seconds || 3600;
    for (const k of Object.keys(state.data)) state.data[k].push(...c[k]);
    if (c.time.length) state.since = c.time[c.time.length - 1];
    const cutoff = d.now - keep;
    const drop = state.data.time.findIndex((t) => t >= cutoff);
    if (drop > 0) for (const k of Object.keys(state.data)) state.data[k].splice(0, drop);
    for (const p of d.pauses) addPause(p);
    const s = state.data;
    if (s.time.length) state.window = [s.time[0], Math.max(s.time[s.time.length - 1], d.now)];
    const limit = s.time.map(() => d.memory_limit_bytes);
    draw('heap', [s.time, s.heap_used, s.retained, s.heap_limit]);
    draw('rss', [s.time, s.rss, limit]);
    draw('alloc', [s.time, s.allocation_rate]);
    draw('cpu', [s.time, s.cpu_percent]);
    drawPauses();
    const lastRss = s.rss.filter((v) => v !== null).pop();
    $('rss-note').textContent = lastRss && d.memory_limit_bytes
      ? '(' + (100 * lastRss / d.memory_limit_bytes).toFixed(1) + '% of ' + bytes(d.memory_limit_bytes) + ')' : '';
  }

  function draw(key, data) {
    state.charts[key].setData(data);
    $(chartDefs[key].el).dataset.points = String(data[1].filter((v) => v !== null).length);
  }

  function addPause(p) {
    if (!state.pauses.has(p.seq)) state.pauses.set(p.seq, p);
  }

  function drawPauses() {
    const list = Array.from(state.pauses.values()).sort((a, b) => a.time - b.time);
    const oldest = state.data && state.data.time.length ? state.data.time[0] : 0;
    const shown = list.filter((p) => p.time >= oldest - 1);
    state.charts.pauses.setData([shown.map((p) => p.time), shown.map((p) => p.wall_seconds * 1000)]);
    const box = $('chart-pauses');
    box.dataset.points = String(shown.length);
    box.dataset.lastSeq = shown.length ? String(shown[shown.length - 1].seq) : '';
  }

  function onStreamEvent(kind, value) {
    if (kind === 'gc') {
      addPause({ seq: value.seq, time: value.time, wall_seconds: value.wall_seconds, generation: value.generation });
      if (state.data) drawPauses();
    } else if (kind === 'journal') {
      addEvent(value, true);
    }
  }

  async function loadSummary() {
    const cards = await getJson('/console/api/fleet');
    const c = cards.find((x) => x.name === state.name);
    if (!c) return;
    const pill = $('state');
    pill.dataset.state = c.state;
    pill.textContent = c.state;
    const items = [
      ['Health', c.health ? statusSpan(c.health) : '–'],
      ['Lisp', c.lisp_version || '–'],
      ['pid', c.pid === null || c.pid === undefined ? '–' : String(c.pid)],
      ['Uptime', duration(c.uptime_seconds)],
      ['Heap', bytes(c.heap_used_bytes) + ' of ' + bytes(c.heap_limit_bytes)],
      ['Trend', c.trend ? c.trend.verdict : '–'],
      ['GC pause p99', ms(c.gc_pause_p99_seconds)],
      ['Threads', c.threads === null || c.threads === undefined ? '–' : c.threads + (c.stuck_threads ? ' (' + c.stuck_threads + ' stuck)' : '')],
    ];
    const box = $('summary');
    box.replaceChildren(
      c.reason ? el('p', { class: 'error' }, c.reason) : '',
      el('dl', {}, items.map(([k, v]) => el('div', {}, el('dt', {}, k), el('dd', {}, v)))),
      (c.problems || []).length
        ? el('ul', { class: 'problems' }, c.problems.map((p) => el('li', {}, statusSpan(p.status), ' ', el('code', {}, p.check), ': ', p.reason)))
        : '');
  }

  async function loadThreads() {
    const note = $('threads-note');
    const button = $('threads-refresh');
    button.disabled = true;
    try {
      const list = await rpc('thread_list', { target: state.name });
      renderThreads(list);
      note.textContent = list.count + ' threads at ' + clock(Date.now() / 1000);
    } catch (e) {
      if (!(e instanceof Unauthorized)) note.textContent = 'could not list threads: ' + e.message;
    } finally {
      button.disabled = false;
    }
  }

  function renderThreads(list) {
    const inCycle = new Set();
    const cycles = $('deadlocks');
    cycles.replaceChildren();
    for (const d of list.deadlocks || []) {
      for (const e of d.threads) inCycle.add(e.tid);
      const text = d.threads.map((e) => (e.name || 'unnamed') + ' (' + e.tid + ') waits for ' + e.mutex + ' held by ' + (e.owner_name || e.owner_tid)).join('; ');
      cycles.append(el('p', { class: 'deadlock' }, 'DEADLOCK: ' + text));
    }
    const rows = list.threads.slice().sort((a, b) => (b.cpu_percent || 0) - (a.cpu_percent || 0));
    const body = $('threads').tBodies[0];
    body.replaceChildren(...rows.map((t) => {
      const flags = [];
      if (inCycle.has(t.tid)) flags.push('DEADLOCK');
      if (t.in_debugger) flags.push('DEBUGGER');
      if (t.lisp_wait_type === 'mutex' && t.waited_seconds >= state.stuckWarning) flags.push('WAITING ' + Math.round(t.waited_seconds) + 's');
      const stuck = flags.length > 0;
      if (t.agent) flags.push('agent');
      let waits = '';
      if (t.lisp_wait) {
        waits = t.lisp_wait + (t.owner_name || t.owner_tid ? ' (' + (t.owner_name || '?') + ' ' + (t.owner_tid || '?') + ')' : '');
      }
      return el('tr', {
        'data-tid': t.tid === null ? null : String(t.tid),
        'data-name': t.name || '',
        class: [stuck ? 'stuck' : '', t.tid === state.selectedTid ? 'selected' : ''].join(' ').trim() || null,
      },
      el('td', {}, t.name || '(unnamed)'),
      el('td', { class: 'num' }, t.tid === null ? '–' : String(t.tid)),
      el('td', { class: 'num' }, t.cpu_percent === null || t.cpu_percent === undefined ? '–' : t.cpu_percent.toFixed(1)),
      el('td', {}, t.os_state || '–'),
      el('td', {}, waits),
      el('td', {}, flags.map((f) => el('span', { class: 'flag' + (f === 'agent' ? ' agent' : '') }, f))));
    }));
  }

  async function backtrace(tid, name) {
    state.selectedTid = tid;
    for (const r of $('threads').querySelectorAll('tr.selected')) r.classList.remove('selected');
    const row = $('threads').querySelector('tr[data-tid="' + tid + '"]');
    if (row) row.classList.add('selected');
    const box = $('backtrace');
    box.hidden = false;
    $('backtrace-title').textContent = 'Backtrace of ' + (name || 'thread') + ' (' + tid + ')';
    const frames = $('backtrace-frames');
    frames.textContent = 'asking the image…';
    try {
      const d = await rpc('thread_inspect', { target: state.name, thread_id: tid, max_frames: 60, timeout_ms: 1000 });
      const lines = d.frames.map((f, i) => String(i).padStart(3) + '  ' + f);
      if (!d.answered) lines.unshift('(the thread did not answer the interrupt' + (d.wchan ? '; kernel wait: ' + d.wchan : '') + ')');
      if (d.truncated) lines.push('…');
      frames.textContent = lines.join('\n') || '(no frames)';
    } catch (e) {
      frames.textContent = 'could not read the backtrace: ' + e.message;
    }
  }

  async function histogram() {
    const button = $('histogram-run');
    const note = $('histogram-note');
    button.disabled = true;
    note.textContent = 'walking the heap…';
    const args = { target: state.name, top: 30 };
    if (state.histogramId !== null) args.since = state.histogramId;
    try {
      let h;
      try {
        h = await rpc('heap_histogram', args);
      } catch (e) {
        // The image keeps only its last few snapshots: start over without a diff.
        if (args.since === undefined) throw e;
        delete args.since;
        h = await rpc('heap_histogram', args);
      }
      renderHistogram(h);
      if (h.snapshot_id !== null && h.snapshot_id !== undefined) state.histogramId = h.snapshot_id;
    } catch (e) {
      note.textContent = 'could not take a histogram: ' + e.message;
    } finally {
      button.disabled = false;
    }
  }

  function renderHistogram(h) {
    const diff = h.since !== null && h.since !== undefined;
    const sign = (v) => (v === null || v === undefined ? '–' : (v > 0 ? '+' : '') + v.toLocaleString());
    const signBytes = (v) => (v === null || v === undefined ? '–' : (v > 0 ? '+' : '') + bytes(v));
    const cls = (v) => 'num' + (v > 0 ? ' grow' : v < 0 ? ' shrink' : '');
    $('histogram-note').textContent = bytes(h.bytes) + ' in ' + h.objects.toLocaleString() + ' objects of ' + h.types + ' types, walked in ' +
      h.walk_seconds.toFixed(2) + ' s' + (diff ? '; changes since histogram #' + h.since + ' (' + signBytes(h.bytes_delta) + ')' : '; take another to see what changed') +
      (h.truncated ? '; truncated (the walk ran out of time)' : '');
    const table = $('histogram');
    table.hidden = false;
    table.tBodies[0].replaceChildren(...h.rows.map((r) => el('tr', {},
      el('td', {}, el('code', {}, r.type)),
      el('td', { class: 'num' }, r.count.toLocaleString()),
      el('td', { class: 'num' }, bytes(r.bytes)),
      el('td', { class: cls(r.count_delta) }, sign(r.count_delta)),
      el('td', { class: cls(r.bytes_delta) }, signBytes(r.bytes_delta)))));
  }

  async function profile() {
    const button = $('profile-run');
    const note = $('profile-note');
    button.disabled = true;
    note.textContent = 'sampling for 5 s…';
    try {
      const r = await request('/console/api/targets/' + encodeURIComponent(state.name) + '/profile', { method: 'POST', body: { seconds: 5 } });
      const type = r.headers.get('content-type') || '';
      if (!type.startsWith('image/svg+xml')) {
        const body = await r.json().catch(() => null);
        throw new Error((body && body.error) || 'HTTP ' + r.status);
      }
      const svg = await r.blob();
      const frame = $('flame');
      if (frame.dataset.url) URL.revokeObjectURL(frame.dataset.url);
      const url = URL.createObjectURL(new Blob([svg], { type: 'image/svg+xml' }));
      frame.dataset.url = url;
      frame.src = url;
      frame.hidden = false;
      note.textContent = 'taken at ' + clock(Date.now() / 1000) + '; click a frame to zoom, Ctrl-F to search';
    } catch (e) {
      if (!(e instanceof Unauthorized)) note.textContent = 'could not profile: ' + e.message;
    } finally {
      button.disabled = false;
    }
  }

  async function loadEvents() {
    try {
      const d = await getJson('/monitoring/events?target=' + encodeURIComponent(state.name) + '&limit=50');
      for (const e of d.events) addEvent(e, true);
    } catch (e) {
      if (!(e instanceof Unauthorized)) $('events').append(el('li', { class: 'error' }, 'could not read the journal: ' + e.message));
    }
  }

  const shownEvents = new Set();

  function addEvent(e, newestFirst) {
    if (shownEvents.has(e.seq)) return;
    shownEvents.add(e.seq);
    const list = $('events');
    const item = el('li', { 'data-seq': String(e.seq), 'data-kind': e.kind },
      el('time', {}, clock(e.time)),
      el('span', { class: 'sev sev-' + e.severity }, e.severity),
      el('code', {}, e.kind), ' ', e.message);
    if (newestFirst) list.prepend(item); else list.append(item);
    while (list.children.length > MAX_EVENTS) list.lastElementChild.remove();
  }

  // ---- start --------------------------------------------------------------------------------

  document.addEventListener('DOMContentLoaded', () => {
    setupToken();
    const page = document.body.dataset.page;
    const run = page === 'target' ? targetPage : fleetPage;
    run().catch(showError);
  });

  // For tests and the curious: what the page holds (read-only use).
  window.sbmonConsole = state;
})();
