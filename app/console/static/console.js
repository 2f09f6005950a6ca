// The gpt-oss tuner console: one hand-written file, no framework, no build step, nothing from a CDN.
// It calls the service's own routes with the API key kept in sessionStorage (gone when the tab
// closes). Live data arrives as server-sent events read with fetch(): EventSource cannot send an
// Authorization header, and a key in a URL would end up in access logs and browser history.
"use strict";

const KEY_STORE = "gptoss.apiKey";
const state = { config: null, view: null };

// --- small DOM helpers ----------------------------------------------------------------------------

function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (name === "class") el.className = value;
    else if (name === "text") el.textContent = value;
    else if (name.startsWith("on")) el.addEventListener(name.slice(2), value);
    else if (name === "dataset") Object.assign(el.dataset, value);
    else if (value === true) el.setAttribute(name, "");
    else el.setAttribute(name, value);
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return el;
}

function svg(tag, attrs, ...children) {
  const el = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (name === "text") el.textContent = value;
    else el.setAttribute(name, value);
  }
  for (const child of children.flat()) if (child) el.append(child);
  return el;
}

function card(title, ...body) {
  return h("section", { class: "card" }, title ? h("h2", { text: title }) : null, ...body);
}

// --- formatting -------------------------------------------------------------------------------------

// The API's timestamps are UTC without a zone suffix; without one, Date would read them as local time.
function parseTime(text) {
  if (!text) return null;
  return new Date(/[zZ]|[+-]\d\d:\d\d$/.test(text) ? text : text + "Z");
}

function ago(text) {
  const date = parseTime(text);
  if (!date) return "";
  const s = Math.max(0, (Date.now() - date.getTime()) / 1000);
  if (s < 60) return `${Math.round(s)} s ago`;
  if (s < 3600) return `${Math.round(s / 60)} min ago`;
  if (s < 86400) return `${Math.round(s / 3600)} h ago`;
  return date.toLocaleDateString();
}

function duration(seconds) {
  if (seconds === null || seconds === undefined) return "";
  const s = Math.round(seconds);
  if (s < 60) return `${s} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min ${s % 60} s`;
  return `${Math.floor(s / 3600)} h ${Math.round((s % 3600) / 60)} min`;
}

function num(value, digits = 4) {
  if (value === null || value === undefined || Number.isNaN(value)) return "–";
  if (value !== 0 && (Math.abs(value) < 1e-3 || Math.abs(value) >= 1e5)) return value.toExponential(2);
  return Number(value.toPrecision(digits)).toString();
}

function bytes(n) {
  if (n < 1024) return `${n} B`;
  if (n < 1024 * 1024) return `${(n / 1024).toFixed(1)} KiB`;
  return `${(n / 1024 / 1024).toFixed(1)} MiB`;
}

function statusBadge(status, cancelRequested) {
  const label = cancelRequested && (status === "running" || status === "queued") ? "cancelling" : status;
  return h("span", { class: `badge status-${label}`, dataset: { status } }, label);
}

function progressBar(step, total) {
  const fraction = total ? Math.min(1, step / total) : 0;
  const bar = h("span", { class: "bar-fill" });
  bar.style.width = `${(fraction * 100).toFixed(1)}%`;
  return h(
    "span",
    { class: "progress" },
    h("span", { class: "bar" }, bar),
    h("span", { class: "bar-text" }, total ? `${step} / ${total}` : step ? `step ${step}` : "–"),
  );
}

// --- the API ----------------------------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, body) {
    const error = (body && body.error) || {};
    super(error.message || `HTTP ${status}`);
    this.status = status;
    this.code = error.code || `http_${status}`;
    this.field = error.field || null;
    this.row = error.row || null;
  }
}

function apiKey() {
  return sessionStorage.getItem(KEY_STORE) || "";
}

function authHeaders(extra) {
  const headers = Object.assign({}, extra);
  const key = apiKey();
  if (key) headers.Authorization = `Bearer ${key}`;
  return headers;
}

async function api(method, path, { json, form, signal } = {}) {
  const init = { method, headers: authHeaders(), signal };
  if (json !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(json);
  } else if (form) init.body = form;
  const response = await fetch(path, init);
  const text = await response.text();
  let body = null;
  try {
    body = text ? JSON.parse(text) : null;
  } catch (_) {
    body = null;
  }
  if (!response.ok) {
    const error = new ApiError(response.status, body);
    if (response.status === 401) needKey(error.message);
    throw error;
  }
  return body;
}

// Reads a text/event-stream response with fetch and calls onEvent(name, data) per event.
async function readSse(response, onEvent) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true }).replace(/\r\n/g, "\n");
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      let name = "message";
      const data = [];
      for (const line of block.split("\n")) {
        if (line.startsWith(":")) continue; // a keep-alive comment
        if (line.startsWith("event:")) name = line.slice(6).trim();
        else if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
      }
      if (data.length) onEvent(name, JSON.parse(data.join("\n")));
    }
  }
}

// Follows an SSE route until `signal` aborts, reconnecting after a dropped connection; stops on an
// `end` event or an HTTP error (a 401 asks for a key; the view restarts when one is given).
async function follow(path, signal, onEvent, onStatus) {
  let ended = false;
  while (!signal.aborted && !ended) {
    try {
      const response = await fetch(path(), { headers: authHeaders(), signal });
      if (!response.ok) {
        const body = await response.json().catch(() => null);
        const error = new ApiError(response.status, body);
        if (response.status === 401) needKey(error.message);
        onStatus("error", error.message);
        return;
      }
      onStatus("live");
      await readSse(response, (name, data) => {
        if (name === "end") ended = true;
        onEvent(name, data);
      });
    } catch (err) {
      if (signal.aborted) return;
    }
    if (!ended && !signal.aborted) {
      onStatus("reconnecting");
      await new Promise((resolve) => setTimeout(resolve, 2000));
    }
  }
  if (ended) onStatus("done");
}

function liveDot() {
  const dot = h("span", { class: "live", title: "connecting" }, h("i"), h("span", { text: "connecting" }));
  dot.set = (status, detail) => {
    dot.dataset.state = status;
    const text = { live: "live", reconnecting: "reconnecting…", done: "finished", error: "offline" }[status];
    dot.lastChild.textContent = text || status;
    dot.title = detail || text || status;
  };
  return dot;
}

// --- API key --------------------------------------------------------------------------------------

