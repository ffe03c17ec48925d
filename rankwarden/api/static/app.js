// rankwarden's dashboard: one page, no build step. Every request goes to this
// server with the session cookie (set by POST /login, HttpOnly: this script
// never sees it); state changes carry X-Rankwarden: 1, which a cross-site form
// cannot send. Job data only ever reaches the DOM through textContent.

const HEADER = { "X-Rankwarden": "1" };
const $ = (id) => document.getElementById(id);
const el = (tag, cls, text) => {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
};

class Unauthorized extends Error {}

async function api(method, path, body) {
  const init = { method, headers: { ...HEADER }, credentials: "same-origin" };
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const response = await fetch(path, init);
  if (response.status === 401 && path !== "/login") {
    showLogin();
    throw new Unauthorized();
  }
  const data = response.status === 204 ? null : await response.json();
  if (!response.ok) throw new Error(`${response.status}: ${data.error}${data.detail ? " (" + data.detail + ")" : ""}`);
  return data;
}

// -- formatting -----------------------------------------------------------------

const num = (v, digits = 1) => (v === null || v === undefined ? "–" : Number(v).toFixed(digits));
function duration(s) {
  if (s === null || s === undefined) return "–";
  s = Math.round(s);
  if (s < 60) return `${s} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min ${s % 60} s`;
  return `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} min`;
}
const ago = (t) => duration(Date.now() / 1000 - t) + " ago";
const pct = (v) => (v === null || v === undefined ? "–" : `${(v * 100).toFixed(1)} %`);

// -- views ----------------------------------------------------------------------

let view = null; // the current view's stop function

function show(id) {
  for (const s of ["login", "jobs", "job"]) $(s).hidden = s !== id;
  $("logout").hidden = id === "login";
}

function showLogin() {
  if (view) view();
  view = null;
  show("login");
  $("token").focus();
}

async function route() {
  if (view) view();
  view = null;
  const match = location.hash.match(/^#\/job\/([A-Za-z0-9._-]+)$/);
  try {
    view = match ? await jobView(match[1]) : await jobsView();
  } catch (e) {
    if (!(e instanceof Unauthorized)) throw e;
  }
}

// A timer and streams that pause while the tab is hidden: a browser holds at
// most 6 HTTP/1.1 connections per server, and a background tab needs none.
function lifecycle(start, stop) {
  const onVisibility = () => (document.hidden ? stop() : start());
  document.addEventListener("visibilitychange", onVisibility);
  if (!document.hidden) start();
  return () => {
    document.removeEventListener("visibilitychange", onVisibility);
    stop();
  };
}

// -- the jobs list --------------------------------------------------------------

async function jobsView() {
  show("jobs");
  loadTemplates();
  let timer = null;
  const refresh = async () => {
    const [list, summaries] = await Promise.all([api("GET", "/jobs?limit=200"), api("GET", "/jobs/summaries")]);
    const live = new Map(summaries.map((s) => [s.job_id, s]));
    const tbody = $("jobs-table").tBodies[0];
    const rows = list.jobs.map((j) => {
      const s = live.get(j.job_id);
      const tr = el("tr");
      tr.dataset.job = j.job_id;
      const state = el("span", `state state-${j.state}`, j.state);
      const cells = [j.job_id, state, s ? s.attempt : j.attempt,
        `${s ? s.restarts_used : j.restarts_used} / ${j.request.max_restarts}`,
        s && s.step !== null ? `${s.step}${s.total_steps ? " / " + s.total_steps : ""}` : "–",
        s ? num(s.steps_per_second, 2) : "–", s ? duration(s.eta_seconds) : "–", s ? pct(s.goodput) : "–",
        ago(j.updated_at)];
      for (const c of cells) {
        const td = el("td");
        if (c instanceof Node) td.append(c); else td.textContent = c;
        tr.append(td);
      }
      tr.addEventListener("click", () => (location.hash = `#/job/${j.job_id}`));
      return tr;
    });
    tbody.replaceChildren(...rows);
    $("jobs-total").textContent = `(${list.total})`;
    if (!performance.getEntriesByName("rankwarden:jobs").length) performance.mark("rankwarden:jobs");
  };
  const tick = async () => {
    try { await refresh(); } catch (e) { if (e instanceof Unauthorized) return; }
    timer = setTimeout(tick, 2000);
  };
  return lifecycle(() => { if (timer === null) tick(); }, () => { clearTimeout(timer); timer = null; });
}

let templates = null;
async function loadTemplates() {
  if (templates === null) templates = await api("GET", "/templates");
  $("submit").hidden = templates.length === 0;
  const select = $("template");
  if (select.options.length !== templates.length) {
    select.replaceChildren(...templates.map((t) => el("option", "", t.name)));
    select.onchange = renderParams;
    renderParams();
  }
}

function renderParams() {
  const t = templates.find((x) => x.name === $("template").value);
  if (!t) return;
  $("submit-world").max = t.max_world_size;
  $("params").replaceChildren(...Object.entries(t.params).map(([name, p]) => {
    const label = el("label", "", `${name} `);
    const input = el(p.type === "choice" ? "select" : "input");
    input.name = name;
    input.dataset.type = p.type;
    if (p.type === "choice") input.append(...p.choices.map((c) => el("option", "", c)));
    else if (p.type === "bool") input.type = "checkbox";
    else if (p.type === "int" || p.type === "float") {
      input.type = "number";
      input.step = p.type === "int" ? "1" : "any";
      if (p.min !== null) input.min = p.min;
      if (p.max !== null) input.max = p.max;
    }
    input.required = p.required;
    label.append(input);
    return label;
  }));
}

$("submit-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  $("submit-error").textContent = "";
  const params = {};
  for (const input of $("params").querySelectorAll("input, select")) {
    const type = input.dataset.type;
    if (type === "bool") { if (input.checked) params[input.name] = true; continue; }
    if (input.value === "") continue;
    params[input.name] = type === "int" ? parseInt(input.value, 10) : type === "float" ? parseFloat(input.value) : input.value;
  }
  const body = { template: $("template").value, params, world_size: parseInt($("submit-world").value, 10) };
  if ($("submit-job-id").value) body.job_id = $("submit-job-id").value;
  try {
    const info = await api("POST", "/jobs", body);
    location.hash = `#/job/${info.job_id}`;
  } catch (e) {
    $("submit-error").textContent = e.message;
  }
});

