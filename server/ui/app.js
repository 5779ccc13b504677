// prefixserve web console: plain DOM, no framework, no third-party code.
// Everything the API returns is shown with textContent (never as markup), and the API key lives in
// this tab's sessionStorage and travels only as an Authorization header.
"use strict";

const MAX_COLUMNS = 4;
const NO_PREFIX = "";
const KEY_STORE = "prefixserve.key";
const SVG = "http://www.w3.org/2000/svg";

const state = {
  key: sessionStorage.getItem(KEY_STORE) || "",
  connected: false, // a key (or none, where the server has auth off) was accepted
  role: "tenant", // "admin": the key is the server's admin key (only the Admin page), else a tenant's
  prefixes: [],
  scores: new Map(), // prefix id -> its latest evaluation's metrics, or null: none
  selectedJob: null,
  tenants: [], // the Admin page's GET /admin/tenants
  adminTenant: null, // the tenant open in the Admin page's detail card
  timers: [],
  streams: [],
  throughput: [], // tokens/s samples of the Server page
};

// ---- small helpers -------------------------------------------------------------------------------
function $(selector) {
  return document.querySelector(selector);
}

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else if (name === "class") node.className = value;
    else node.setAttribute(name, value);
  }
  for (const child of children) {
    node.append(child instanceof Node ? child : document.createTextNode(String(child ?? "")));
  }
  return node;
}

function svg(tag, attrs = {}) {
  const node = document.createElementNS(SVG, tag);
  for (const [name, value] of Object.entries(attrs)) node.setAttribute(name, value);
  return node;
}

function say(text, kind = "error") {
  const box = $("#message");
  box.textContent = text;
  box.className = kind;
  box.hidden = !text;
}

function fmtNumber(x, digits = 3) {
  return x === null || x === undefined ? "–" : Number(x).toPrecision(digits);
}

function fmtBytes(n) {
  if (!n) return "0 B";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  const i = Math.min(units.length - 1, Math.floor(Math.log2(n) / 10));
  return (n / 2 ** (10 * i)).toFixed(i ? 1 : 0) + " " + units[i];
}

function fmtSeconds(s) {
  if (s === null || s === undefined) return "–";
  return s < 90 ? `${Math.round(s)} s` : `${Math.round(s / 60)} min`;
}

function fmtDate(iso) {
  return iso ? iso.replace("T", " ").replace(/\+00:00$/, " UTC") : "";
}

class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

function headers(json) {
  const h = {};
  if (state.key) h.Authorization = "Bearer " + state.key;
  if (json) h["Content-Type"] = "application/json";
  return h;
}

async function errorOf(response) {
  const text = await response.text();
  try {
    const body = JSON.parse(text);
    return new ApiError(response.status, body.error ? body.error.message : JSON.stringify(body.detail ?? body));
  } catch {
    return new ApiError(response.status, text || response.statusText);
  }
}

async function api(method, path, body) {
  const json = body !== undefined && !(body instanceof FormData);
  const response = await fetch(path, {
    method,
    headers: headers(json),
    body: json ? JSON.stringify(body) : body,
  });
  if (!response.ok) throw await errorOf(response);
  return response.status === 204 ? null : response.json();
}

function explain(err) {
  if (err.status === 401) return `The server refused the API key (401): ${err.message}. Enter a valid key above.`;
  if (err.status === 429) return `Rate limited (429): ${err.message}`;
  if (err.status >= 500) return `The server could not do it (${err.status}): ${err.message}`;
  return err.status ? `${err.status}: ${err.message}` : String(err.message || err);
}

function every(ms, fn) {
  fn();
  state.timers.push(setInterval(fn, ms));
}

function stopTimers() {
  state.timers.forEach(clearInterval);
  state.timers = [];
}

// ---- log-in --------------------------------------------------------------------------------------
// Which kind of key: the admin key lists the tenants (a tenant's key gets 403 there, a wrong one 401,
// and a server without an admin API 403), else it must work as a tenant's key, as it always did.
async function connect(key) {
  state.key = key;
  let role = "tenant";
  try {
    await api("GET", "/admin/tenants");
    role = "admin";
  } catch {
    try {
      await api("GET", "/prefixes");
    } catch (err) {
      state.key = "";
      sessionStorage.removeItem(KEY_STORE);
      showLoggedIn(false);
      say(explain(err));
      return false;
    }
  }
  sessionStorage.setItem(KEY_STORE, key);
  showLoggedIn(true, role);
  say("");
  return true;
}

function showLoggedIn(yes, role = "tenant") {
  state.connected = yes;
  state.role = yes ? role : "tenant";
  $("#who").textContent = yes ? (state.role === "admin" ? "connected as admin" : "connected") : "";
  $("#logout").hidden = !yes;
  $("#api-key").value = "";
  document.body.classList.toggle("connected", yes);
  document.body.dataset.role = state.role;
  // the admin key works only on /admin: the tenant pages (and their links) are for tenants' keys
  for (const link of document.querySelectorAll("nav a[data-role]")) link.hidden = link.dataset.role !== state.role;
  if (state.role !== "admin") clearAdmin(); // nothing of the admin's stays in the page for another key
}

// ---- Prefixes ------------------------------------------------------------------------------------
async function loadPrefixes() {
  state.scores.clear(); // evaluations may have finished since
  try {
    state.prefixes = (await api("GET", "/prefixes")).prefixes;
  } catch (err) {
    say(explain(err));
    return;
  }
  fillFilter("#filter-kind", "every kind", state.prefixes.map((p) => p.kind));
  fillFilter("#filter-source", "every source", state.prefixes.map((p) => p.source));
  renderPrefixes();
  fillPrefixChoices();
}