function renderKeybox() {
  const box = document.getElementById("keybox");
  box.replaceChildren();
  if (!state.config) return;
  if (state.config.auth !== "keys") {
    box.append(h("span", { class: "chip warn", title: "GPTOSS_AUTH=none: anyone who reaches this server can use it" }, "API keys off"));
    return;
  }
  if (apiKey()) {
    box.append(
      h("span", { class: "chip ok", title: "Kept for this tab only (sessionStorage)" }, `key ${apiKey().slice(0, 8)}…`),
      h("button", { class: "link", type: "button", onclick: () => setKey("") }, "Forget"),
    );
    return;
  }
  const input = h("input", {
    id: "api-key",
    type: "password",
    placeholder: "API key (gpt-…)",
    autocomplete: "off",
    "aria-label": "API key",
  });
  const form = h(
    "form",
    { class: "keyform", onsubmit: (e) => (e.preventDefault(), setKey(input.value.trim())) },
    input,
    h("button", { type: "submit", class: "small" }, "Use key"),
  );
  box.append(form);
}

function setKey(key) {
  if (key) sessionStorage.setItem(KEY_STORE, key);
  else sessionStorage.removeItem(KEY_STORE);
  showBanner(null);
  renderKeybox();
  route(); // every view restarts with the new key
}

function needKey(message) {
  if (!state.config || state.config.auth !== "keys") return;
  if (apiKey()) sessionStorage.removeItem(KEY_STORE);
  renderKeybox();
  showBanner(`${message}. Paste an API key in the field at the top right (scripts/create_api_key.py makes one).`);
  const input = document.getElementById("api-key");
  if (input) input.focus();
}

function showBanner(message) {
  const banner = document.getElementById("banner");
  banner.hidden = !message;
  banner.textContent = message || "";
}

// --- routing ----------------------------------------------------------------------------------------