// -- one job --------------------------------------------------------------------

function stream(path, handlers) {
  // An EventSource that stops at the server's `end` (instead of reconnecting)
  // and resumes from the last id it saw when reopened.
  let source = null, last = null, ended = false;
  const open = () => {
    if (source || ended) return;
    source = new EventSource(last === null ? path : `${path}${path.includes("?") ? "&" : "?"}last_event_id=${last}`);
    const on = (type, fn) => source.addEventListener(type, (e) => {
      if (e.lastEventId) last = e.lastEventId;
      fn(JSON.parse(e.data));
    });
    for (const [type, fn] of Object.entries(handlers)) on(type, fn);
    source.addEventListener("end", () => { ended = true; close(); });
  };
  const close = () => { if (source) source.close(); source = null; };
  return { open, close };
}

async function jobView(jobId) {
  show("job");
  $("job-id").textContent = jobId;
  $("ranks").replaceChildren();
  $("timeline").replaceChildren();
  $("log").replaceChildren();
  $("charts").replaceChildren();
  $("action-error").textContent = "";
  $("confirm").hidden = true;
  const info = await api("GET", `/jobs/${jobId}`);
  const series = await api("GET", `/jobs/${jobId}/metrics`);
  const state = { info, summary: null, summaryAt: 0, maxStep: 0, failures: 0, lastLogAttempt: 0, rankFailures: {} };
  const charts = new Charts($("charts"), series);
  window.rankwardenCharts = charts; // for tests and the console: the points the charts hold

  const render = () => renderJob(state);
  const onSummary = (s) => {
    state.summary = s;
    state.summaryAt = performance.now();
    if (s.step !== null) state.maxStep = Math.max(state.maxStep, s.step);
    render();
  };
  onSummary(await api("GET", `/jobs/${jobId}/summary`));
  const ticker = setInterval(() => renderRanks(state), 250); // heartbeat ages grow between summaries

  const metricsPath = () => `/jobs/${jobId}/metrics/stream?summary=1` +
    (series.seq.length ? `&last_event_id=${series.seq[series.seq.length - 1]}` : "");
  const metricsStream = stream(metricsPath(), { point: (p) => charts.add(p), summary: onSummary });
  const events = stream(`/jobs/${jobId}/events/stream`, { message: (e) => timelineEvent(state, e) });
  const logs = stream(`/jobs/${jobId}/logs/stream`, { message: (l) => logLine(state, l) });
  const streams = [metricsStream, events, logs];

  $("stop").onclick = () => confirmThen(`Stop ${jobId}? Its ranks checkpoint (if they can) and exit.`, async () => {
    await api("POST", `/jobs/${jobId}/stop`);
  });
  $("delete").onclick = () => confirmThen(`Delete ${jobId}, its logs and its checkpoints? This cannot be undone.`,
    async () => { await api("DELETE", `/jobs/${jobId}`); location.hash = "#/"; });

  const stopAll = lifecycle(() => streams.forEach((s) => s.open()), () => streams.forEach((s) => s.close()));
  return () => { stopAll(); clearInterval(ticker); charts.destroy(); };
}

