// The page of graceful: plain JS over the public HTTP API (no framework, no build step).
// Everything user-provided (ids, metadata, error texts) goes into the page as text, never as HTML.
"use strict";

const $ = (sel) => document.querySelector(sel);
const state = { models: [], active: null, matrixVersion: null, queryFile: null, job: null, timer: null, curve: null };

// ---- helpers ----------------------------------------------------------------------------------------------

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "text") node.textContent = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children) node.append(c);
  return node;
}

const SVG = "http://www.w3.org/2000/svg"; // the SVG namespace name, not a resource that is fetched
function svg(tag, attrs = {}, text) {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (text !== undefined) node.textContent = text;
  return node;
}

function showError(message) {
  const box = $("#error");
  box.textContent = message;
  box.hidden = !message;
}

// One call to the API; an error answer becomes an Error whose message is the server's detail.
async function api(method, path, body) {
  const headers = {};
  const key = $("#api-key").value;
  if (method !== "GET" && key) headers["X-API-Key"] = key;
  const init = { method, headers };
  if (body instanceof FormData) init.body = body;
  else if (body !== undefined) {
    headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const response = await fetch(path, init);
  const text = await response.text();
  let data = null;
  try { data = text ? JSON.parse(text) : null; } catch (e) { data = null; }
  if (!response.ok) {
    const detail = data && data.detail !== undefined ? data.detail : text.slice(0, 300);
    throw new Error(`${method} ${path}: ${response.status} ${typeof detail === "string" ? detail : JSON.stringify(detail)}`);
  }
  return data;
}

// Runs an API call; its error is shown on the page instead of vanishing into the console. (What a person
// does clears the last error first; the reloads that follow it do not.)
async function attempt(action) {
  try {
    return await action();
  } catch (e) {
    showError(e.message);
    return undefined;
  }
}

const fmt = (x, digits = 3) => (typeof x === "number" ? x.toFixed(digits) : "–");

// ---- search ---------------------------------------------------------------------------------------------

async function search() {
  if (!state.queryFile) return;
  showError("");
  const form = new FormData();
  form.append("image", state.queryFile);
  form.append("k", $("#k").value || "8");
  $("#query-info").textContent = "searching…";
  const answer = await attempt(() => api("POST", "/v1/search", form));
  if (!answer) { $("#query-info").textContent = "the search failed (see above)"; return; }
  const info = $("#query-info");
  info.replaceChildren("query embedded by ", el("strong", { id: "query-version", text: answer.model_version }),
    ` (space ${answer.space}), ${answer.hits.length} hits`);
  $("#hits").replaceChildren(...answer.hits.map((hit) => {
    const label = hit.metadata && hit.metadata.label !== undefined ? `label ${hit.metadata.label}` : "";
    return el("figure", { class: "hit" },
      el("img", { src: `/v1/items/${encodeURIComponent(hit.external_id)}/image`, alt: hit.external_id,
                  width: 84, height: 84 }),
      el("figcaption", {},
        el("span", { class: "id", text: hit.external_id }),
        el("span", { text: `score ${fmt(hit.score)}` }),
        el("span", { class: hit.embedded_by === answer.model_version ? "by" : "by other",
                     text: `embedded by ${hit.embedded_by}` }),
        el("span", { class: "muted", text: label })));
  }));
}

function pickQuery(file) {
  state.queryFile = file || null;
  const preview = $("#query-preview");
  if (preview.src) URL.revokeObjectURL(preview.src);
  preview.hidden = !file;
  if (file) preview.src = URL.createObjectURL(file);
  $("#search-again").disabled = !file;
  search();
}

// ---- models ---------------------------------------------------------------------------------------------

// v1 → v2 → v3: the chain of compatible_with parents ending at this version.
function lineage(model, byVersion) {
  const chain = [model.version];
  let parent = model.compatible_with;
  while (parent && !chain.includes(parent) && chain.length < 20) {
    chain.unshift(parent);
    parent = byVersion[parent] ? byVersion[parent].compatible_with : null;
  }
  return chain.join(" → ") + (model.adapter_of ? ` (adapter of ${model.adapter_of})` : "");
}

async function loadModels() {
  const data = await attempt(() => api("GET", "/v1/models"));
  if (!data) return;
  state.models = data.models;
  state.active = data.active;
  $("#active-version").textContent = data.active || "no model";
  const byVersion = Object.fromEntries(data.models.map((m) => [m.version, m]));
  $("#models-table tbody").replaceChildren(...data.models.map((m) => {
    let stateCell;
    if (!m.valid) stateCell = el("td", { class: "bad", text: `refused: ${m.error}` });
    else if (m.active) stateCell = el("td", {}, el("span", { class: "badge", text: "active" }));
    else if (m.can_activate) stateCell = el("td", { class: "good", text: "can activate" });
    else stateCell = el("td", { class: "bad", text: m.reason || "cannot activate" });
    const actions = el("td", { class: "actions" });
    if (m.valid) {
      actions.append(
        el("button", { type: "button", "data-activate": m.version, disabled: m.active || !m.can_activate,
                       text: "Activate", onclick: () => activate(m.version) }),
        el("button", { type: "button", "data-matrix": m.version, text: "Matrix",
                       onclick: () => loadMatrix(m.version) }),
        el("button", { type: "button", "data-check": m.version, disabled: m.active || !m.can_activate,
                       text: "Check", onclick: () => check(m.version) }));
    }
    return el("tr", { class: m.active ? "active" : null, "data-version": m.version },
      el("td", { text: m.version }), el("td", { text: m.valid ? lineage(m, byVersion) : "" }),
      el("td", { text: m.space || "" }), stateCell, actions);
  }));
  const candidate = $("#candidate");
  const chosen = candidate.value;
  const valid = data.models.filter((m) => m.valid);
  candidate.replaceChildren(...valid.map((m) => el("option", { value: m.version, text: m.version })));
  const fallback = valid.find((m) => !m.active) || valid[0];
  if (valid.some((m) => m.version === chosen)) candidate.value = chosen;
  else if (fallback) candidate.value = fallback.version;
  if (!state.matrixVersion && (data.active || fallback)) loadMatrix(data.active || fallback.version);
}

async function activate(version) {
  showError("");
  const force = $("#force").checked ? "?force=true" : "";
  const r = await attempt(() => api("POST", `/v1/models/${encodeURIComponent(version)}/activate${force}`));
  if (r) {
    $("#models-info").textContent = `activated ${r.active} (previous ${r.previous || "none"}) in ${fmt(r.seconds)} s` +
      (r.forced ? ", forced past a failed check" : "");
    $("#force").checked = false;
  }
  await loadModels();
  if (r && r.active !== state.matrixVersion) loadMatrix(r.active);
}

// The measured compatibility check of a candidate against the gallery, as activation will run it.
async function check(version) {
  showError("");
  const box = $("#check-result");
  box.replaceChildren(el("p", { class: "muted", text: `checking ${version} against the gallery...` }));
  const r = await attempt(() => api("POST", `/v1/models/${encodeURIComponent(version)}/check`));
  if (!r) { box.replaceChildren(); return; }
  const rows = [el("p", { class: r.passed ? "good" : "bad",
    text: `${version}: ${r.passed ? "passes" : "fails"} (${r.method})` +
      (r.criterion ? ` - ${r.criterion}` : "") + (r.reason ? ` - ${r.reason}` : "") })];
  if (r.method === "measured") {
    const u = r.unlabelled;
    rows.push(el("p", { text: `${r.sample.queries} gallery items as queries over ${r.sample.gallery} stored items: ` +
      `overlap@10 with ${r.active}'s results ${fmt(u.overlap_at_10)} (random twin ${fmt(u.baseline.overlap_at_10)}), ` +
      `${r.active}'s top-1 lost ${fmt(u.lost_top1)}` }));
    if (r.labelled) {
      const a = r.labelled.active, c = r.labelled.candidate;
      const head = el("tr", {}, ...["", "top-1", "top-5", "mAP"].map((t) => el("th", { text: t })));
      const line = (name, q) => el("tr", {}, el("td", { text: name }),
        ...["top1", "top5", "mAP"].map((k) => el("td", { text: fmt(q[k]) })));
      rows.push(el("table", {}, el("thead", {}, head),
        el("tbody", {}, line(`${r.active} (active)`, a), line(`${version} (candidate)`, c))));
      rows.push(el("p", { text: `retrieval flips: negative ${fmt(r.labelled.negative_flip_rate)}, ` +
        `positive ${fmt(r.labelled.positive_flip_rate)}` }));
    }
  } else if (r.detail) {
    rows.push(el("p", { class: "muted", text: r.detail }));
  }
  box.replaceChildren(...rows);
}

async function rollback() {
  showError("");
  const r = await attempt(() => api("POST", "/v1/models/rollback"));
  if (r) $("#models-info").textContent = `rolled back to ${r.active} (from ${r.previous})`;
  await loadModels();
}

// ---- compatibility matrix --------------------------------------------------------------------------------

async function loadMatrix(version) {
  state.matrixVersion = version;
  $("#matrix-version").textContent = version;
  const card = await attempt(() => api("GET", `/v1/models/${encodeURIComponent(version)}/card`));
  state.matrix = card && card.metrics && card.metrics.matrix ? card.metrics.matrix : {};
  drawMatrix();
}

function drawMatrix() {
  const metric = $("#matrix-metric").value;
  const cells = state.matrix || {};
  const keys = Object.keys(cells);
  const box = $("#matrix-table");
  if (!keys.length) {
    box.replaceChildren(el("p", { class: "muted", text: "This model's card has no compatibility matrix." }));
    return;
  }
  const versions = [...new Set(keys.flatMap((k) => k.split("/")))];
  const values = keys.map((k) => cells[k][metric]).filter((v) => typeof v === "number");
  const lo = Math.min(...values), hi = Math.max(...values);
  const head = el("tr", {}, el("th", { text: "query \\ gallery" }), ...versions.map((g) => el("th", { text: g })));
  const rows = versions.map((q) => el("tr", {}, el("th", { text: q }), ...versions.map((g) => {
    const cell = cells[`${q}/${g}`];
    if (!cell) return el("td", { class: "empty", text: "–" });
    const td = el("td", { class: "heat", text: fmt(cell[metric]),
                          title: `query ${q}, gallery ${g}: top1 ${fmt(cell.top1)}, top5 ${fmt(cell.top5)}, mAP ${fmt(cell.mAP)}` });
    const t = hi > lo ? (cell[metric] - lo) / (hi - lo) : 1;
    td.style.backgroundColor = `hsl(${Math.round(10 + 110 * t)}, 70%, ${Math.round(88 - 18 * t)}%)`;
    return td;
  })));
  box.replaceChildren(el("table", { class: "heatmap" }, el("thead", {}, head), el("tbody", {}, ...rows)));
}

// ---- backfill: progress and the quality curve ---------------------------------------------------------------

function showJob(job) {
  state.job = job;
  const bar = $("#backfill-progress");
  bar.hidden = false;
  bar.max = Math.max(job.total, 1);
  bar.value = job.done;
  const rate = typeof job.rate === "number" ? `${job.rate.toFixed(1)} items/s` : "idle";
  const eta = typeof job.eta_seconds === "number" ? `, about ${Math.ceil(job.eta_seconds)} s left` : "";
  const skipped = job.skipped ? `, ${job.skipped} cannot be re-embedded` : "";
  $("#backfill-info").textContent =
    `job ${job.id} (${job.candidate}): ${job.status}${job.phase ? " / " + job.phase : ""}, ` +
    `${job.done}/${job.total} (${(100 * job.fraction).toFixed(0)}%), ${rate}${eta}${skipped}` +
    (job.error ? ` — ${job.error}` : "");
  if (state.curve) drawCurve();
}

async function watch(jobId) {
  clearTimeout(state.timer);
  const job = await attempt(() => api("GET", `/v1/backfill/${jobId}`));
  if (!job) return;
  showJob(job);
  if (job.status === "pending" || job.status === "running") state.timer = setTimeout(() => watch(jobId), 1000);
  else loadModels(); // a finished backfill may make the candidate activatable
}

async function startBackfill() {
  const candidate = $("#candidate").value;
  showError("");
  const job = await attempt(() => api("POST", "/v1/backfill", { candidate }));
  if (!job) return;
  showJob(job);
  watch(job.id);
  loadReport(candidate);
}

async function loadReport(candidate) {
  $("#curve-info").textContent = `measuring what backfilling with ${candidate} buys…`;
  const report = await attempt(() => api("GET", `/v1/backfill/report?candidate=${encodeURIComponent(candidate)}`));
  if (!report) { $("#curve-info").textContent = ""; return; }
  const p = report.predicted || {};
  state.curve = { candidate, curve: report.curve || {} };
  $("#curve-info").textContent =
    `${report.items_to_reembed} of ${report.items_total} items to re-embed with ${candidate}: about ` +
    `${fmt(p.wall_seconds, 1)} s, ${p.cpu_hours} CPU-hours, ${p.cost} ${p.currency || ""}. ` +
    (report.needs_backfill ? `Needs a full backfill before serving: ${report.reason}` : "Can serve during the backfill.") +
    ` Curve: ${state.curve.curve.method || "none"}.`;
  drawCurve();
}

// A small hand-written SVG line chart: mAP after each fraction re-embedded, one line per order policy,
// with the watched job's fraction as a vertical line.
function drawCurve() {
  const policies = (state.curve && state.curve.curve.policies) || {};
  const names = Object.keys(policies).filter((n) => policies[n].length);
  const box = $("#curve");
  if (!names.length) {
    box.replaceChildren(el("p", { class: "muted", text: (state.curve && state.curve.curve.detail) || "No curve." }));
    return;
  }
  const W = 420, H = 220, L = 48, R = 22, T = 12, B = 36;
  const ys = names.flatMap((n) => policies[n].map((pt) => pt.quality.mAP)).filter((v) => typeof v === "number");
  let lo = Math.min(...ys), hi = Math.max(...ys);
  if (hi - lo < 1e-6) { lo -= 0.05; hi += 0.05; }
  const x = (f) => L + f * (W - L - R);
  const y = (v) => T + (1 - (v - lo) / (hi - lo)) * (H - T - B);
  const chart = svg("svg", { viewBox: `0 0 ${W} ${H}`, width: W, height: H, role: "img",
                             "aria-label": "mAP after each fraction of the gallery re-embedded" });
  chart.append(svg("line", { x1: L, y1: H - B, x2: W - R, y2: H - B, class: "axis" }),
               svg("line", { x1: L, y1: T, x2: L, y2: H - B, class: "axis" }));
  for (const f of [0, 0.25, 0.5, 0.75, 1]) {
    chart.append(svg("text", { x: x(f), y: H - B + 14, "text-anchor": "middle" }, `${f * 100}%`));
  }
  for (const v of [lo, (lo + hi) / 2, hi]) {
    chart.append(svg("text", { x: L - 4, y: y(v) + 4, "text-anchor": "end" }, v.toFixed(3)));
  }
  chart.append(svg("text", { x: (L + W - R) / 2, y: H - 4, "text-anchor": "middle" }, "fraction re-embedded"));
  names.forEach((name, i) => {
    const pts = policies[name].filter((pt) => typeof pt.quality.mAP === "number");
    chart.append(svg("polyline", { class: `series s${i}`, points: pts.map((pt) => `${x(pt.fraction)},${y(pt.quality.mAP)}`).join(" ") }));
    for (const pt of pts) {
      const dot = svg("circle", { class: `series s${i}`, cx: x(pt.fraction), cy: y(pt.quality.mAP), r: 3 });
      dot.append(svg("title", {}, `${name}: ${(100 * pt.fraction).toFixed(0)}% → mAP ${pt.quality.mAP}`));
      chart.append(dot);
    }
    chart.append(svg("text", { x: L + 8, y: T + 12 + 14 * i, class: `legend s${i}` }, `— ${name}`));
  });
  const job = state.job;
  if (job && job.candidate === state.curve.candidate) {
    chart.append(svg("line", { x1: x(job.fraction), y1: T, x2: x(job.fraction), y2: H - B, class: "now" }));
  }
  box.replaceChildren(el("p", { class: "muted", text: state.curve.curve.detail || "" }), chart);
}

// ---- start ----------------------------------------------------------------------------------------------

document.addEventListener("DOMContentLoaded", async () => {
  $("#query-file").addEventListener("change", (e) => pickQuery(e.target.files[0]));
  $("#search-again").addEventListener("click", search);
  $("#rollback").addEventListener("click", rollback);
  $("#refresh").addEventListener("click", loadModels);
  $("#matrix-metric").addEventListener("change", drawMatrix);
  $("#report").addEventListener("click", () => { showError(""); loadReport($("#candidate").value); });
  $("#start-backfill").addEventListener("click", startBackfill);
  await loadModels();
  const jobs = await attempt(() => api("GET", "/v1/backfill"));
  const live = jobs && jobs.jobs.filter((j) => j.status === "pending" || j.status === "running").pop();
  if (live) watch(live.id);
});