function parseHash() {
  const [path, query] = (location.hash.replace(/^#/, "") || "/jobs").split("?");
  return { parts: path.split("/").filter(Boolean), params: new URLSearchParams(query || "") };
}

function route() {
  if (state.view) state.view.abort();
  const view = new AbortController();
  state.view = view;
  const { parts, params } = parseHash();
  const main = document.getElementById("main");
  main.replaceChildren();
  const tab = parts[0] || "jobs";
  for (const link of document.querySelectorAll(".tabs a[data-tab]")) {
    link.classList.toggle("active", link.dataset.tab === tab);
  }
  if (tab === "jobs" && parts[1]) jobPage(main, decodeURIComponent(parts[1]), view.signal);
  else if (tab === "data") dataPage(main, view.signal);
  else if (tab === "playground") playgroundPage(main, params, view.signal);
  else jobsPage(main, view.signal);
}

// --- jobs list ------------------------------------------------------------------------------------

const OLDER_PAGE = 50;

function jobsPage(main, signal) {
  document.title = "Jobs · gpt-oss tuner";
  const dot = liveDot();
  const counts = h("div", { class: "counts" });
  const body = h("tbody");
  const table = h(
    "table",
    { class: "table jobs-table" },
    h(
      "thead",
      {},
      h("tr", {}, ["Job", "Status", "Progress", "Train loss", "Eval loss", "Speed", "Time", "Created"].map((t) => h("th", { text: t }))),
    ),
    body,
  );
  const empty = h(
    "p",
    { class: "empty", hidden: true },
    "No jobs yet. Upload a dataset and start one on the ",
    h("a", { href: "#/data" }, "Data"),
    " page.",
  );
  // The newest jobs are live (the feed); older ones are loaded a page at a time on demand, below them,
  // and stay as loaded. A job the feed stops listing (pushed out by a newer one) moves to the top of
  // the older rows, so none falls between the two.
  const older = h("tbody", { class: "older" });
  table.append(older);
  const showOlder = h("button", { type: "button", id: "older-jobs", hidden: true }, "Show older jobs");
  const olderError = h("span", { class: "error-text", hidden: true });
  let live = [];
  let olderCursor = null;
  let olderLoaded = false;
  let olderHasMore = false;
  showOlder.onclick = async () => {
    showOlder.disabled = true;
    try {
      const after = olderLoaded ? olderCursor : live[live.length - 1].id;
      const page = await api("GET", `/jobs?limit=${OLDER_PAGE}&after=${encodeURIComponent(after)}`, { signal });
      older.append(...page.data.map(jobRow));
      olderLoaded = true;
      olderCursor = page.next_cursor || olderCursor;
      olderHasMore = page.has_more;
      showOlder.hidden = !olderHasMore;
      olderError.hidden = true;
    } catch (err) {
      if (err.name === "AbortError") return;
      olderError.hidden = false;
      olderError.textContent = err.message;
    } finally {
      showOlder.disabled = false;
    }
  };
  main.append(
    h(
      "div",
      { class: "page-head" },
      h("h1", { text: "Jobs" }),
      dot,
      counts,
      h("span", { class: "spacer" }),
      h("a", { class: "button", href: "#/data" }, "New job"),
    ),
    h("section", { class: "card flush" }, h("div", { class: "table-wrap" }, table), empty),
    h("div", { class: "older-jobs" }, showOlder, olderError),
  );
  follow(
    () => "/console/events",
    signal,
    (name, data) => {
      if (name !== "jobs") return;
      if (olderLoaded) {
        const now = new Set(data.jobs.map((job) => job.id));
        const pushedOut = live.filter((job) => !now.has(job.id));
        older.prepend(...pushedOut.map(jobRow));
      }
      live = data.jobs;
      showOlder.hidden = olderLoaded ? !olderHasMore : !data.has_more;
      body.replaceChildren(...data.jobs.map(jobRow));
      empty.hidden = data.jobs.length > 0;
      table.hidden = data.jobs.length === 0;
      const tally = {};
      for (const job of data.jobs) tally[job.status] = (tally[job.status] || 0) + 1;
      counts.replaceChildren(
        ...["running", "queued", "succeeded", "failed", "cancelled"]
          .filter((s) => tally[s])
          .map((s) => h("span", { class: `count status-${s}` }, `${tally[s]} ${s}`)),
      );
    },
    (status, detail) => dot.set(status, detail),
  );
}

function jobRow(job) {
  const href = `#/jobs/${encodeURIComponent(job.id)}`;
  let time = "";
  if (job.status === "running") time = job.eta_s !== null ? `ETA ${duration(job.eta_s)}` : "starting";
  else if (job.status === "queued") time = job.queue_position ? `#${job.queue_position} in queue` : "queued";
  else if (job.finished_at) time = `finished ${ago(job.finished_at)}`;
  return h(
    "tr",
    { dataset: { job: job.id, status: job.status }, class: "clickable", onclick: () => (location.hash = href) },
    h(
      "td",
      {},
      h("a", { href, class: "mono" }, job.id),
      job.name ? h("div", { class: "sub" }, job.name) : h("div", { class: "sub" }, job.dataset),
    ),
    h("td", {}, statusBadge(job.status, job.cancel_requested), job.error ? h("div", { class: "sub error-text", title: job.error }, job.error.split(":")[0]) : null),
    h("td", {}, progressBar(job.step, job.total_steps)),
    h("td", { class: "num" }, num(job.train_loss)),
    h("td", { class: "num" }, num(job.eval_loss)),
    h("td", { class: "num" }, job.tokens_per_s ? `${Math.round(job.tokens_per_s)} tok/s` : "–"),
    h("td", {}, time),
    h("td", { title: parseTime(job.created_at).toLocaleString() }, ago(job.created_at)),
  );
}

// --- one job --------------------------------------------------------------------------------------

function jobPage(main, jobId, signal) {
  document.title = `${jobId} · gpt-oss tuner`;
  const dot = liveDot();
  const title = h("h1", { class: "mono" }, jobId);
  const badge = h("span");
  const cancel = h("button", { class: "danger", type: "button", hidden: true }, "Cancel job");
  const progress = h("div", { class: "job-progress" });
  const stats = h("dl", { class: "stats" });
  const chart = lossChart();
  const adapterBox = h("div", {}, h("p", { class: "muted", text: "Appears when the job succeeds." }));
  const checkpoints = h("div", {}, h("p", { class: "muted", text: "None yet." }));
  const errorBox = h("div", { class: "alert error", hidden: true });
  const showMetrics = h("input", { type: "checkbox", id: "show-metrics" });
  const log = h("div", { class: "log", id: "events" });
  const hyper = h("pre", { class: "code" });
  const events = [];
  let job = null;
  let checkpointsStale = true;

  main.append(
    h("div", { class: "page-head" }, h("a", { href: "#/jobs", class: "back" }, "← Jobs"), title, badge, dot, h("span", { class: "spacer" }), cancel),
    progress,
    errorBox,
    h(
      "div",
      { class: "grid job-grid" },
      h(
        "div",
        { class: "col" },
        card("Loss and learning rate", chart.el),
        card(
          null,
          h("div", { class: "card-head" }, h("h2", { text: "Events" }), h("label", { class: "check" }, showMetrics, "per-step metrics")),
          log,
        ),
      ),
      h(
        "div",
        { class: "col" },
        card("Details", stats),
        card("Adapter", adapterBox),
        card("Checkpoints", checkpoints),
        card(null, h("details", {}, h("summary", { text: "Hyperparameters" }), hyper)),
      ),
    ),
  );

  let armed = null;
  cancel.addEventListener("click", async () => {
    if (!armed) {
      cancel.textContent = "Click again to cancel";
      armed = setTimeout(() => ((armed = null), (cancel.textContent = "Cancel job")), 4000);
      return;
    }
    clearTimeout(armed);
    armed = null;
    cancel.disabled = true;
    try {
      showJob(await api("POST", `/jobs/${jobId}/cancel`));
    } catch (err) {
      errorBox.hidden = false;
      errorBox.textContent = err.message;
    }
    cancel.disabled = false;
    cancel.textContent = "Cancel job";
  });
  showMetrics.addEventListener("change", () => renderLog());
  window.addEventListener("resize", () => chart.draw(job), { signal });

  function showJob(next) {
    job = next;
    title.textContent = job.name ? `${job.id} · ${job.name}` : job.id;
    badge.replaceChildren(statusBadge(job.status, job.cancel_requested));
    cancel.hidden = !(job.status === "queued" || job.status === "running") || job.cancel_requested;
    progress.replaceChildren(progressBar(job.progress.step, job.progress.total_steps));
    errorBox.hidden = !job.error;
    if (job.error) errorBox.textContent = `${job.error.code}: ${job.error.message}`;
    const rows = [
      ["Dataset", job.dataset],
      ["Base model", job.base_model],
      ["Step", job.progress.total_steps ? `${job.progress.step} of ${job.progress.total_steps}` : job.progress.step],
      ["Epoch", job.progress.epoch !== null ? num(job.progress.epoch, 3) : "–"],
      ["Train loss", num(job.train_loss)],
      ["Eval loss", num(job.eval_loss)],
      ["Speed", job.tokens_per_s ? `${Math.round(job.tokens_per_s)} tokens/s` : "–"],
      ["ETA", job.status === "running" && job.eta_s !== null ? duration(job.eta_s) : "–"],
      ["Queue", job.queue_position ? `#${job.queue_position}` : "–"],
      ["Backend", job.backend || "–"],
      ["Attempts", `${job.attempts} of ${job.max_attempts}`],
      ["Created", parseTime(job.created_at).toLocaleString()],
      ["Finished", job.finished_at ? parseTime(job.finished_at).toLocaleString() : "–"],
    ];
    stats.replaceChildren(...rows.flatMap(([k, v]) => [h("dt", { text: k }), h("dd", { text: String(v) })]));
    hyper.textContent = JSON.stringify(job.hyperparameters, null, 2);
    if (job.adapter) {
      const a = job.adapter;
      adapterBox.replaceChildren(
        h("div", { class: "adapter-name mono", id: "adapter-name" }, a.name),
        h("div", { class: "sub mono" }, a.id),
        h("div", { class: "actions" }, h("a", { class: "button", href: `#/playground?adapter=${encodeURIComponent(a.id)}` }, "Chat with it")),
      );
    } else if (job.status === "failed" || job.status === "cancelled") {
      adapterBox.replaceChildren(h("p", { class: "muted", text: `None: the job ${job.status}.` }));
    }
    if (checkpointsStale || job.status !== "running") loadCheckpoints();
    chart.draw(job);
  }

  async function loadCheckpoints() {
    checkpointsStale = false;
    try {
      const page = await api("GET", `/jobs/${jobId}/checkpoints`, { signal });
      if (!page.data.length) return;
      checkpoints.replaceChildren(
        h(
          "table",
          { class: "table compact" },
          h("thead", {}, h("tr", {}, h("th", { text: "Step" }), h("th", { text: "Loss" }), h("th", { text: "Saved" }))),
          h(
            "tbody",
            {},
            page.data.map((c) =>
              h(
                "tr",
                {},
                h("td", { class: "num" }, c.step),
                h("td", { class: "num" }, num(c.metrics && (c.metrics.loss ?? c.metrics.train_loss))),
                h("td", { title: c.path }, ago(c.created_at)),
              ),
            ),
          ),
        ),
      );
    } catch (_) {
      checkpointsStale = true;
    }
  }

  function renderLog() {
    const shown = events.filter((e) => showMetrics.checked || e.kind !== "metrics").slice(-300);
    const atBottom = log.scrollHeight - log.scrollTop - log.clientHeight < 40;
    log.replaceChildren(
      ...shown.map((e) =>
        h(
          "div",
          { class: `event kind-${e.kind}` },
          h("span", { class: "time" }, parseTime(e.created_at).toLocaleTimeString([], { hour12: false })),
          h("span", { class: "kind" }, e.kind),
          h("span", { class: "text" }, eventText(e)),
        ),
      ),
    );
    if (!shown.length) log.append(h("p", { class: "muted", text: "No events yet." }));
    if (atBottom) log.scrollTop = log.scrollHeight;
  }

  follow(
    () => `/console/jobs/${encodeURIComponent(jobId)}/events?after=${events.length ? events[events.length - 1].id : 0}`,
    signal,
    (name, data) => {
      if (name === "job") showJob(data);
      else if (name === "events") {
        events.push(...data);
        chart.add(data);
        if (data.some((e) => e.kind === "checkpoint")) checkpointsStale = true;
        renderLog();
        chart.draw(job);
      }
    },
    (status, detail) => dot.set(status, detail),
  );
}

function eventText(e) {
  const d = e.data || {};
  if (e.kind === "metrics" || e.kind === "eval") {
    const parts = [`step ${e.step}`];
    if (d.loss !== undefined) parts.push(`loss ${num(d.loss)}`);
    if (d.eval_loss !== undefined) parts.push(`eval loss ${num(d.eval_loss)}`);
    if (d.learning_rate !== undefined) parts.push(`lr ${num(d.learning_rate)}`);
    if (d.grad_norm !== undefined) parts.push(`grad norm ${num(d.grad_norm, 3)}`);
    return parts.join(" · ");
  }
  return e.message || (e.step !== null ? `step ${e.step}` : "");
}

// --- loss chart (inline SVG) ------------------------------------------------------------------------

function lossChart() {
  const el = h("div", { class: "chart", id: "loss-chart" });
  const train = new Map();
  const evals = new Map();
  const lr = new Map();
  const add = (events) => {
    for (const e of events) {
      const d = e.data || {};
      if (e.step === null || e.step === undefined) continue;
      const loss = d.loss ?? d.train_loss;
      if (e.kind === "metrics" && typeof loss === "number") train.set(e.step, loss);
      if (typeof d.eval_loss === "number") evals.set(e.step, d.eval_loss);
      if (typeof d.learning_rate === "number") lr.set(e.step, d.learning_rate);
    }
  };
  const draw = (job) => {
    const width = Math.max(280, el.clientWidth || 640);
    const height = Math.round(Math.min(320, Math.max(200, width * 0.45)));
    el.replaceChildren(drawChart(width, height, job, train, evals, lr));
  };
  return { el, add, draw };
}

function niceTicks(lo, hi, count) {
  if (!(hi > lo)) return [lo];
  const raw = (hi - lo) / count;
  const mag = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 2.5, 5, 10].map((m) => m * mag).find((s) => s >= raw) || raw;
  const ticks = [];
  for (let t = Math.ceil(lo / step) * step; t <= hi + step * 1e-9; t += step) ticks.push(Number(t.toPrecision(12)));
  return ticks;
}

function sorted(map) {
  return [...map.entries()].sort((a, b) => a[0] - b[0]);
}

function drawChart(width, height, job, train, evals, lr) {
  const m = { top: 28, right: 62, bottom: 34, left: 54 };
  const root = svg("svg", { width, height, viewBox: `0 0 ${width} ${height}`, role: "img", "aria-label": "loss curve" });
  const trainPts = sorted(train);
  const evalPts = sorted(evals);
  const lrPts = sorted(lr);
  if (!trainPts.length && !evalPts.length) {
    root.append(
      svg("text", { x: width / 2, y: height / 2, "text-anchor": "middle", class: "chart-empty", text: job && job.status === "queued" ? "Waiting in the queue…" : "No training steps logged yet" }),
    );
    return root;
  }
  const steps = [...trainPts, ...evalPts].map((p) => p[0]);
  const maxStep = Math.max(1, ...steps, (job && job.progress.total_steps) || 0);
  const losses = [...trainPts, ...evalPts].map((p) => p[1]);
  let lo = Math.min(...losses);
  let hi = Math.max(...losses);
  const pad = (hi - lo) * 0.08 || Math.abs(hi) * 0.1 || 1;
  lo = Math.max(0, lo - pad);
  hi += pad;
  const lrMax = Math.max(0, ...lrPts.map((p) => p[1])) || 1;
  const w = width - m.left - m.right;
  const ht = height - m.top - m.bottom;
  const x = (s) => m.left + (s / maxStep) * w;
  const y = (v) => m.top + ht - ((v - lo) / (hi - lo)) * ht;
  const yr = (v) => m.top + ht - (v / lrMax) * ht;

  const grid = svg("g", { class: "grid" });
  const lossTicks = niceTicks(lo, hi, 5);
  // As many decimals as the tick spacing needs, so neighbouring ticks never print alike.
  const decimals = lossTicks.length > 1 ? Math.max(0, Math.ceil(-Math.log10(lossTicks[1] - lossTicks[0]) + 0.01)) : 2;
  for (const t of lossTicks) {
    grid.append(svg("line", { x1: m.left, x2: m.left + w, y1: y(t), y2: y(t) }));
    grid.append(svg("text", { x: m.left - 8, y: y(t) + 4, "text-anchor": "end", text: t.toFixed(Math.min(6, decimals)) }));
  }
  for (const t of niceTicks(0, maxStep, Math.min(8, maxStep)).filter((t) => Number.isInteger(t))) {
    grid.append(svg("text", { x: x(t), y: m.top + ht + 18, "text-anchor": "middle", text: String(t) }));
  }
  if (lrPts.length) {
    for (const t of niceTicks(0, lrMax, 4)) {
      grid.append(svg("text", { x: m.left + w + 8, y: yr(t) + 4, class: "lr-axis", text: t === 0 ? "0" : t < 0.01 ? t.toExponential(1) : num(t, 2) }));
    }
  }
  root.append(grid);
  root.append(svg("line", { class: "axis", x1: m.left, x2: m.left + w, y1: m.top + ht, y2: m.top + ht }));
  root.append(svg("text", { class: "axis-label", x: m.left + w / 2, y: height - 4, "text-anchor": "middle", text: "step" }));
  const path = (pts, fy) => pts.map((p, i) => `${i ? "L" : "M"}${x(p[0]).toFixed(1)},${fy(p[1]).toFixed(1)}`).join("");
  if (lrPts.length) root.append(svg("path", { class: "line lr", d: path(lrPts, yr) }));
  if (trainPts.length) root.append(svg("path", { class: "line train", d: path(trainPts, y) }));
  if (evalPts.length) {
    root.append(svg("path", { class: "line eval", d: path(evalPts, y) }));
    for (const [s, v] of evalPts) root.append(svg("circle", { class: "dot eval", cx: x(s), cy: y(v), r: 3.5 }));
  }
  if (trainPts.length === 1) {
    const [s, v] = trainPts[0];
    root.append(svg("circle", { class: "dot train", cx: x(s), cy: y(v), r: 3 }));
  }
  const legend = svg("g", { class: "legend" });
  let lx = m.left;
  for (const [cls, label, shown] of [["train", "train loss", trainPts.length], ["eval", "eval loss", evalPts.length], ["lr", "learning rate (right axis)", lrPts.length]]) {
    if (!shown) continue;
    legend.append(svg("line", { class: `line ${cls}`, x1: lx, x2: lx + 18, y1: 12, y2: 12 }));
    const text = svg("text", { x: lx + 24, y: 16, text: label });
    legend.append(text);
    lx += 34 + label.length * 6.6;
  }
  root.append(legend);
  root.append(hoverLayer(m, w, ht, x, y, trainPts, evalPts, lrPts, maxStep));
  return root;
}

// A vertical rule and the values at the step under the pointer.
function hoverLayer(m, w, ht, x, y, trainPts, evalPts, lrPts, maxStep) {
  const layer = svg("g", { class: "hover" });
  const rule = svg("line", { y1: m.top, y2: m.top + ht, class: "rule", visibility: "hidden" });
  const label = svg("text", { y: m.top - 8, class: "hover-text", visibility: "hidden" });
  const catcher = svg("rect", { x: m.left, y: m.top, width: w, height: ht, fill: "transparent" });
  const maps = [new Map(trainPts), new Map(evalPts), new Map(lrPts)];
  const all = [...new Set([...trainPts, ...evalPts].map((p) => p[0]))].sort((a, b) => a - b);
  catcher.addEventListener("mousemove", (event) => {
    const box = catcher.getBoundingClientRect();
    const target = ((event.clientX - box.left) / box.width) * maxStep;
    const step = all.reduce((best, s) => (Math.abs(s - target) < Math.abs(best - target) ? s : best), all[0]);
    const parts = [`step ${step}`];
    if (maps[0].has(step)) parts.push(`loss ${num(maps[0].get(step))}`);
    if (maps[1].has(step)) parts.push(`eval ${num(maps[1].get(step))}`);
    if (maps[2].has(step)) parts.push(`lr ${num(maps[2].get(step), 3)}`);
    rule.setAttribute("x1", x(step));
    rule.setAttribute("x2", x(step));
    label.textContent = parts.join(" · ");
    const right = x(step) > m.left + w / 2;
    label.setAttribute("x", right ? x(step) - 6 : x(step) + 6);
    label.setAttribute("text-anchor", right ? "end" : "start");
    rule.setAttribute("visibility", "visible");
    label.setAttribute("visibility", "visible");
  });
  catcher.addEventListener("mouseleave", () => {
    rule.setAttribute("visibility", "hidden");
    label.setAttribute("visibility", "hidden");
  });
  layer.append(rule, label, catcher);
  return layer;
}

// --- data: upload and start a job -----------------------------------------------------------------

function dataPage(main, signal) {
  document.title = "Data · gpt-oss tuner";
  const fileInput = h("input", { type: "file", id: "upload-file", accept: ".jsonl,.json,application/jsonl,text/plain" });
  const uploadButton = h("button", { type: "submit", id: "upload-button" }, "Upload");
  const uploadResult = h("div", { id: "upload-result", "aria-live": "polite" });
  const filesBody = h("tbody");
  const filesEmpty = h("p", { class: "muted", text: "No uploads yet." });
  const filesTable = h(
    "table",
    { class: "table compact", hidden: true },
    h("thead", {}, h("tr", {}, ["File", "Rows", "Size", "Uploaded", ""].map((t) => h("th", { text: t })))),
    filesBody,
  );
  const datasetSelect = h("select", { id: "job-dataset", name: "dataset" });
  const jobForm = h("form", { id: "job-form", class: "form", novalidate: true });

  main.append(
    h("div", { class: "page-head" }, h("h1", { text: "Data" })),
    h(
      "div",
      { class: "grid data-grid" },
      card(
          "Upload a dataset",
          h(
            "p",
            { class: "muted" },
            "JSONL, one chat per line: ",
            h("code", {}, '{"messages": [{"role": "user", …}, {"role": "assistant", "content": …, "thinking": …}]}'),
            ". Every row is checked now; a bad row is named with its number and field.",
          ),
          h("form", { class: "upload", onsubmit: (e) => (e.preventDefault(), upload()) }, fileInput, uploadButton),
          uploadResult,
      ),
      card("Uploaded files", h("div", { class: "table-wrap" }, filesTable), filesEmpty),
      h("div", { class: "wide" }, card("Start a job", jobForm)),
    ),
  );

  async function upload() {
    const file = fileInput.files[0];
    if (!file) {
      uploadResult.replaceChildren(h("div", { class: "alert error", text: "Choose a .jsonl file first." }));
      return;
    }
    const form = new FormData();
    form.append("file", file);
    form.append("purpose", "fine-tune");
    uploadButton.disabled = true;
    uploadResult.replaceChildren(h("p", { class: "muted", text: `Uploading and checking ${file.name}…` }));
    try {
      const record = await api("POST", "/files", { form, signal });
      uploadResult.replaceChildren(
        h(
          "div",
          { class: "alert ok", id: "upload-ok" },
          h("strong", {}, `${record.filename}: ${record.rows} rows, all valid. `),
          "Stored as ",
          h("code", {}, record.id),
          "; it is selected in the job form.",
        ),
      );
      await loadFiles(record.id);
    } catch (err) {
      uploadResult.replaceChildren(datasetError(file.name, err));
    }
    uploadButton.disabled = false;
  }

  async function loadFiles(select) {
    let page;
    try {
      page = await api("GET", "/files?limit=100", { signal });
    } catch (err) {
      filesEmpty.textContent = err.message;
      return;
    }
    filesTable.hidden = !page.data.length;
    filesEmpty.hidden = page.data.length > 0;
    filesBody.replaceChildren(
      ...page.data.map((f) =>
        h(
          "tr",
          {},
          h("td", {}, f.filename, h("div", { class: "sub mono" }, f.id)),
          h("td", { class: "num" }, f.rows),
          h("td", { class: "num" }, bytes(f.bytes)),
          h("td", {}, ago(f.created_at)),
          h("td", {}, h("button", { type: "button", class: "small secondary", onclick: () => ((datasetSelect.value = f.id), datasetSelect.focus()) }, "Use")),
        ),
      ),
    );
    const current = select || datasetSelect.value;
    datasetSelect.replaceChildren(
      h("optgroup", { label: "Uploaded files" }, page.data.map((f) => h("option", { value: f.id }, `${f.filename} (${f.id}, ${f.rows} rows)`))),
      h("optgroup", { label: "Bundled samples" }, state.config.samples.map((s) => h("option", { value: s }, s))),
    );
    if (current) datasetSelect.value = current;
  }

  loadFiles();
  buildJobForm(jobForm, datasetSelect, signal);
}

// A 422 from POST /files names the first bad row and the field in it: show them as such.
function datasetError(filename, err) {
  const box = h("div", { class: "alert error", id: "upload-error" });
  const match = /row (\d+), field '([^']*)': (.*)$/s.exec(err.message);
  if (err.row || match) {
    box.append(
      h("strong", {}, `${filename} was refused: row ${err.row || match[1]}`),
      match ? h("span", {}, ", field ", h("code", { class: "fieldname" }, match[2])) : null,
      h("div", { class: "reason" }, match ? match[3] : err.message),
      h("div", { class: "sub" }, "Nothing was stored. Fix the row (line numbers count from 1) and upload again."),
    );
  } else box.append(h("strong", {}, `${filename} was refused. `), err.message);
  return box;
}