function confirmThen(text, action) {
  $("confirm-text").textContent = text;
  $("confirm").hidden = false;
  $("action-error").textContent = "";
  $("confirm-no").onclick = () => ($("confirm").hidden = true);
  $("confirm-yes").onclick = async () => {
    $("confirm").hidden = true;
    try { await action(); } catch (e) { $("action-error").textContent = e.message; }
  };
}

function renderJob(state) {
  const s = state.summary;
  const stateEl = $("job-state");
  stateEl.textContent = s.state;
  stateEl.className = `state state-${s.state}`;
  const facts = [
    ["attempt", s.attempt], ["restarts", `${s.restarts_used} / ${s.max_restarts}`],
    ["step", s.step === null ? "–" : `${s.step}${s.total_steps ? " / " + s.total_steps : ""}`],
    ["steps/s", num(s.steps_per_second, 2)], ["samples/s", num(s.samples_per_second, 1)],
    ["ETA", duration(s.eta_seconds)], ["goodput", pct(s.goodput)],
    ["checkpoint", s.checkpoint_step === null ? "–" : `step ${s.checkpoint_step}`], ["wall", duration(s.wall_seconds)],
  ];
  $("job-facts").replaceChildren(...facts.map(([k, v]) => {
    const span = el("span", "", `${k} `);
    const b = el("b", "", String(v));
    b.dataset.fact = k;
    span.append(b);
    return span;
  }));
  const active = ["pending", "running", "restarting", "stopping"].includes(s.state);
  $("stop").disabled = !active;
  $("delete").disabled = active;
  renderRanks(state);
}

function renderRanks(state) {
  const s = state.summary;
  if (!s) return;
  const timeout = state.info.request.heartbeat_timeout;
  const since = (performance.now() - state.summaryAt) / 1000;
  const active = ["running", "restarting"].includes(s.state);
  const cells = s.ranks.map((r) => {
    const age = r.heartbeat_age === null ? null : r.heartbeat_age + (active && r.state === "running" ? since : 0);
    // Red before the coordinator acts: past half the heartbeat timeout a
    // healthy rank (heartbeats every fraction of a second) is already late.
    // A failure reported by the coordinator's events shows at once (the
    // summary may only catch up after the restart) and stays red until the
    // rank runs in a newer attempt.
    const failure = state.rankFailures[r.rank];
    let cls = "rank";
    if (r.state === "failed" || (failure && failure.attempt >= r.attempt)) cls += " bad";
    else if (age !== null && r.state === "running" && age > timeout / 2) cls += " bad";
    else if (age !== null && r.state === "running" && age > timeout / 5) cls += " warn";
    else if (r.state !== "running" && r.state !== "succeeded") cls += " warn";
    const div = el("div", cls);
    div.dataset.rank = r.rank;
    div.dataset.state = r.state;
    div.dataset.failures = failure ? failure.count : 0;
    div.append(el("div", "n", `rank ${r.rank}`), el("div", "", `${r.state} (attempt ${r.attempt})`),
      el("div", "", `heartbeat ${age === null ? "–" : age.toFixed(1) + " s"}`),
      el("div", "", `step ${r.step ?? "–"}`));
    if (failure) {
      const now = failure.attempt >= r.attempt;
      div.append(el("div", "muted", `${now ? "failed" : "restarted after"}: ${failure.cause} (attempt ${failure.attempt})`));
    }
    return div;
  });
  $("ranks").replaceChildren(...cells);
}

function timelineEvent(state, e) {
  const time = new Date(e.time * 1000).toLocaleTimeString();
  let text = null, cls = "";
  switch (e.type) {
    case "attempt_started":
      text = `attempt ${e.attempt} started${e.adopted ? " (adopted running ranks)" : ""}`; cls = "attempt"; break;
    case "rank_failed": {
      const f = e.failure;
      state.failures += 1;
      state.failedAtStep = state.maxStep;
      const before = state.rankFailures[f.rank];
      state.rankFailures[f.rank] = { attempt: f.attempt, cause: f.cause, count: (before ? before.count : 0) + 1 };
      renderRanks(state);
      const recover = state.summary && state.summary.recovery_seconds[state.failures - 1];
      text = `rank ${f.rank} failed (${f.cause}): ${f.message}; detected after ${num(f.detected_after, 2)} s` +
        (recover !== undefined && recover !== null ? `; recovered in ${num(recover, 2)} s` : "");
      cls = "failure";
      break;
    }
    case "restarting": text = `restart ${e.restart} of ${e.max_restarts} (${e.scope}) in ${num(e.delay, 1)} s`; break;
    case "resume_chosen": {
      const from = e.step === null ? "from scratch" : `from step ${e.step}`;
      const redone = state.failedAtStep !== undefined ? Math.max(0, state.failedAtStep - (e.step ?? 0)) : null;
      text = `resuming ${from}` + (redone !== null ? `; ${redone} steps redone` : "") + (e.message ? ` — ${e.message}` : "");
      break;
    }
    case "checkpoint_committed": text = `checkpoint step ${e.step} committed (${num(e.seconds, 2)} s)`; cls = "commit"; break;
    case "checkpoint_failed": text = `checkpoint step ${e.step} failed: ${e.error}`; cls = "failure"; break;
    case "stopping": text = `stopping: ${e.reason}`; break;
    case "job_succeeded": text = "job succeeded"; cls = "commit"; break;
    case "job_failed": text = `job failed: ${e.message}`; cls = "failure"; break;
    case "job_stopped": text = `job stopped: ${e.reason}`; break;
    default: return; // rank_started, rank_connected...: the rank grid shows them
  }
  const li = el("li", cls, `${time}  ${text}`);
  li.dataset.type = e.type;
  $("timeline").append(li);
  li.scrollIntoView({ block: "nearest" });
}