function fillFilter(selector, allLabel, values) {
  const select = $(selector);
  const keep = select.value;
  select.replaceChildren(el("option", { value: "" }, allLabel));
  for (const v of [...new Set(values)].sort()) select.append(el("option", { value: v }, v));
  select.value = [...select.options].some((o) => o.value === keep) ? keep : "";
}

function renderPrefixes() {
  const text = $("#filter-name").value.trim().toLowerCase();
  const kind = $("#filter-kind").value;
  const source = $("#filter-source").value;
  const visibility = $("#filter-visibility").value;
  const shown = state.prefixes.filter(
    (p) =>
      (!text || p.name.toLowerCase().includes(text) || p.id.includes(text)) &&
      (!kind || p.kind === kind) &&
      (!source || p.source === source) &&
      (!visibility || p.visibility === visibility),
  );
  const body = $("#prefix-table tbody");
  body.replaceChildren(
    ...shown.map((p) =>
      el(
        "tr",
        { "data-id": p.id },
        el("td", { class: "name" }, p.name || "(unnamed)"),
        el("td", { class: "mono" }, p.id),
        el("td", {}, p.kind),
        el("td", {}, p.source),
        el("td", {}, p.visibility),
        el("td", { class: "num" }, p.prefix_len),
        el("td", { class: "num" }, p.size_bytes === null ? "–" : fmtBytes(p.size_bytes)),
        el("td", {}, p.dtype),
        el("td", { class: "mono", title: p.model_fingerprint }, p.model_fingerprint.slice(0, 10)),
        el("td", {}, fmtDate(p.created_at)),
        el("td", { class: "scores" }, scoreText(p.id)),
        el("td", {}, el("button", { type: "button", onclick: () => showPrefix(p.id) }, "details")),
        el("td", {}, el("button", { type: "button", class: "danger", onclick: () => deletePrefix(p) }, "Delete")),
      ),
    ),
  );
  $("#prefix-empty").hidden = state.prefixes.length > 0;
  loadScores(shown.slice(0, 50));
}

function scoreText(id) {
  const metrics = state.scores.get(id);
  if (!metrics) return metrics === null ? "" : "…";
  return Object.entries(metrics).map(([k, v]) => `${k} ${fmtNumber(v, 3)}`).join(" · ");
}

// Each shown prefix's latest evaluation (GET /prefixes/{id} carries them), four requests at a time.
async function loadScores(prefixes) {
  const todo = prefixes.filter((p) => !state.scores.has(p.id));
  const next = async () => {
    for (let p = todo.shift(); p; p = todo.shift()) {
      let metrics = null;
      try {
        const evaluations = (await api("GET", `/prefixes/${encodeURIComponent(p.id)}`)).evaluations || [];
        metrics = evaluations.length ? evaluations[evaluations.length - 1].metrics : null;
      } catch {
        metrics = null; // gone meanwhile: the next refresh drops the row
      }
      state.scores.set(p.id, metrics);
      const cell = document.querySelector(`#prefix-table tr[data-id="${CSS.escape(p.id)}"] td.scores`);
      if (cell) cell.textContent = scoreText(p.id);
    }
  };
  await Promise.all([next(), next(), next(), next()]);
}

async function showPrefix(id) {
  const box = $("#prefix-detail");
  let p;
  try {
    p = await api("GET", `/prefixes/${encodeURIComponent(id)}`);
  } catch (err) {
    say(explain(err));
    return;
  }
  const rows = (p.evaluations || []).map((e) =>
    el("li", {}, `${fmtDate(e.created_at)} · ${e.n_examples} examples · ` +
      Object.entries(e.metrics).map(([k, v]) => `${k} ${fmtNumber(v, 4)}`).join(", ")),
  );
  box.replaceChildren(
    el("h3", {}, p.name || p.id),
    el("p", { class: "mono" }, `${p.id} · owner ${p.owner} · sha256 ${p.sha256.slice(0, 16)}…`),
    el("p", {}, `${p.kind}, ${p.prefix_len} positions, ${p.dtype}, from ${p.source}`),
    rows.length ? el("ul", {}, ...rows) : el("p", { class: "muted" }, "No evaluations yet."),
  );
  box.hidden = false;
}

async function deletePrefix(p) {
  if (!window.confirm(`Delete prefix "${p.name || p.id}" (${p.id})? This cannot be undone.`)) return;
  try {
    await api("DELETE", `/prefixes/${encodeURIComponent(p.id)}`);
    say(`Deleted ${p.id}.`, "ok");
  } catch (err) {
    say(explain(err));
  }
  $("#prefix-detail").hidden = true;
  await loadPrefixes();
}

function uploadTab() {
  return $("#upload-tabs .active").dataset.tab;
}

async function submitUpload(event) {
  event.preventDefault();
  const name = $("#upload-name").value.trim();
  const visibility = $("#upload-visibility").value;
  let body;
  if (uploadTab() === "text") {
    body = { text: $("#upload-text").value, name, visibility };
  } else {
    body = new FormData();
    const files = uploadTab() === "native"
      ? { file: $("#upload-file").files[0] }
      : { adapter_config: $("#upload-peft-config").files[0], adapter_model: $("#upload-peft-model").files[0] };
    for (const [field, file] of Object.entries(files)) {
      if (!file) return say(`Choose the ${field.replace("_", " ")} file first.`);
      body.append(field, file);
    }
    body.append("name", name);
    body.append("visibility", visibility);
  }
  try {
    const p = await api("POST", "/prefixes", body);
    say(`Added ${p.name || p.id} (${p.id}).`, "ok");
    $("#upload-form").reset();
  } catch (err) {
    say(explain(err));
  }
  await loadPrefixes();
}