// --- the job form, built from the JobCreate schema in /openapi.json ---------------------------------

// The fields most runs touch, shown first; the rest sit under "All hyperparameters".
const COMMON = [
  "max_steps",
  "num_train_epochs",
  "learning_rate",
  "lora_r",
  "lora_alpha",
  "per_device_train_batch_size",
  "gradient_accumulation_steps",
  "max_seq_length",
  "eval_fraction",
  "save_steps",
];

function resolveRef(schema, doc) {
  let s = schema || {};
  for (let i = 0; i < 8; i++) {
    if (s.$ref) {
      const target = s.$ref.replace(/^#\//, "").split("/").reduce((o, k) => (o ? o[k] : undefined), doc);
      s = Object.assign({}, target, withoutKeys(s, ["$ref"]));
    } else if (s.allOf && s.allOf.length === 1) s = Object.assign({}, resolveRef(s.allOf[0], doc), withoutKeys(s, ["allOf"]));
    else break;
  }
  return s;
}

function withoutKeys(object, keys) {
  return Object.fromEntries(Object.entries(object).filter(([k]) => !keys.includes(k)));
}

// A property's own shape, with `nullable` when it is anyOf [X, null] and X's keys merged in.
function fieldShape(prop, doc) {
  let s = resolveRef(prop, doc);
  if (s.anyOf) {
    const options = s.anyOf.map((o) => resolveRef(o, doc));
    const real = options.filter((o) => o.type !== "null");
    if (real.length === 1) s = Object.assign({}, real[0], withoutKeys(s, ["anyOf"]), { nullable: real.length < options.length });
  }
  return s;
}

async function hyperparameterSchema(signal) {
  const doc = await fetch("/openapi.json", { signal }).then((r) => r.json());
  const create = resolveRef(doc.components.schemas.JobCreate, doc);
  const hp = fieldShape(create.properties.hyperparameters, doc);
  return { doc, hp };
}

async function buildJobForm(form, datasetSelect, signal) {
  form.replaceChildren(h("p", { class: "muted", text: "Reading the hyperparameter schema…" }));
  let schema;
  try {
    schema = await hyperparameterSchema(signal);
  } catch (err) {
    form.replaceChildren(h("div", { class: "alert error", text: `Could not read /openapi.json: ${err.message}` }));
    return;
  }
  const fields = new Map();
  const properties = schema.hp.properties || {};
  const names = Object.keys(properties);
  const common = COMMON.filter((n) => names.includes(n));
  const rest = names.filter((n) => !common.includes(n));
  const top = [
    row("dataset", "Dataset", datasetSelect, "An uploaded file, or a bundled sample."),
    row("suffix", "Suffix", h("input", { id: "job-suffix", name: "suffix", placeholder: "e.g. pirate", maxlength: 40 }), "Part of the adapter's name."),
    row("seed", "Seed", h("input", { id: "job-seed", name: "seed", type: "number", min: 0, step: 1, placeholder: "default" }), null),
  ];
  const errorBox = h("div", { class: "alert error", id: "job-error", hidden: true });
  const submit = h("button", { type: "submit", id: "job-submit" }, "Start job");
  let hyperBlock;
  if (names.length) {
    const make = (n) => {
      const f = hyperField(n, fieldShape(properties[n], schema.doc), (schema.hp.required || []).includes(n));
      fields.set(n, f);
      return f.row;
    };
    hyperBlock = h(
      "div",
      {},
      h("h3", { text: "Hyperparameters" }),
      h("p", { class: "muted small", text: "Defaults shown; only the fields you change are sent." }),
      h("div", { class: "fields" }, common.map(make)),
      rest.length ? h("details", { class: "more" }, h("summary", { text: `All hyperparameters (${rest.length} more)` }), h("div", { class: "fields" }, rest.map(make))) : null,
    );
  } else {
    // Free-form in this server's schema: one JSON object, checked by the server on submit.
    const area = h("textarea", { id: "job-hyperparameters", rows: 8, class: "mono", spellcheck: "false" }, '{\n  "max_steps": 30\n}');
    fields.set("__json__", { area });
    hyperBlock = h("div", {}, h("h3", { text: "Hyperparameters (JSON)" }), row("hyperparameters", "", area, schema.hp.description || "Training and LoRA options."));
  }
  form.replaceChildren(h("div", { class: "fields" }, top), hyperBlock, errorBox, h("div", { class: "actions" }, submit));

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    for (const el of form.querySelectorAll(".invalid")) el.classList.remove("invalid");
    for (const el of form.querySelectorAll(".field-error")) el.remove();
    errorBox.hidden = true;
    let body;
    try {
      body = jobBody(form, fields);
    } catch (err) {
      return showFormError(form, errorBox, err.field, err.message);
    }
    submit.disabled = true;
    try {
      const job = await api("POST", "/jobs", { json: body, signal });
      location.hash = `#/jobs/${encodeURIComponent(job.id)}`;
    } catch (err) {
      showFormError(form, errorBox, err.field, err.message);
    }
    submit.disabled = false;
  });
}

