// The tether dashboard: one event stream (/api/v1/events) keeps the fleet, the tasks and the
// charts current; controls use the ordinary API routes. No framework, no build step.
"use strict";

const state = {
  workers: new Map(),   // worker_id -> worker
  tasks: new Map(),     // task_id -> task
  overview: null,
  history: [],          // samples, oldest first
  intervalMs: 10000,
  selected: null,       // task_id shown in the detail panel
  runs: [],             // the newest runs, by their latest tries (GET /api/v1/runs)
  run: null,            // the run whose tasks alone the task table shows (its name, exactly)
  skewMs: 0,            // the coordinator's clock less this browser's, at the last snapshot
};
const MAX_TASKS = 2000;
const $ = (sel) => document.querySelector(sel);

// ---- helpers --------------------------------------------------------------------------------

function el(tag, attrs = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === undefined || v === null) continue;
    if (k === "class") e.className = v;
    else if (k.startsWith("data-")) e.setAttribute(k, v);
    else e[k] = v;
  }
  for (const c of children) e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return e;
}
const badge = (text) => el("span", { class: "badge" }, text);
// Now by the coordinator's clock: times on the page are its times, whatever this browser's.
const coordNow = () => Date.now() + state.skewMs;
const ago = (iso) => {
  if (!iso) return "";
  const s = Math.max(0, (coordNow() - Date.parse(iso)) / 1000);
  return s < 60 ? `${s.toFixed(0)} s ago` : s < 3600 ? `${(s / 60).toFixed(0)} min ago` : `${(s / 3600).toFixed(1)} h ago`;
};
const secs = (a, b) => (a && b ? `${((Date.parse(b) - Date.parse(a)) / 1000).toFixed(1)} s` : "");
const time = (iso) => (iso ? new Date(iso).toLocaleTimeString() : "");
const token = () => sessionStorage.getItem("tether.token") || "";
function headers() {
  const h = {};
  if (token()) h.Authorization = `Bearer ${token()}`;
  return h;
}
async function api(method, path, json) {
  const h = headers();
  if (json !== undefined) h["Content-Type"] = "application/json";
  const r = await fetch(path, { method, headers: h, body: json === undefined ? undefined : JSON.stringify(json) });
  const body = await r.json().catch(() => null);
  if (!r.ok) throw new Error(body?.error?.message || `${r.status} ${r.statusText}`);
  return body;
}

// `load` run one call at a time, and at most once every `gapMs`: calls made while one runs or
// waits its turn ask for one more after it (a burst of changes is one request, not one each).
function coalesced(load, gapMs = 0) {
  const s = { busy: false, again: false, last: -Infinity };
  const go = async () => {
    if (s.busy) {
      s.again = true;
      return;
    }
    s.busy = true;
    const wait = s.last + gapMs - performance.now();
    if (wait > 0) await new Promise((done) => setTimeout(done, wait));
    s.again = false;
    s.last = performance.now();
    try {
      await load();
    } finally {
      s.busy = false;
      if (s.again) go();
    }
  };
  return go;
}

// ---- the event stream -----------------------------------------------------------------------
// fetch() rather than EventSource, so the admin token can go in a header.

// A new token ends the current stream (or the wait before the next) and reconnects at once.
const feed = { abort: null, wake: null };

async function follow() {
  let delay = 500;
  for (;;) {
    let status = "down";
    feed.abort = new AbortController();
    try {
      const r = await fetch("/api/v1/events", { headers: headers(), signal: feed.abort.signal });
      if (r.status === 401 || r.status === 403) status = "token needed";
      if (!r.ok || !r.body) throw new Error(`${r.status}`);
      delay = 500;
      const reader = r.body.pipeThrough(new TextDecoderStream()).getReader();
      const push = eventSplitter(dispatch);
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        push(value);
      }
    } catch (e) {
      console.warn("event stream:", e);
    }
    setFeed(status);
    await new Promise((ok) => {
      feed.wake = ok;
      setTimeout(ok, delay);
    });
    delay = Math.min(delay * 2, 10000);
    setFeed("connecting");
  }
}

// Cuts text that comes in chunks into events (blocks ended by a blank line) for `emit`. An
// event's chunks are gathered and joined once it ends, and each chunk is searched once: a
// snapshot of many megabytes in small chunks is not copied and searched again at each one.
function eventSplitter(emit) {
  let parts = []; // the unfinished event's text
  let last = "";  // its last character: the blank line may straddle two chunks
  return (chunk) => {
    let rest = chunk;
    for (;;) {
      if (last === "\n" && rest.startsWith("\n")) {
        emit(parts.join("").slice(0, -1));
        parts = [];
        last = "";
        rest = rest.slice(1);
        continue;
      }
      const end = rest.indexOf("\n\n");
      if (end < 0) break;
      parts.push(rest.slice(0, end));
      emit(parts.join(""));
      parts = [];
      last = "";
      rest = rest.slice(end + 2);
    }
    if (rest) {
      parts.push(rest);
      last = rest[rest.length - 1];
    }
  };
}