// ---- Jobs ----------------------------------------------------------------------------------------
async function loadJobs() {
  let jobs;
  try {
    jobs = (await api("GET", "/jobs")).jobs;
  } catch (err) {
    say(explain(err));
    return;
  }
  const body = $("#job-table tbody");
  body.replaceChildren(
    ...jobs.map((j) =>
      el(
        "tr",
        { "data-id": j.id, "data-status": j.status, class: j.id === state.selectedJob ? "selected" : "",
          onclick: () => selectJob(j.id) },
        el("td", { class: "mono" }, j.id),
        el("td", {}, j.name || (j.target ? `evaluate ${j.target}` : "")),
        el("td", {}, j.kind),
        el("td", { class: `status ${j.status}` }, j.status),
        el("td", {}, j.total_steps ? `epoch ${j.epoch}, step ${j.step}/${j.total_steps}` : "–"),
        el("td", { class: "num" }, fmtNumber(j.loss)),
        el("td", { class: "num" }, fmtNumber(j.eval_loss)),
        el("td", {}, j.status === "running" ? fmtSeconds(j.eta_s) : "–"),
        el("td", {}, fmtDate(j.created_at)),
        el("td", {}, ["queued", "running"].includes(j.status)
          ? el("button", { type: "button", class: "danger", onclick: (e) => { e.stopPropagation(); cancelJob(j.id); } }, "Cancel")
          : ""),
      ),
    ),
  );
  $("#job-empty").hidden = jobs.length > 0;
  const selected = jobs.find((j) => j.id === state.selectedJob);
  if (selected) showJob(selected);
}

function selectJob(id) {
  state.selectedJob = id;
  loadJobs();
}

function showJob(job) {
  $("#job-detail").hidden = false;
  $("#job-title").textContent = `${job.name || job.id}: ${job.status}`;
  const epochs = job.config.epochs || job.eval_losses.length || 1;
  const perEpoch = job.total_steps ? job.total_steps / epochs : 1;
  const evalPoints = job.eval_losses.map((y, i) => [(i + 1) * perEpoch, y]);
  const trainPoints = job.losses.map((y, i) => [i + 1, y]);
  $("#job-chart").replaceChildren(lineChart([
    { points: trainPoints, cls: "train" },
    { points: evalPoints, cls: "eval", dots: true },
  ], { xMax: Math.max(job.total_steps, trainPoints.length, 1) }));
  const facts = [
    `epoch ${job.epoch}, step ${job.step} of ${job.total_steps}`,
    job.loss === null ? "" : `loss ${fmtNumber(job.loss, 4)}`,
    job.eval_loss === null ? "" : `validation loss ${fmtNumber(job.eval_loss, 4)}`,
    job.status === "running" ? `about ${fmtSeconds(job.eta_s)} left` : "",
    job.prefix_id ? `prefix ${job.prefix_id}` : "",
    job.evaluation ? "held-out " + Object.entries(job.evaluation.metrics).map(([k, v]) => `${k} ${fmtNumber(v, 4)}`).join(", ") : "",
  ].filter(Boolean);
  $("#job-facts").textContent = facts.join(" · ");
  $("#job-error").textContent = job.error || "";
  $("#job-info").textContent = JSON.stringify({ config: job.config, evaluation: job.evaluation }, null, 2);
}

async function cancelJob(id) {
  try {
    await api("DELETE", `/jobs/${encodeURIComponent(id)}`);
    say(`Cancelling ${id}.`, "ok");
  } catch (err) {
    say(explain(err));
  }
  loadJobs();
}

function parseExamples(text) {
  const lines = text.split("\n").map((l) => l.trim()).filter(Boolean);
  return lines.map((line, i) => {
    try {
      return JSON.parse(line);
    } catch {
      throw new ApiError(0, `line ${i + 1} of the examples is not JSON: ${line.slice(0, 60)}`);
    }
  });
}

async function submitTraining(event) {
  event.preventDefault();
  let examples;
  try {
    examples = parseExamples($("#train-examples").value);
  } catch (err) {
    return say(explain(err));
  }
  const kind = $("#train-kind").value;
  const body = {
    train: {
      examples,
      kind,
      ...(kind === "prefix_kv" ? { prefix_len: Number($("#train-prefix-len").value) } : {}),
      epochs: Number($("#train-epochs").value),
      learning_rate: Number($("#train-lr").value),
      val_fraction: Number($("#train-val").value),
    },
    name: $("#train-name").value.trim(),
  };
  try {
    const job = await api("POST", "/prefixes", body);
    state.selectedJob = job.id;
    say(`Queued training job ${job.id}.`, "ok");
  } catch (err) {
    say(explain(err));
  }
  loadJobs();
}