const MAX_LOG_LINES = 2000;
function logLine(state, l) {
  const log = $("log");
  const atBottom = log.scrollTop + log.clientHeight >= log.scrollHeight - 4;
  if (l.attempt !== state.lastLogAttempt) {
    if (state.lastLogAttempt) log.append(el("span", "restart", `──── attempt ${l.attempt} (restarted) ────`));
    state.lastLogAttempt = l.attempt;
  }
  const line = el("span", l.stream === "stderr" ? "stderr" : "", `[rank${l.rank}] ${l.line}\n`);
  log.append(line);
  while (log.childNodes.length > MAX_LOG_LINES) log.firstChild.remove();
  if (atBottom) log.scrollTop = log.scrollHeight;
}

// -- charts (uPlot, vendored) ------------------------------------------------------

class Charts {
  constructor(root, series) {
    this.root = root;
    this.time = [...series.time];
    this.step = [...series.step];
    this.values = {};
    for (const [k, v] of Object.entries(series.values)) this.values[k] = [...v];
    this.plots = {};
    this.dirty = false;
    this.build();
    this.timer = setInterval(() => this.flush(), 1000);
  }

  groups() {
    const user = Object.keys(this.values).filter((k) => k !== "steps_per_second" && k !== "samples_per_second").sort();
    return [["step", ["step"]], ["throughput", ["steps_per_second", "samples_per_second"]], ...user.map((k) => [k, [k]])];
  }

  column(name) {
    return name === "step" ? this.step : (this.values[name] || this.time.map(() => null));
  }

  build() {
    for (const [title, names] of this.groups()) {
      if (this.plots[title]) continue;
      const box = el("div", "chart");
      box.dataset.chart = title;
      this.root.append(box);
      const width = Math.max(300, box.clientWidth - 10);
      const colors = ["#2563eb", "#16a34a", "#dc2626", "#9333ea"];
      const opts = {
        title, width, height: 200,
        series: [{}, ...names.map((n, i) => ({ label: n, stroke: colors[i % colors.length], width: 1.5, spanGaps: true }))],
        axes: [{}, { size: 60 }],
      };
      this.plots[title] = { plot: new uPlot(opts, [this.time, ...names.map((n) => this.column(n))], box), names };
    }
  }

  add(p) {
    const n = this.time.length;
    this.time.push(p.time);
    this.step.push(p.step);
    for (const [k, v] of Object.entries(p.values)) if (!this.values[k]) this.values[k] = new Array(n).fill(null);
    for (const k of Object.keys(this.values)) this.values[k].push(p.values[k] ?? null);
    this.dirty = true;
  }

  flush() {
    if (!this.dirty) return;
    this.dirty = false;
    this.build();
    for (const { plot, names } of Object.values(this.plots)) plot.setData([this.time, ...names.map((n) => this.column(n))]);
  }

  destroy() {
    clearInterval(this.timer);
    for (const { plot } of Object.values(this.plots)) plot.destroy();
    this.plots = {};
  }
}

// -- start ----------------------------------------------------------------------

$("login-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  $("login-error").textContent = "";
  const response = await fetch("/login", {
    method: "POST", credentials: "same-origin",
    headers: { ...HEADER, "Content-Type": "application/json" },
    body: JSON.stringify({ token: $("token").value }),
  });
  $("token").value = "";
  if (!response.ok) {
    $("login-error").textContent = (await response.json()).error;
    return;
  }
  route();
});

$("logout").addEventListener("click", async () => {
  await fetch("/logout", { method: "POST", headers: HEADER, credentials: "same-origin" });
  showLogin();
});

window.addEventListener("hashchange", route);
if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", route);
else route();