function dispatch(block) {
  let name = "message";
  const data = [];
  for (const line of block.split("\n")) {
    if (line.startsWith("event:")) name = line.slice(6).trim();
    else if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
  }
  if (!data.length) return;
  const v = JSON.parse(data.join("\n"));
  switch (name) {
    case "snapshot":
      state.workers = new Map(v.workers.map((w) => [w.worker_id, w]));
      // Newest first on the wire; the map keeps the oldest first so trimming drops it.
      state.tasks = new Map(v.tasks.slice().reverse().map((t) => [t.task_id, t]));
      state.overview = v.overview;
      state.history = v.history;
      state.intervalMs = v.history_interval_ms || state.intervalMs;
      state.skewMs = Date.parse(v.at) - Date.now() || 0;
      setFeed("live");
      dirty.all();
      loadRuns();
      break;
    case "task":
      state.tasks.set(v.task_id, v);
      if (state.tasks.size > MAX_TASKS) state.tasks.delete(state.tasks.keys().next().value);
      if (v.task_id === state.selected) loadDetail();
      dirty.tasks = true;
      // A named task changes its run; a retry (of whatever name, or none) its task's run.
      if (v.spec.name || v.spec.retry_of) loadRuns();
      break;
    case "worker":
      state.workers.set(v.worker_id, v);
      dirty.workers = true;
      break;
    case "task_removed":
      state.tasks.delete(v.task_id);
      dirty.tasks = true;
      break;
    case "worker_removed":
      state.workers.delete(v.worker_id);
      dirty.workers = true;
      break;
    case "sample": {
      // A sample the snapshot's history already holds (or older) is not drawn twice or back
      // in time.
      const last = state.history[state.history.length - 1];
      if (last && Date.parse(v.at) <= Date.parse(last.at)) break;
      state.history.push(v);
      trimHistory();
      state.overview = { ...(state.overview || {}), tasks: v.tasks, queued: v.queued, workers: v.workers };
      dirty.overview = dirty.charts = true;
      break;
    }
  }
  schedule();
}

function trimHistory() {
  const since = coordNow() - 3600 * 1000;
  while (state.history.length && Date.parse(state.history[0].at) < since) state.history.shift();
}

function setFeed(s) {
  const f = $("#feed");
  f.dataset.feed = s;
  f.textContent = s;
}

// ---- rendering ------------------------------------------------------------------------------

let pending = false;
// What changed since the last frame: only that is drawn again. A large fleet's table (each
// worker's telemetry changes it) is drawn at most once a second, not at every frame.
const dirty = {
  overview: true, workers: true, tasks: true, charts: true, runs: true,
  all() { this.overview = this.workers = this.tasks = this.charts = this.runs = true; },
};
const LARGE_FLEET = 500;
let workersDrawn = 0;

function schedule() {
  if (pending) return;
  pending = true;
  requestAnimationFrame(() => {
    pending = false;
    render();
  });
}

function render() {
  if (dirty.overview) renderOverview();
  if (dirty.workers) {
    const wait = workersDrawn + 1000 - performance.now();
    if (state.workers.size < LARGE_FLEET || wait <= 0) {
      renderWorkers();
      workersDrawn = performance.now();
      dirty.workers = false;
    } else {
      setTimeout(schedule, wait);
    }
  }
  if (dirty.tasks) renderTasks();
  if (dirty.runs) renderRuns();
  if (dirty.charts) renderCharts();
  dirty.overview = dirty.tasks = dirty.charts = dirty.runs = false;
}

// The filters and the selection change the task table.
function redrawTasks() {
  dirty.tasks = true;
  schedule();
}

function renderOverview() {
  const o = state.overview;
  if (!o) return;
  const cards = [["workers connected", o.workers?.connected ?? 0], ["queued", o.queued ?? 0]];
  for (const s of ["running", "paused", "completed", "failed", "cancelled", "timed_out"]) cards.push([s, o.tasks?.[s] ?? 0]);
  $("#overview").replaceChildren(...cards.map(([k, v]) => el("div", { class: "card", "data-card": k }, el("b", {}, v), el("span", {}, k))));
}