// ---- charts --------------------------------------------------------------------------------------
// A line chart of series [{points: [[x, y]...], cls, dots}] as SVG; data-points = the first series' count.
function lineChart(series, { width = 640, height = 220, xMax } = {}) {
  const pad = { left: 52, right: 12, top: 10, bottom: 26 };
  const all = series.flatMap((s) => s.points);
  const root = svg("svg", { viewBox: `0 0 ${width} ${height}`, class: "chart",
    "data-points": String(series[0].points.length) });
  if (!all.length) {
    const t = svg("text", { x: width / 2, y: height / 2, "text-anchor": "middle", class: "muted" });
    t.textContent = "no points yet";
    root.append(t);
    return root;
  }
  const ys = all.map((p) => p[1]);
  let [yMin, yMax] = [Math.min(...ys), Math.max(...ys)];
  if (yMin === yMax) [yMin, yMax] = [yMin - 1, yMax + 1];
  const x1 = xMax || Math.max(...all.map((p) => p[0]), 1);
  const sx = (x) => pad.left + (x / x1) * (width - pad.left - pad.right);
  const sy = (y) => pad.top + (1 - (y - yMin) / (yMax - yMin)) * (height - pad.top - pad.bottom);
  root.append(svg("line", { x1: pad.left, y1: height - pad.bottom, x2: width - pad.right, y2: height - pad.bottom, class: "axis" }));
  root.append(svg("line", { x1: pad.left, y1: pad.top, x2: pad.left, y2: height - pad.bottom, class: "axis" }));
  for (const [y, label] of [[yMax, yMax], [yMin, yMin]]) {
    const t = svg("text", { x: pad.left - 6, y: sy(y) + 4, "text-anchor": "end", class: "tick" });
    t.textContent = fmtNumber(label, 3);
    root.append(t);
  }
  const xLabel = svg("text", { x: width - pad.right, y: height - 6, "text-anchor": "end", class: "tick" });
  xLabel.textContent = String(Math.round(x1));
  root.append(xLabel);
  for (const s of series) {
    if (!s.points.length) continue;
    const d = s.points.map((p, i) => `${i ? "L" : "M"}${sx(p[0]).toFixed(1)},${sy(p[1]).toFixed(1)}`).join(" ");
    root.append(svg("path", { d, class: `line ${s.cls}` }));
    if (s.dots || s.points.length === 1) for (const p of s.points) root.append(svg("circle", { cx: sx(p[0]), cy: sy(p[1]), r: 3.5, class: `dot ${s.cls}` }));
  }
  return root;
}

// ---- Playground ----------------------------------------------------------------------------------
const ADAPTER_KINDS = ["lora", "adapter"]; // weight-side: may ride beside a prefix on one row

// Each column: a prefix of any kind (or none), and optionally an adapter beside it.
function fillPrefixChoices() {
  const choices = [
    ["select.prefix", "no prefix (bare model)", state.prefixes],
    ["select.adapter", "no adapter", state.prefixes.filter((p) => ADAPTER_KINDS.includes(p.kind))],
  ];
  for (const [selector, none, prefixes] of choices) {
    for (const select of document.querySelectorAll(`#columns ${selector}`)) {
      const keep = select.value;
      select.replaceChildren(el("option", { value: NO_PREFIX }, none));
      for (const p of prefixes) select.append(el("option", { value: p.id }, `${p.name || "(unnamed)"} · ${p.id}`));
      select.value = [...select.options].some((o) => o.value === keep) ? keep : NO_PREFIX;
    }
  }
}

function addColumn(prefixId = NO_PREFIX) {
  const columns = $("#columns");
  if (columns.children.length >= MAX_COLUMNS) return say(`At most ${MAX_COLUMNS} columns.`);
  const column = el("div", { class: "column card", "data-state": "idle" },
    el("div", { class: "column-head" },
      el("select", { "aria-label": "prefix", class: "prefix" }),
      el("button", { type: "button", title: "remove this column", onclick: () => { column.remove(); updateAdd(); } }, "×"),
      el("select", { "aria-label": "adapter beside the prefix", class: "adapter" })),
    el("div", { class: "output" }),
    el("div", { class: "column-foot" },
      el("span", { class: "finish" }),
      el("button", { type: "button", onclick: () => showSnippet(column, "curl") }, "copy as curl"),
      el("button", { type: "button", onclick: () => showSnippet(column, "python") }, "copy as Python SDK")));
  columns.append(column);
  fillPrefixChoices();
  column.querySelector("select.prefix").value = prefixId;
  updateAdd();
}

function updateAdd() {
  $("#play-add").disabled = $("#columns").children.length >= MAX_COLUMNS;
}

function playRequest(column) {
  const prefixId = column.querySelector("select.prefix").value || null;
  const adapterId = column.querySelector("select.adapter").value || null;
  const body = {
    prefix_id: prefixId,
    ...(adapterId ? { adapter_id: adapterId } : {}),
    input: $("#play-input").value,
    max_new_tokens: Number($("#play-max-tokens").value),
    temperature: Number($("#play-temperature").value),
    top_p: Number($("#play-top-p").value),
  };
  const seed = $("#play-seed").value;
  if (seed !== "") body.seed = Number(seed);
  const stop = $("#play-stop").value.split(",").map((s) => s.replaceAll("\\n", "\n")).filter((s) => s !== "");
  if (stop.length) body.stop = stop;
  if ($("#play-logprobs").checked) body.logprobs = 0;
  return body;
}

// Server-Sent Events from a fetch response: yields {event, data} as they arrive.
async function* sseEvents(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      let event = "message";
      const data = [];
      for (const line of block.split("\n")) {
        if (line.startsWith("event:")) event = line.slice(6).trim();
        else if (line.startsWith("data:")) data.push(line.slice(5).trimStart());
      }
      yield { event, data: data.length ? JSON.parse(data.join("\n")) : null };
    }
  }
}

function tokenSpan(text, logprob) {
  const span = el("span", { class: "tok" }, text);
  if (logprob !== undefined && logprob !== null) {
    const p = Math.exp(logprob);
    span.title = `p = ${p.toFixed(3)} (logprob ${logprob.toFixed(3)})`;
    span.style.setProperty("--improbable", (1 - p).toFixed(3)); // shading: the less likely, the redder
  }
  return span;
}