function row(name, label, input, help) {
  return h(
    "div",
    { class: "field", dataset: { field: name } },
    label ? h("label", { for: input.id, text: label }) : null,
    input,
    help ? h("div", { class: "help", text: help }) : null,
  );
}

function limitsText(s) {
  const parts = [];
  const type = s.type === "array" ? `list of ${(s.items && s.items.type) || "values"}` : s.type || "";
  if (type) parts.push(type);
  const lo = s.minimum !== undefined ? `≥ ${s.minimum}` : s.exclusiveMinimum !== undefined ? `> ${s.exclusiveMinimum}` : null;
  const hi = s.maximum !== undefined ? `≤ ${s.maximum}` : s.exclusiveMaximum !== undefined ? `< ${s.exclusiveMaximum}` : null;
  if (lo || hi) parts.push([lo, hi].filter(Boolean).join(", "));
  if (s.default !== undefined && s.default !== null) parts.push(`default ${JSON.stringify(s.default)}`);
  return parts.join(" · ");
}

// One input per hyperparameter; `read()` gives [changed, value] so untouched fields are left out.
function hyperField(name, s, required) {
  const id = `hp-${name}`;
  const def = s.default;
  let input;
  let read;
  if (s.enum) {
    input = h("select", { id, name }, s.nullable ? h("option", { value: "" }, "(none)") : null, s.enum.map((v) => h("option", { value: String(v) }, String(v))));
    input.value = def === undefined || def === null ? (s.nullable ? "" : String(s.enum[0])) : String(def);
    read = () => {
      const v = input.value === "" ? null : s.enum.find((e) => String(e) === input.value);
      return [v !== def, v];
    };
  } else if (s.type === "boolean") {
    input = h("input", { id, name, type: "checkbox" });
    input.checked = Boolean(def);
    read = () => [input.checked !== Boolean(def), input.checked];
  } else if (s.type === "integer" || s.type === "number") {
    const attrs = { id, name, type: "number", step: s.type === "integer" ? 1 : "any", placeholder: def === null || def === undefined ? "default" : String(def) };
    if (s.minimum !== undefined) attrs.min = s.minimum;
    if (s.maximum !== undefined) attrs.max = s.maximum;
    input = h("input", attrs);
    if (typeof def === "number") input.value = String(def);
    read = () => {
      if (input.value.trim() === "") return [def !== undefined && def !== null && !s.nullable ? false : false, null];
      const v = Number(input.value);
      if (!Number.isFinite(v) || (s.type === "integer" && !Number.isInteger(v))) {
        throw Object.assign(new Error(`${name}: must be ${s.type === "integer" ? "a whole number" : "a number"}`), { field: `hyperparameters.${name}` });
      }
      return [v !== def, v];
    };
  } else if (s.type === "array") {
    input = h("input", { id, name, placeholder: Array.isArray(def) ? "comma-separated; empty = none" : "the server's default; or a comma-separated list" });
    const initial = Array.isArray(def) ? def.join(", ") : "";
    input.value = initial;
    input.addEventListener("input", () => (input.dataset.dirty = "1"));
    read = () => {
      const list = input.value.split(",").map((v) => v.trim()).filter(Boolean);
      return [input.dataset.dirty === "1" && input.value !== initial, list];
    };
  } else {
    input = h("input", { id, name, placeholder: def === null || def === undefined ? (s.nullable ? "none" : "") : String(def) });
    if (typeof def === "string") input.value = def;
    read = () => {
      const v = input.value.trim() === "" && s.nullable ? null : input.value;
      return [v !== (def === undefined ? null : def) && !(v === "" && def === undefined), v];
    };
  }
  const label = h("label", { for: id }, h("span", { class: "mono" }, name), required ? h("span", { class: "req", text: " *" }) : null);
  const help = h("div", { class: "help" }, s.description ? `${s.description}. ` : "", h("span", { class: "limits" }, limitsText(s)));
  const wrap = s.type === "boolean" ? h("div", { class: "field check-field", dataset: { field: `hyperparameters.${name}` } }, h("label", { class: "check", for: id }, input, h("span", { class: "mono" }, name)), help) : h("div", { class: "field", dataset: { field: `hyperparameters.${name}` } }, label, input, help);
  return { row: wrap, read };
}