function renderWorkers() {
  const rows = [...state.workers.values()].map((w) => {
    const s = w.stats || {};
    const reconnects = s.reconnects ?? Math.max(0, (w.sessions || 0) - 1);
    return el("tr", { "data-worker": w.worker_id, "data-state": w.state, "data-reconnects": reconnects },
      el("td", {}, w.worker_id),
      el("td", {}, badge(workerBadge(w))),
      el("td", {}, (w.capabilities || []).join(", ")),
      el("td", {}, (w.leases || []).map((t) => t.slice(0, 8)).join(" ")),
      el("td", {}, `${(w.leases || []).length}/${w.slots}`),
      el("td", {}, s.rtt_samples ? `${s.rtt_p50_ms.toFixed(1)} ms` : ""),
      el("td", {}, s.stability !== undefined ? `${(s.stability * 100).toFixed(1)} %` : ""),
      el("td", {}, reconnects),
      el("td", { title: w.last_seen }, w.state === "connected" ? "now" : ago(w.last_seen)),
      el("td", {}, drainButton(w)));
  });
  $("#workers tbody").replaceChildren(...rows);
}

// A connected worker's badge says why it takes no new task; drained by an operator, "draining"
// while what it holds runs on and "drained" once it holds nothing; one drained and not
// connected says both (as `tether workers` says).
function workerBadge(w) {
  if (w.state !== "connected") return w.draining ? `${w.state}, drained` : w.state;
  if (w.stopping) return "stopping";
  if (w.draining) return (w.leases || []).length ? "draining" : "drained";
  return w.resting ? "resting" : w.state;
}

function drainButton(w) {
  const action = w.draining ? "undrain" : "drain";
  const b = el("button", { "data-drain": action, title: w.draining ? "take tasks again" : "no new task; what it holds runs on" }, action);
  b.onclick = () => drainWorker(w.worker_id, action);
  return b;
}

async function drainWorker(id, action) {
  const msg = $("#fleet-message");
  try {
    const w = await api("POST", `/api/v1/workers/${encodeURIComponent(id)}/${action}`);
    state.workers.set(w.worker_id, w);
    msg.textContent = `${id}: ${action}ed`;
    dirty.workers = true;
    schedule();
  } catch (e) {
    msg.textContent = `${id} ${action}: ${e.message}`;
  }
}

function renderTasks() {
  const status = $("#status-filter").value;
  const text = $("#text-filter").value.trim().toLowerCase();
  const all = [...state.tasks.values()].sort((a, b) => b.submit_seq - a.submit_seq);
  const shown = all.filter((t) => {
    if (status && t.status !== status) return false;
    if (state.run !== null && t.spec.name !== state.run) return false;
    if (!text) return true;
    const worker = t.lease?.worker || t.attempts?.at(-1)?.worker || "";
    return [t.task_id, t.spec.kind, t.spec.name || "", worker].some((s) => s.toLowerCase().includes(text));
  });
  const rows = shown.slice(0, 300).map((t) => {
    const last = t.attempts?.at(-1);
    const tr = el("tr", { "data-task": t.task_id, "data-status": t.status, class: t.task_id === state.selected ? "selected" : "" },
      el("td", { title: t.task_id }, el("code", {}, t.task_id.slice(0, 8))),
      el("td", {}, t.spec.kind),
      el("td", { class: "name", title: t.spec.name || "" }, t.spec.name || ""),
      el("td", {}, badge(t.status)),
      el("td", {}, t.attempt),
      el("td", {}, t.lease?.worker || last?.worker || ""),
      el("td", {}, time(t.submitted_at)),
      el("td", {}, secs(last?.started_at, t.finished_at)));
    tr.onclick = () => select(t.task_id);
    return tr;
  });
  $("#tasks tbody").replaceChildren(...rows);
  $("#task-count").textContent = `${shown.length} of ${all.length}`;
}

// ---- runs -----------------------------------------------------------------------------------
// The coordinator judges a run (its latest tries follow retries it recorded, under any name),
// so the page asks it rather than judging from the tasks it holds: at most one request in
// flight and one a second (`coalesced`), however many of a run's tasks change.

const RUNS_SHOWN = 10;

const loadRuns = coalesced(async () => {
  try {
    state.runs = await api("GET", `/api/v1/runs?limit=${RUNS_SHOWN}`);
    $("#runs-message").textContent = state.runs.length ? "" : "no run yet: tasks submitted under one name (--name) make one";
  } catch (e) {
    $("#runs-message").textContent = `could not load the runs: ${e.message}`;
  }
  dirty.runs = true;
  schedule();
}, 1000);