async function runColumn(column, body, signal) {
  const out = column.querySelector(".output");
  const finish = column.querySelector(".finish");
  out.replaceChildren();
  finish.textContent = "";
  column.dataset.state = "streaming";
  try {
    const response = await fetch("/generate", {
      method: "POST", headers: headers(true), body: JSON.stringify({ ...body, stream: true }), signal,
    });
    if (!response.ok) throw await errorOf(response);
    for await (const { event, data } of sseEvents(response)) {
      if (event === "token") {
        if (data.logprobs && data.logprobs.length) {
          // the event's text is the detokenized delta; shade it by its tokens' joint probability
          const lp = data.logprobs.reduce((a, t) => a + t.logprob, 0);
          out.append(tokenSpan(data.text, lp));
        } else {
          out.append(tokenSpan(data.text));
        }
      } else if (event === "done") {
        const u = data.usage;
        finish.textContent = `${data.finish_reason} · ${u.completion_tokens} tokens`;
        column.dataset.state = "done";
      } else if (event === "error") {
        throw new ApiError(data.error ? 500 : 0, data.error ? data.error.message : JSON.stringify(data));
      }
    }
    if (column.dataset.state === "streaming") column.dataset.state = "done";
  } catch (err) {
    column.dataset.state = err.name === "AbortError" ? "stopped" : "error";
    finish.textContent = err.name === "AbortError" ? "stopped" : explain(err);
  }
}

async function runPlayground(event) {
  event.preventDefault();
  if (!$("#play-input").value) return say("Type an input first.");
  stopStreams();
  say("");
  const controller = new AbortController();
  state.streams.push(controller);
  const columns = [...document.querySelectorAll("#columns .column")];
  // every column's request starts at once, so the engine runs them in the same batch
  await Promise.all(columns.map((c) => runColumn(c, playRequest(c), controller.signal)));
}

function stopStreams() {
  state.streams.forEach((c) => c.abort());
  state.streams = [];
}

function pyLiteral(v) {
  if (v === null) return "None";
  if (v === true) return "True";
  if (v === false) return "False";
  return JSON.stringify(v);
}

async function showSnippet(column, kind) {
  const body = playRequest(column);
  const base = window.location.origin;
  let text;
  if (kind === "curl") {
    const json = JSON.stringify(body).replaceAll("'", "'\\''");
    text = `curl -s ${base}/generate \\\n  -H "Authorization: Bearer $PREFIXSERVE_API_KEY" \\\n` +
      `  -H "Content-Type: application/json" \\\n  -d '${json}'`;
  } else {
    const { prefix_id: prefixId, input, ...params } = body;
    const args = Object.entries(params).map(([k, v]) => `, ${k}=${pyLiteral(v)}`).join("");
    text = `import os\nfrom prefixserve_client import Client\n\n` +
      `client = Client(${JSON.stringify(base)}, api_key=os.environ["PREFIXSERVE_API_KEY"])\n` +
      `result = client.generate(${pyLiteral(prefixId)}, ${pyLiteral(input)}${args})\nprint(result.text)`;
  }
  const box = $("#snippet");
  box.textContent = text;
  box.hidden = false;
  try {
    await navigator.clipboard.writeText(text);
    say("Copied to the clipboard (the key is read from $PREFIXSERVE_API_KEY).", "ok");
  } catch {
    say("Shown below: copy it from there (this page may not use the clipboard).", "ok");
  }
}

// ---- Server --------------------------------------------------------------------------------------
function statCard(title, value, detail, fraction) {
  const card = el("div", { class: "stat card", "data-stat": title },
    el("div", { class: "stat-title" }, title), el("div", { class: "stat-value" }, value));
  if (fraction !== undefined) {
    const fill = el("div");
    fill.style.width = `${Math.round(100 * Math.min(1, fraction))}%`; // CSSOM: the policy bars style attributes
    card.append(el("div", { class: "bar" }, fill));
  }
  card.append(el("div", { class: "muted" }, detail));
  return card;
}

async function loadServer() {
  let s;
  try {
    s = await api("GET", "/server/stats");
  } catch (err) {
    say(explain(err));
    return;
  }
  const used = s.kv_blocks_total - s.kv_blocks_free;
  const cards = [
    statCard("Batch occupancy", `${s.running} / ${s.max_running}`, "rows in the batch / its limit", s.running / Math.max(1, s.max_running)),
    statCard("Throughput", `${s.tokens_per_s.toFixed(1)} tok/s`, `${s.tokens_total} tokens since start`),
    statCard("Queue depth", String(s.waiting), "requests waiting for the batch"),
    statCard("KV blocks", `${used} / ${s.kv_blocks_total}`,
      `${s.kv_blocks_prefixes} of them prefixes; ${s.preemptions} preemptions`, used / Math.max(1, s.kv_blocks_total)),
    statCard("Device pool", `${s.resident_prefixes} prefixes`,
      `${fmtBytes(s.resident_bytes)} of ${s.pool_budget_bytes ? fmtBytes(s.pool_budget_bytes) : "no budget"}`,
      s.pool_budget_bytes ? s.resident_bytes / s.pool_budget_bytes : undefined),
    statCard("Model", s.model, `Redis: ${s.redis}`),
    statCard("Compute", `attention: ${s.decode_kernel}`, `CUDA graphs: ${s.cuda_graphs}`),
  ];
  $("#server-cards").replaceChildren(...cards);
  state.throughput.push(s.tokens_per_s);
  if (state.throughput.length > 150) state.throughput.shift();
  $("#server-chart").replaceChildren(lineChart([
    { points: state.throughput.map((y, i) => [i + 1, y]), cls: "train" },
  ], { height: 140, xMax: 150 }));
  $("#tier-table tbody").replaceChildren(...Object.entries(s.prefix_loads).map(([tier, t]) =>
    el("tr", { "data-tier": tier }, el("td", {}, tier), el("td", { class: "num" }, t.hits),
      el("td", { class: "num" }, t.misses),
      el("td", { class: "num" }, t.hit_rate === null ? "–" : `${(100 * t.hit_rate).toFixed(1)}%`),
      el("td", {}, Object.entries(t.other).map(([k, n]) => `${k.replace("_", " ")} ${n}`).join(", ")))));
}