function jobBody(form, fields) {
  const value = (sel) => form.querySelector(sel).value.trim();
  const body = { dataset: value("#job-dataset"), hyperparameters: {} };
  if (!body.dataset) throw Object.assign(new Error("dataset: choose a file or a sample"), { field: "dataset" });
  if (value("#job-suffix")) body.suffix = value("#job-suffix");
  if (value("#job-seed")) body.seed = Number(value("#job-seed"));
  if (fields.has("__json__")) {
    try {
      body.hyperparameters = JSON.parse(fields.get("__json__").area.value || "{}");
    } catch (err) {
      throw Object.assign(new Error(`hyperparameters: not valid JSON (${err.message})`), { field: "hyperparameters" });
    }
    return body;
  }
  for (const [name, f] of fields) {
    const [changed, v] = f.read();
    if (changed) body.hyperparameters[name] = v;
  }
  return body;
}

function showFormError(form, box, field, message) {
  box.hidden = false;
  box.textContent = message;
  if (!field) return;
  const target = form.querySelector(`[data-field="${CSS.escape(field)}"]`) || form.querySelector(`[data-field="${CSS.escape(field.split(".").slice(0, 2).join("."))}"]`);
  if (!target) return;
  target.classList.add("invalid");
  target.append(h("div", { class: "field-error", text: message }));
  const details = target.closest("details");
  if (details) details.open = true;
  target.scrollIntoView({ block: "center" });
}