function renderRuns() {
  const rows = state.runs.map((r) => {
    const statuses = Object.entries(r.by_status).map(([s, n]) => `${n} ${s}`).join(", ");
    const name = el("a", { href: "#", title: "show its tasks" }, r.name);
    name.onclick = (e) => {
      e.preventDefault();
      showRun(r.name);
    };
    return el("tr", { "data-run": r.name, "data-verdict": r.verdict },
      el("td", { class: "name" }, name),
      el("td", {}, badge(r.verdict)),
      el("td", {}, r.tasks),
      el("td", {}, statuses),
      el("td", {}, r.retried),
      el("td", {}, r.flaky),
      el("td", {}, time(r.last_submitted_at)),
      el("td", {}, secs(r.first_submitted_at, r.finished_at)));
  });
  $("#runs tbody").replaceChildren(...rows);
}

// The task table shows the tasks of run `name` alone (its name exactly: a text filter of
// "nightly" would show "nightly-2" too), or every run's again with `null`.
function showRun(name) {
  state.run = name;
  const b = $("#run-filter");
  b.hidden = name === null;
  b.textContent = name === null ? "" : `run ${name} ×`;
  redrawTasks();
}

// ---- charts (canvas, no library) ------------------------------------------------------------

function series(f) {
  const h = state.history;
  const out = [];
  for (let i = 1; i < h.length; i++) {
    const v = f(h[i - 1], h[i]);
    if (v !== null && v !== undefined && Number.isFinite(v)) out.push([Date.parse(h[i].at), v]);
  }
  return out;
}

function renderCharts() {
  const perMin = (a, b) => ((b.results - a.results) * 60000) / Math.max(1, Date.parse(b.at) - Date.parse(a.at));
  draw($("#chart-reconnections"), series((a, b) => b.reconnections - a.reconnections), "#b3261e");
  draw($("#chart-rtt"), series((_, b) => b.rtt_ms ?? null), "#1f5fa8");
  draw($("#chart-throughput"), series(perMin), "#1f7a3a");
}

function draw(canvas, points, color) {
  const ctx = canvas.getContext("2d");
  const { width: w, height: h } = canvas;
  const pad = 24;
  ctx.clearRect(0, 0, w, h);
  ctx.strokeStyle = "#deded8";
  ctx.strokeRect(pad, 4, w - pad - 4, h - pad - 4);
  ctx.fillStyle = "#6b6b66";
  ctx.font = "10px system-ui";
  const now = coordNow();
  const t0 = now - 3600 * 1000;
  ctx.fillText("-60 min", pad, h - 8);
  ctx.fillText("now", w - 24, h - 8);
  if (!points.length) {
    ctx.fillText("no data yet", w / 2 - 24, h / 2);
    return;
  }
  const top = Math.max(...points.map((p) => p[1]));
  const max = top > 0 ? top : 1;
  ctx.fillText(max >= 10 ? max.toFixed(0) : max.toPrecision(2), 2, 12);
  ctx.fillText("0", 2, h - pad);
  const x = (t) => pad + ((t - t0) / (now - t0)) * (w - pad - 4);
  const y = (v) => h - pad - (v / max) * (h - pad - 8);
  ctx.strokeStyle = color;
  ctx.lineWidth = 1.5;
  ctx.beginPath();
  points.forEach(([t, v], i) => (i ? ctx.lineTo(x(t), y(v)) : ctx.moveTo(x(t), y(v))));
  ctx.stroke();
}

// ---- one task -------------------------------------------------------------------------------

function select(id) {
  state.selected = id;
  $("#detail").hidden = false;
  $("#detail-id").textContent = id;
  $("#control-message").textContent = "";
  loadDetail();
  redrawTasks();
}

// The selected task's detail panel, one load at a time (`coalesced`); a load whose answer
// comes after a newer one's, or after another task was selected, is dropped.
const detail = { seq: 0 };
const loadDetail = coalesced(async () => {
  if (state.selected) await loadDetailNow(state.selected, ++detail.seq);
});

async function loadDetailNow(id, seq) {
  try {
    const enc = encodeURIComponent(id);
    const [task, checkpoints, results, st] = await Promise.all([
      api("GET", `/api/v1/tasks/${enc}`),
      api("GET", `/api/v1/tasks/${enc}/checkpoints`),
      api("GET", `/api/v1/tasks/${enc}/result`),
      api("GET", `/api/v1/tasks/${enc}/state`),
    ]);
    if (state.selected !== id || seq !== detail.seq) return;
    $("#detail-body").replaceChildren(...timeline(task, checkpoints, results, st));
  } catch (e) {
    if (state.selected !== id || seq !== detail.seq) return;
    $("#detail-body").replaceChildren(el("p", { class: "muted" }, `could not load: ${e.message}`));
  }
}