// The calling tenant's own usage (GET /usage): today's and the last 7 days' counts, what it stores
// now, and the limits that apply to it.
const USAGE_COUNTS = [
  ["requests", "Requests"],
  ["prompt_tokens", "Prompt tokens"],
  ["prefix_tokens", "Prefix tokens"],
  ["generated_tokens", "Generated tokens"],
  ["training_example_epochs", "Training examples × epochs"],
  ["evaluation_examples", "Evaluation examples"],
  ["stored_bytes", "Bytes of prefixes added"],
];

async function loadMyUsage() {
  let today, week;
  try {
    // days=1 is the server's (UTC) today, whatever this browser's clock says
    [today, week] = await Promise.all([api("GET", "/usage?days=1"), api("GET", "/usage?days=7")]);
  } catch (err) {
    say(explain(err));
    return;
  }
  $("#my-usage-tenant").textContent = `(tenant ${week.tenant})`;
  const count = (row, k) => (k === "stored_bytes" ? fmtBytes(row[k]) : String(row[k]));
  $("#my-usage-table tbody").replaceChildren(...USAGE_COUNTS.map(([k, label]) =>
    el("tr", { "data-count": k }, el("th", {}, label), el("td", { class: "num" }, count(today.totals, k)),
      el("td", { class: "num" }, count(week.totals, k)))));
  const now = { max_stored_prefixes: String(week.stored.prefixes), max_stored_bytes: fmtBytes(week.stored.bytes) };
  $("#my-limits-table tbody").replaceChildren(...LIMITS.map(([k, label]) =>
    el("tr", { "data-limit": k }, el("th", {}, label), el("td", { class: "num" }, fmtLimit(k, week.limits[k])),
      el("td", { class: "num" }, now[k] ?? ""))));
  $("#my-usage").hidden = false;
}

// ---- Admin (the admin key only) ------------------------------------------------------------------
// [field, label, short label] of every tenant limit (TenantLimits); 0 is unlimited
const LIMITS = [
  ["requests_per_minute", "Requests / minute", "req/min"],
  ["tokens_per_minute", "Tokens / minute", "tok/min"],
  ["max_concurrent", "Concurrent requests", "concurrent"],
  ["max_stored_prefixes", "Stored prefixes", "prefixes"],
  ["max_stored_bytes", "Stored bytes", "bytes"],
  ["max_active_jobs", "Active jobs", "jobs"],
];

function fmtLimit(field, value) {
  if (value === undefined || value === null) return "–";
  if (value === 0) return "unlimited";
  return field === "max_stored_bytes" ? fmtBytes(value) : String(value);
}

function limitInputs(container) {
  container.replaceChildren(...LIMITS.map(([k, label]) =>
    el("label", {}, label, el("input", { type: "number", min: "0", step: "1", "data-limit": k }))));
}

// The limits typed in `form`: a number each; an empty one is left out, or null (reset to the default)
function readLimits(form, emptyAs) {
  const limits = {};
  for (const input of form.querySelectorAll("input[data-limit]")) {
    const text = input.value.trim();
    const label = LIMITS.find(([k]) => k === input.dataset.limit)[1];
    if (text === "") {
      if (emptyAs !== undefined) limits[input.dataset.limit] = emptyAs;
      continue;
    }
    const n = Number(text);
    if (!Number.isSafeInteger(n) || n < 0) throw new ApiError(0, `${label}: expected a whole number, 0 or more (0: unlimited)`);
    limits[input.dataset.limit] = n;
  }
  return limits;
}

function readWeight(input) {
  const w = Number(input.value);
  if (input.value.trim() === "" || !Number.isFinite(w) || w <= 0) throw new ApiError(0, "Weight: expected a number above 0");
  return w;
}

const tenantPath = (name) => `/admin/tenants/${encodeURIComponent(name)}`;

async function loadAdmin() {
  let tenants, today, week;
  try {
    // days=1: the server's (UTC) today
    [tenants, today, week] = await Promise.all([
      api("GET", "/admin/tenants"), api("GET", "/admin/usage?days=1"), api("GET", "/admin/usage?days=7"),
    ]);
  } catch (err) {
    if (state.role === "admin") say(explain(err));
    return false;
  }
  if (!state.connected || state.role !== "admin") return false; // the key was forgotten meanwhile
  state.tenants = tenants.tenants;
  renderTenants(today.days);
  renderAdminUsage(week.days);
  if (state.adminTenant && !state.tenants.some((t) => t.name === state.adminTenant)) closeTenant();
  return true;
}

function limitSummary(t) {
  return el("span", { class: "limits-compact" }, ...LIMITS.map(([k, label, short]) =>
    el("span", { class: k in t.limits ? "limit set" : "limit", "data-limit": k,
      title: `${label}: ${fmtLimit(k, t.effective_limits[k])} (${k in t.limits ? "set for this tenant" : "the server's default"})` },
    `${short} ${fmtLimit(k, t.effective_limits[k]).replace("unlimited", "∞")}`)));
}