// --- playground ---------------------------------------------------------------------------------

function playgroundPage(main, params, signal) {
  document.title = "Playground · gpt-oss tuner";
  const model = h("select", { id: "pg-model" }, h("option", { value: "" }, `Base model (${state.config.base_model})`));
  const efforts = ["low", "medium", "high"].map((e) =>
    h("label", { class: "seg" }, h("input", { type: "radio", name: "effort", value: e, checked: e === "medium" }), h("span", { text: e })),
  );
  const maxTokens = h("input", { id: "pg-max", type: "number", min: 1, value: 256 });
  const temperature = h("input", { id: "pg-temp", type: "number", min: 0, max: 2, step: 0.1, value: 1 });
  const developer = h("textarea", { id: "pg-developer", rows: 3, placeholder: "Developer instructions (optional)" });
  const transcript = h("div", { class: "transcript", id: "transcript" });
  const prompt = h("textarea", { id: "pg-prompt", rows: 2, placeholder: "Message (Enter sends, Shift+Enter for a new line)" });
  const send = h("button", { type: "submit", id: "pg-send" }, "Send");
  const stop = h("button", { type: "button", class: "secondary", hidden: true }, "Stop");
  const history = [];
  let running = null;

  main.append(
    h("div", { class: "page-head" }, h("h1", { text: "Playground" })),
    h(
      "div",
      { class: "grid play-grid" },
      card(
        "Settings",
        h("div", { class: "fields" }, [
          row("model", "Model", model, "The base, or an adapter trained here."),
          h("div", { class: "field" }, h("label", { text: "Reasoning effort" }), h("div", { class: "segmented", id: "pg-effort" }, efforts)),
          row("max_new_tokens", "Max new tokens", maxTokens, null),
          row("temperature", "Temperature", temperature, "0 = greedy."),
          row("developer", "Developer message", developer, null),
        ]),
        h("button", { type: "button", class: "secondary", onclick: () => ((history.length = 0), transcript.replaceChildren(emptyChat())) }, "New chat"),
      ),
      h(
        "section",
        { class: "card chat" },
        transcript,
        h("form", { class: "composer", onsubmit: (e) => (e.preventDefault(), ask()) }, prompt, h("div", { class: "composer-actions" }, stop, send)),
      ),
    ),
  );
  transcript.append(emptyChat());
  prompt.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey) {
      e.preventDefault();
      ask();
    }
  });
  stop.addEventListener("click", () => running && running.abort());
  signal.addEventListener("abort", () => running && running.abort());

  api("GET", "/adapters?limit=100", { signal })
    .then((page) => {
      for (const a of page.data) model.append(h("option", { value: a.id }, a.name));
      const wanted = params.get("adapter");
      if (wanted) model.value = wanted;
    })
    .catch(() => {});

  function emptyChat() {
    return h("p", { class: "muted empty-chat", text: "Ask something. The model's reasoning appears apart from its answer." });
  }

  async function ask() {
    const text = prompt.value.trim();
    if (!text || running) return;
    if (!history.length) transcript.replaceChildren();
    prompt.value = "";
    history.push({ role: "user", content: text });
    transcript.append(h("div", { class: "msg user" }, h("div", { class: "bubble" }, text)));
    const reasoning = h("div", { class: "reasoning-text" });
    const reasoningBox = h("details", { class: "reasoning", open: true, hidden: true }, h("summary", { text: "Reasoning" }), reasoning);
    const answer = h("div", { class: "answer" });
    const meta = h("div", { class: "meta" }, h("span", { class: "typing" }, "generating…"));
    const adapterName = model.selectedOptions[0] ? model.selectedOptions[0].textContent : "";
    const msg = h("div", { class: "msg assistant", dataset: { state: "streaming" } }, h("div", { class: "who", text: adapterName }), reasoningBox, answer, meta);
    transcript.append(msg);
    transcript.scrollTop = transcript.scrollHeight;
    const body = {
      messages: history.slice(),
      reasoning_effort: main.querySelector('input[name="effort"]:checked').value,
      max_new_tokens: Number(maxTokens.value) || undefined,
      temperature: Number(temperature.value),
      stream: true,
    };
    if (model.value) body.adapter = model.value;
    if (developer.value.trim()) body.developer = developer.value.trim();
    running = new AbortController();
    send.disabled = true;
    stop.hidden = false;
    try {
      const response = await fetch("/generate", {
        method: "POST",
        headers: authHeaders({ "Content-Type": "application/json" }),
        body: JSON.stringify(body),
        signal: running.signal,
      });
      if (!response.ok) {
        const error = new ApiError(response.status, await response.json().catch(() => null));
        if (response.status === 401) needKey(error.message);
        throw error;
      }
      await readSse(response, (_name, event) => {
        if (event.type === "delta") {
          const target = event.kind === "reasoning" ? reasoning : answer;
          if (event.kind === "reasoning") reasoningBox.hidden = false;
          target.textContent += event.text;
          transcript.scrollTop = transcript.scrollHeight;
        } else if (event.type === "done") {
          history.push({ role: "assistant", content: event.content });
          const u = event.usage;
          const took = event.timings && event.timings.total_s !== undefined ? ` · ${event.timings.total_s.toFixed(2)} s` : "";
          meta.replaceChildren(`${u.completion_tokens} tokens${took} · finish: ${event.finish_reason}`);
          if (!event.content) answer.append(h("span", { class: "muted", text: "(no final answer)" }));
        } else if (event.type === "error") {
          throw new ApiError(500, { error: event.error });
        }
      });
      msg.dataset.state = "done";
    } catch (err) {
      msg.dataset.state = "error";
      history.pop();
      meta.replaceChildren(h("span", { class: "error-text" }, err.name === "AbortError" ? "stopped" : err.message));
    }
    running = null;
    send.disabled = false;
    stop.hidden = true;
  }
}

// --- start ----------------------------------------------------------------------------------------

async function start() {
  try {
    state.config = await fetch("/console/config").then((r) => r.json());
  } catch (err) {
    showBanner(`The server did not answer: ${err.message}`);
    return;
  }
  renderKeybox();
  if (state.config.auth === "keys" && !apiKey()) needKey("This server needs an API key");
  window.addEventListener("hashchange", route);
  route();
}

document.addEventListener("DOMContentLoaded", start);