function timeline(task, checkpoints, results, st) {
  const out = [
    el("p", { "data-status": task.status }, badge(task.status), ` ${task.spec.kind}, submitted ${time(task.submitted_at)}`,
      task.finished_at ? `, finished ${time(task.finished_at)}` : "", task.error ? ` — ${task.error}` : ""),
  ];
  // The task's retries: each a link to that task.
  const link = (id) => el("a", { href: "#", onclick: (e) => { e.preventDefault(); select(id); } }, el("code", {}, id));
  if (task.spec.name) out.push(el("p", { class: "run" }, "run ", el("code", {}, task.spec.name)));
  if (task.spec.retry_on?.length) {
    out.push(el("p", { class: "retry-on" }, `runs again when an attempt ${task.spec.retry_on.join(" or ").replaceAll("_", " ")}, up to ${task.spec.max_attempts ?? 3} attempts`));
  }
  if (task.spec.retry_of) out.push(el("p", { class: "retry-of" }, "retry of ", link(task.spec.retry_of)));
  if (task.retried_by) out.push(el("p", { class: "retried-by" }, "retried by ", link(task.retried_by)));
  out.push(el("h2", {}, "Attempts"));
  const events = [];
  for (const a of task.attempts || []) {
    events.push([a.started_at, `attempt ${a.attempt} leased to ${a.worker}`]);
    if (a.ended_at) events.push([a.ended_at, `attempt ${a.attempt} ended: ${a.end || "?"}${a.result_recorded ? " (result recorded)" : ""}`]);
  }
  for (const c of checkpoints || []) events.push([c.created_at, `checkpoint ${c.checkpoint_id.slice(0, 8)} of attempt ${c.attempt}, ${c.size} bytes`]);
  events.sort((a, b) => Date.parse(a[0]) - Date.parse(b[0]));
  out.push(events.length
    ? el("ol", { class: "timeline" }, ...events.map(([t, s]) => el("li", {}, el("span", { class: "muted" }, time(t)), " ", s)))
    : el("p", { class: "muted" }, "not leased yet"));
  if (st) out.push(el("h2", {}, "Latest state"), el("pre", {}, JSON.stringify(st.state, null, 2)));
  out.push(el("h2", {}, "Result"));
  out.push(results?.length
    ? el("pre", {}, JSON.stringify(results, null, 2))
    : el("p", { class: "muted" }, "no result yet"));
  return out;
}

// An ended task submitted again as a new task with its spec, recorded as its retry (the
// coordinator refuses a task not ended or retried already); the new task is shown.
async function retry(id) {
  const task = await api("GET", `/api/v1/tasks/${encodeURIComponent(id)}`);
  // A token that may not see env values sees placeholders: a copy would run with them.
  if (task.env_redacted) throw new Error("its env values are hidden from this token: retry it with an admin token");
  const { task_id, ...spec } = task.spec;
  const made = await api("POST", "/api/v1/tasks", { ...spec, retry_of: id });
  return made.task_ids[0];
}

async function control(action) {
  const id = state.selected;
  if (!id) return;
  const msg = $("#control-message");
  if (action === "retry") {
    try {
      const made = await retry(id);
      select(made);
      msg.textContent = `retry: submitted as ${made}`;
    } catch (e) {
      msg.textContent = `retry: ${e.message}`;
    }
    return;
  }
  try {
    await api("POST", `/api/v1/tasks/${encodeURIComponent(id)}/${action}`);
    msg.textContent = `${action}: sent`;
    loadDetail();
  } catch (e) {
    msg.textContent = `${action}: ${e.message}`;
  }
}

// ---- start ----------------------------------------------------------------------------------

$("#token").value = token();
$("#token").addEventListener("change", (e) => {
  if (e.target.value) sessionStorage.setItem("tether.token", e.target.value);
  else sessionStorage.removeItem("tether.token");
  feed.abort?.abort();
  feed.wake?.();
});
$("#status-filter").addEventListener("change", redrawTasks);
$("#text-filter").addEventListener("input", redrawTasks);
$("#run-filter").addEventListener("click", () => showRun(null));
for (const b of document.querySelectorAll("#detail button")) b.addEventListener("click", () => control(b.dataset.action));
setInterval(schedule, 5000); // relative times and the charts' time axis move
follow();