function renderTenants(todayRows) {
  const today = new Map(todayRows.map((r) => [r.tenant, r]));
  $("#tenant-table tbody").replaceChildren(...state.tenants.map((t) => {
    const use = today.get(t.name) || { requests: 0, generated_tokens: 0 };
    const active = t.status === "active";
    const keys = t.keys + (t.config_keys ? ` + ${t.config_keys} configured` : "");
    return el("tr", { "data-tenant": t.name, "data-status": t.status, class: t.name === state.adminTenant ? "selected" : "" },
      el("td", { class: "name" }, t.name),
      el("td", { class: `status ${t.status}` }, t.status),
      el("td", { class: "num weight" }, String(t.weight)),
      el("td", {}, t.source),
      el("td", { class: "keys" }, keys),
      el("td", {}, limitSummary(t)),
      el("td", { class: "num today-requests" }, use.requests),
      el("td", { class: "num today-generated" }, use.generated_tokens),
      el("td", {}, el("button", { type: "button", class: active ? "toggle danger" : "toggle",
        onclick: () => setStatus(t.name, active ? "disabled" : "active") }, active ? "Disable" : "Enable")),
      el("td", {}, el("button", { type: "button", class: "manage", onclick: () => openTenant(t.name) }, "Manage")));
  }));
  $("#tenant-empty").hidden = state.tenants.length > 0;
}

function renderAdminUsage(rows) {
  $("#admin-usage-table tbody").replaceChildren(...rows.map((r) =>
    el("tr", { "data-day": r.day, "data-tenant": r.tenant }, el("td", {}, r.day), el("td", {}, r.tenant),
      ...USAGE_COUNTS.map(([k]) => el("td", { class: "num" }, k === "stored_bytes" ? fmtBytes(r[k]) : r[k])))));
  $("#admin-usage-empty").hidden = rows.length > 0;
}

async function setStatus(name, status) {
  try {
    await api("PATCH", tenantPath(name), { status });
    say(status === "disabled" ? `Disabled ${name}: its keys are refused within seconds.` : `Enabled ${name}.`, "ok");
  } catch (err) {
    say(explain(err));
  }
  await loadAdmin(); // (the open edit form keeps what is typed there: status is not in it)
}

async function openTenant(name) {
  state.adminTenant = name;
  for (const row of document.querySelectorAll("#tenant-table tbody tr")) row.classList.toggle("selected", row.dataset.tenant === name);
  $("#tenant-title").textContent = name;
  $("#key-label").value = "";
  fillTenantForm();
  $("#tenant-detail").hidden = false;
  await loadKeys();
}

function closeTenant() {
  state.adminTenant = null;
  $("#tenant-detail").hidden = true;
  $("#key-table tbody").replaceChildren();
  for (const row of document.querySelectorAll("#tenant-table tbody tr.selected")) row.classList.remove("selected");
}

// The edit form shows the tenant's own limits; an empty box shows the default it falls back to.
function fillTenantForm() {
  const t = state.tenants.find((x) => x.name === state.adminTenant);
  if (!t) return;
  $("#edit-weight").value = String(t.weight);
  for (const input of document.querySelectorAll("#edit-limits input[data-limit]")) {
    const k = input.dataset.limit;
    input.value = k in t.limits ? String(t.limits[k]) : "";
    const fallback = t.effective_limits[k];
    input.placeholder = k in t.limits ? "" : `default: ${fallback === 0 ? "0 (∞)" : fallback ?? "?"}`;
  }
}

async function saveTenant(event) {
  event.preventDefault();
  const name = state.adminTenant;
  let body;
  try {
    body = { weight: readWeight($("#edit-weight")), limits: readLimits($("#edit-limits"), null) };
  } catch (err) {
    return say(explain(err));
  }
  try {
    await api("PATCH", tenantPath(name), body);
    say(`Saved ${name}'s weight and limits.`, "ok");
  } catch (err) {
    return say(explain(err));
  }
  await loadAdmin();
  fillTenantForm();
}

async function loadKeys() {
  const name = state.adminTenant;
  let list;
  try {
    list = await api("GET", `${tenantPath(name)}/keys`);
  } catch (err) {
    return say(explain(err));
  }
  if (name !== state.adminTenant || state.role !== "admin") return; // another tenant opened, or logged out
  $("#key-table tbody").replaceChildren(...list.keys.map((k) =>
    el("tr", { "data-key": k.key_id },
      el("td", { class: "mono" }, k.key_id),
      el("td", { class: "label" }, k.name || "–"),
      el("td", {}, fmtDate(k.created_at)),
      el("td", {}, el("button", { type: "button", class: "danger", onclick: () => revokeKey(name, k) }, "Revoke")))));
  const notes = [];
  if (!list.keys.length) notes.push("No keys issued by the admin API.");
  if (list.config_keys) notes.push(`${list.config_keys} configured key(s) (PREFIXSERVE_API_KEYS), not listed and not revocable here.`);
  $("#key-note").textContent = notes.join(" ");
}

async function issueKey(event) {
  event.preventDefault();
  const name = state.adminTenant;
  let created;
  try {
    created = await api("POST", `${tenantPath(name)}/keys`, { name: $("#key-label").value.trim() });
  } catch (err) {
    return say(explain(err));
  }
  // the key is in this answer only: shown once, in the box, never in the message or anywhere kept
  $("#new-key-tenant").textContent = created.tenant;
  $("#new-key-id").textContent = created.key_id;
  $("#new-key-value").textContent = created.key;
  $("#new-key").hidden = false;
  $("#key-label").value = "";
  say(`Issued key ${created.key_id} to ${created.tenant}: copy it from the box below now.`, "ok");
  await loadKeys();
  await loadAdmin();
  $("#new-key").scrollIntoView({ block: "nearest" });
}

function hideNewKey() {
  $("#new-key").hidden = true;
  for (const id of ["#new-key-value", "#new-key-tenant", "#new-key-id"]) $(id).textContent = "";
}

async function copyNewKey() {
  try {
    await navigator.clipboard.writeText($("#new-key-value").textContent);
    say("Copied the key to the clipboard.", "ok");
  } catch {
    const range = document.createRange(); // no clipboard here: select it for the user to copy
    range.selectNodeContents($("#new-key-value"));
    getSelection().removeAllRanges();
    getSelection().addRange(range);
    say("This page may not use the clipboard: the key is selected, copy it yourself.", "info");
  }
}

async function revokeKey(name, key) {
  const label = key.name ? ` ("${key.name}")` : "";
  if (!confirm(`Revoke key ${key.key_id}${label} of ${name}? Requests with it are refused within seconds.`)) return;
  try {
    await api("DELETE", `${tenantPath(name)}/keys/${encodeURIComponent(key.key_id)}`);
    say(`Revoked key ${key.key_id} of ${name}.`, "ok");
  } catch (err) {
    say(explain(err));
  }
  await loadKeys();
  await loadAdmin();
}

async function createTenant(event) {
  event.preventDefault();
  let body;
  try {
    body = { name: $("#create-name").value.trim(), weight: readWeight($("#create-weight")),
      limits: readLimits($("#create-limits")) };
  } catch (err) {
    return say(explain(err));
  }
  try {
    await api("POST", "/admin/tenants", body);
  } catch (err) {
    return say(explain(err));
  }
  say(`Created tenant ${body.name}: issue it a key below.`, "ok");
  $("#tenant-create").reset();
  if (await loadAdmin()) await openTenant(body.name);
}

// Forget every admin figure shown (on leaving the page or forgetting the key); the new key first.
function clearAdmin() {
  hideNewKey();
  closeTenant();
  state.tenants = [];
  $("#tenant-table tbody").replaceChildren();
  $("#admin-usage-table tbody").replaceChildren();
}

// ---- pages ---------------------------------------------------------------------------------------
const PAGES = {
  prefixes: () => loadPrefixes(),
  jobs: () => { loadPrefixes(); every(1000, loadJobs); },
  playground: () => loadPrefixes(),
  server: () => { every(2000, loadServer); every(15000, loadMyUsage); },
  admin: () => loadAdmin(),
};
const ROLE_PAGES = { tenant: ["prefixes", "jobs", "playground", "server"], admin: ["admin"] };

function route() {
  stopTimers();
  say("");
  hideNewKey(); // an issued key is shown once: not again after leaving or reloading the page
  const pages = ROLE_PAGES[state.role];
  const page = location.hash.slice(1);
  const name = pages.includes(page) ? page : pages[0];
  for (const section of document.querySelectorAll(".page")) section.hidden = section.id !== `page-${name}`;
  for (const link of document.querySelectorAll("nav a[data-page]")) link.classList.toggle("active", link.dataset.page === name);
  if (state.connected) PAGES[name]();
  else say("Enter your API key to start (any text, or none, when the server has auth off).", "info");
}

function init() {
  $("#login").addEventListener("submit", async (e) => {
    e.preventDefault();
    if (await connect($("#api-key").value.trim())) route();
  });
  $("#logout").addEventListener("click", () => {
    state.key = "";
    sessionStorage.removeItem(KEY_STORE);
    showLoggedIn(false);
    stopTimers();
    if (location.hash === "#admin") route(); // the Admin page is gone with the key
    say("Key forgotten.", "info");
  });
  for (const id of ["#filter-name", "#filter-kind", "#filter-source", "#filter-visibility"]) {
    $(id).addEventListener("input", renderPrefixes);
  }
  $("#prefixes-refresh").addEventListener("click", loadPrefixes);
  for (const tab of document.querySelectorAll("#upload-tabs button")) {
    tab.addEventListener("click", () => {
      document.querySelectorAll("#upload-tabs button").forEach((b) => b.classList.toggle("active", b === tab));
      document.querySelectorAll("#upload-form .tab").forEach((t) => { t.hidden = t.dataset.tab !== tab.dataset.tab; });
    });
  }
  $("#upload-form").addEventListener("submit", submitUpload);
  $("#train-form").addEventListener("submit", submitTraining);
  $("#play-form").addEventListener("submit", runPlayground);
  $("#play-add").addEventListener("click", () => addColumn());
  $("#play-stop-all").addEventListener("click", stopStreams);
  limitInputs($("#create-limits"));
  limitInputs($("#edit-limits"));
  $("#admin-refresh").addEventListener("click", async () => { if (await loadAdmin()) fillTenantForm(); });
  $("#tenant-create").addEventListener("submit", createTenant);
  $("#tenant-edit").addEventListener("submit", saveTenant);
  $("#key-form").addEventListener("submit", issueKey);
  $("#tenant-close").addEventListener("click", closeTenant);
  $("#new-key-copy").addEventListener("click", copyNewKey);
  $("#new-key-dismiss").addEventListener("click", hideNewKey);
  addColumn();
  addColumn();
  window.addEventListener("hashchange", route);
  if (sessionStorage.getItem(KEY_STORE) !== null) connect(state.key).then(route);
  else route();
}

document.addEventListener("DOMContentLoaded", init);
