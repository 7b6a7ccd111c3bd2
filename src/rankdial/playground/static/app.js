// rankdial playground: every number comes from the server's JSON routes; this file only draws them.
"use strict";

const $ = (id) => document.getElementById(id);
const fmt = (n) => Number(n).toLocaleString("en-US");
const pct = (x) => (100 * x).toFixed(2) + "%";
const COLORS = ["#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2"];

function gb(bytes) {
  if (bytes >= 1e9) return (bytes / 1e9).toFixed(2) + " GB";
  if (bytes >= 1e6) return (bytes / 1e6).toFixed(2) + " MB";
  return (bytes / 1e3).toFixed(1) + " kB";
}

async function api(path, options) {
  let res;
  try {
    res = await fetch(path, options);
  } catch (e) {
    throw new Error("the playground server cannot be reached");
  }
  const body = await res.json().catch(() => ({}));
  if (!res.ok) throw new Error(body.error || "request failed (" + res.status + ")");
  return body;
}

function showError(panel, err) {
  const el = $(panel + "-error");
  el.textContent = err ? String(err.message || err) : "";
  el.hidden = !err;
}

function debounce(fn, ms) {
  let t = null;
  return (...args) => { clearTimeout(t); t = setTimeout(() => fn(...args), ms); };
}

// -------------------------------------------------------------------------- Why LoRA is cheap

const loraFields = ["d_in", "d_out", "r", "alpha"];

async function updateLora() {
  const q = new URLSearchParams(loraFields.map((f) => [f, $("lora-" + f).value.trim()]));
  try {
    const d = await api("/api/lora?" + q);
    showError("lora", null);
    $("lora-delta_w").textContent = fmt(d.delta_w) + "  (" + d.shapes.delta_w.join(" × ") + ")";
    $("lora-a").textContent = fmt(d.a);
    $("lora-b").textContent = fmt(d.b);
    $("lora-trainable").textContent = fmt(d.trainable);
    $("lora-share").textContent = pct(d.share);
    $("lora-scale").textContent = Number(d.scale.toPrecision(4)).toString();
    barChart($("lora-chart"), [
      { label: "ΔW", parts: [{ value: d.delta_w, color: "#94a3b8" }] },
      { label: "A + B", parts: [{ value: d.a, color: COLORS[0] }, { value: d.b, color: COLORS[1] }] },
    ], (v) => fmt(v) + " params");
  } catch (e) { showError("lora", e); }
}

function linkSliders(prefix, fields, onChange) {
  const later = debounce(onChange, 120);
  fields.forEach((f) => {
    const box = $(prefix + "-" + f), range = $(prefix + "-" + f + "-range");
    if (range) range.addEventListener("input", () => { box.value = range.value; later(); });
    box.addEventListener("input", () => { if (range && box.value.trim() !== "" && !isNaN(Number(box.value))) range.value = box.value; later(); });
  });
}

// -------------------------------------------------------------------------- Will it fit?

const TERM_COLORS = { "weights": "#64748b", "quant constants": "#a3a3a3", "adapters": "#2563eb", "gradients": "#f59e0b",
  "optimizer state": "#dc2626", "activations": "#16a34a", "logits + loss": "#0891b2", "workspace": "#9333ea" };

async function updatePlan() {
  const q = new URLSearchParams(["model", "rank", "batch_size", "seq_len"].map((f) => [f, $("plan-" + f).value.trim()]));
  try {
    const d = await api("/api/plan?" + q);
    showError("plan", null);
    const methods = Object.keys(d.plans);
    // The bars show the terms; the planned peak (total) is each bar's label, from the planner itself.
    barChart($("plan-chart"), methods.map((m) => ({ label: m, parts: Object.entries(d.plans[m].terms)
      .filter(([, v]) => v > 0).map(([k, v]) => ({ name: k, value: v, color: TERM_COLORS[k] || "#999" })) })),
      (v) => gb(v) + " (sum of terms)",
      d.accelerators_gb.filter((g) => g * 1e9 <= 1.05 * Math.max(...methods.map((m) => d.plans[m].total_bytes)))
        .map((g) => ({ value: g * 1e9, label: g + " GB" })));
    $("plan-rows").innerHTML = "";
    methods.forEach((m) => {
      const p = d.plans[m], tr = document.createElement("tr");
      // data-label: the column's name, shown beside each value where the table stacks (phone widths, style.css)
      tr.innerHTML = `<th scope="row">${m}</th><td id="plan-total-${m}" data-label="planned peak" data-bytes="${p.total_bytes}">${gb(p.total_bytes)}</td>` +
        `<td data-label="weights">${gb(p.weights_bytes)}</td><td data-label="trainable" data-wide>${fmt(p.trainable_params)} (${pct(p.trainable_params / p.total_params)})</td>` +
        `<td data-label="fits on" data-wide>${p.fits.length ? p.fits.map((g) => g + " GB").join(", ") : "none of " + d.accelerators_gb.join("/") + " GB"}</td>`;
      $("plan-rows").appendChild(tr);
    });
    const legend = Object.entries(TERM_COLORS).map(([k, c]) => `<span><i style="background:${c}"></i>${k}</span>`).join(" ");
    $("plan-chart").setAttribute("aria-label", "planned memory per term: " + methods.map((m) => m + " " + gb(d.plans[m].total_bytes)).join(", "));
    let lg = $("plan-legend");
    if (!lg) { lg = document.createElement("p"); lg.id = "plan-legend"; lg.className = "legend"; $("plan-chart").after(lg); }
    lg.innerHTML = legend;
  } catch (e) { showError("plan", e); }
}

// -------------------------------------------------------------------------- The rank dial, live

const train = { job: null, source: null, runs: {}, order: [] };

function trainSeries() {
  const series = [];
  train.order.forEach((r, i) => {
    const run = train.runs[r], c = COLORS[i % COLORS.length];
    series.push({ label: "r=" + r + " train", color: c, points: run.train });
    if (run.eval.length) series.push({ label: "r=" + r + " eval", color: c, dashed: true, points: run.eval });
  });
  return series;
}

function drawTrain() {
  const canvas = $("train-chart");
  lineChart(canvas, trainSeries(), "step", "loss (nats/token)");
  canvas.dataset.points = String(train.order.reduce((a, r) => a + train.runs[r].train.length + train.runs[r].eval.length, 0));
}

function trainRow(r) {
  const run = train.runs[r];
  let tr = $("train-row-" + r);
  if (!tr) { tr = document.createElement("tr"); tr.id = "train-row-" + r; $("train-rows").appendChild(tr); }
  const last = (xs) => (xs.length ? xs[xs.length - 1][1].toFixed(4) : "–");
  tr.innerHTML = `<th scope="row">${r}</th><td>${run.trainable != null ? fmt(run.trainable) : "–"}</td>` +
    `<td>${last(run.train)}</td><td>${last(run.eval)}</td><td>${run.seconds != null ? run.seconds : "…"}</td>`;
}

function onTrainEvent(ev) {
  if (ev.type === "run") {
    train.runs[ev.rank] = { train: [], eval: [], trainable: ev.trainable, seconds: null };
    train.order.push(ev.rank);
    $("train-status").textContent = "training r=" + ev.rank + " …";
  } else if (ev.type === "step") {
    if (ev.loss != null) train.runs[ev.rank].train.push([ev.step, ev.loss]);  // null: the loss diverged (NaN/inf)
    $("train-status").textContent = "r=" + ev.rank + ": step " + ev.step + ", loss " +
      (ev.loss != null ? ev.loss.toFixed(4) : "not finite (the run diverged: lower lr or alpha)");
  } else if (ev.type === "eval") {
    if (ev.eval_loss != null) train.runs[ev.rank].eval.push([ev.step, ev.eval_loss]);
  } else if (ev.type === "task") {
    train.task = ev;
    $("train-status").textContent = `synthetic task: true rank ${ev.true_rank}, d = ${ev.d}, ${ev.n_train} training pairs, noise floor ${ev.noise_floor.toFixed(3)}`;
  } else if (ev.type === "run_done") {
    train.runs[ev.rank].seconds = ev.seconds != null ? ev.seconds : "–";
    if (ev.spectrum) addSpectrum(ev.rank, ev.spectrum);
  } else if (["done", "cancelled", "error"].includes(ev.type)) {
    endTrain(ev);
    return;
  }
  if (ev.rank != null) trainRow(ev.rank);
  drawTrain();
}

const TASK_DEFAULTS = {
  text: { ranks: "4", alpha: "16", steps: "40", examples: "128", lr: "0.001" },
  synthetic: { ranks: "1,4,16,64", alpha: "", steps: "300", examples: "96", lr: "0.02" },
};

function onTaskChange() {
  const d = TASK_DEFAULTS[$("train-task").value];
  Object.entries(d).forEach(([k, v]) => ($("train-" + k).value = v));
  $("train-alpha").placeholder = $("train-task").value === "synthetic" ? "= r" : "";
}

function endTrain(ev) {
  if (train.source) train.source.close();
  train.source = null;
  $("train-start").disabled = false;
  $("train-cancel").disabled = true;
  $("train-status").textContent = ev.type === "done" ? "finished" : ev.type === "cancelled" ? "cancelled: " + ev.message : "failed";
  $("train-status").dataset.state = ev.type;
  if (ev.type === "error") showError("train", ev.message);
  refreshAdapters();
}

async function startTrain(event) {
  event.preventDefault();
  showError("train", null);
  const f = (n) => $("train-" + n).value.trim();
  const ranks = f("ranks").split(",").map((s) => s.trim()).filter((s) => s !== "");
  const num = (s) => (s !== "" && !isNaN(Number(s)) ? Number(s) : s);  // non-numbers go as they are: the server names them
  const body = { task: f("task"), ranks: ranks.map(num), alpha: f("alpha") === "" ? null : num(f("alpha")), steps: num(f("steps")),
                 examples: num(f("examples")), lr: num(f("lr")) };
  try {
    const d = await api("/api/jobs", { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) });
    train.job = d.id; train.runs = {}; train.order = [];
    $("train-rows").innerHTML = "";
    $("train-status").dataset.state = "running";
    $("train-status").textContent = "starting …";
    $("train-start").disabled = true;
    $("train-cancel").disabled = false;
    drawTrain();
    train.source = new EventSource("/api/jobs/" + d.id + "/events");
    train.source.onmessage = (m) => onTrainEvent(JSON.parse(m.data));
    train.source.onerror = () => { if (train.source && train.source.readyState === 2) endTrain({ type: "error", message: "lost the connection to the server" }); };
  } catch (e) { showError("train", e); }
}

async function cancelTrain() {
  if (!train.job) return;
  try { await api("/api/jobs/" + train.job, { method: "DELETE" }); } catch (e) { showError("train", e); }
}

// -------------------------------------------------------------------------- What was learned

const spectra = {};

function addSpectrum(rank, rows) {
  spectra[rank] = rows;
  const sel = $("spectrum-run");
  if (![...sel.options].some((o) => o.value === String(rank))) sel.add(new Option("r=" + rank, String(rank)));
  sel.value = String(rank);
  fillModules();
}

function fillModules() {
  const rows = spectra[$("spectrum-run").value] || [], sel = $("spectrum-module"), keep = sel.value;
  sel.innerHTML = "";
  rows.forEach((row, i) => sel.add(new Option(row.module.replace(/^base_model\.model\./, ""), String(i))));
  if (keep && keep < rows.length) sel.value = keep;
  drawSpectrum();
}

function drawSpectrum() {
  const rows = spectra[$("spectrum-run").value];
  if (!rows || !rows.length) return;
  const row = rows[Number($("spectrum-module").value) || 0];
  const { ctx, w, h } = setupCanvas($("spectrum-chart"));
  const box = { l: 52, r: w - 10, t: 10, b: h - 38 }, sv = row.singular_values, max = Math.max(1e-12, ...sv);
  // index k (1-based) labels the middle of its bar: the axis runs from 0.5 to n + 0.5
  axes(ctx, box, [0.5, sv.length + 0.5], [0, max], "singular value index", "σ", false, integerTicks(1, sv.length));
  const bw = (box.r - box.l) / sv.length;
  sv.forEach((s, i) => { ctx.fillStyle = i < row.rank_90 ? COLORS[0] : "#93c5fd"; ctx.fillRect(box.l + i * bw + 1, box.b - (box.b - box.t) * s / max, Math.max(1, bw - 2), (box.b - box.t) * s / max); });
  const all = rows.map((x) => x.rank_90).sort((a, b) => a - b);
  $("spectrum-status").textContent = `r=${row.rank}: effective rank ${row.rank_90} at 90% of the energy, ${row.rank_99} at 99%` +
    ` (median over ${rows.length} modules at 90%: ${all[Math.floor(all.length / 2)]})`;
}

// -------------------------------------------------------------------------- NF4

async function updateNf4() {
  const layer = $("nf4-layer").value;
  try {
    const d = await api("/api/nf4" + (layer ? "?layer=" + encodeURIComponent(layer) : ""));
    showError("nf4", null);
    const sel = $("nf4-layer");
    if (!sel.options.length) { d.layers.forEach((n) => sel.add(new Option(n, n))); sel.value = d.layer; }
    $("nf4-shape").textContent = d.shape.join(" × ") + " (" + fmt(d.numel) + " weights)";
    $("nf4-rmse").textContent = d.rmse.toExponential(3) + " (weights' std " + d.weight_std.toExponential(3) + ")";
    $("nf4-rel").textContent = pct(d.relative_error);
    $("nf4-bits_dq").textContent = d.bits_double_quant.toFixed(3);
    $("nf4-bits_plain").textContent = d.bits_plain.toFixed(3);
    const { ctx, w, h } = setupCanvas($("nf4-chart"));
    const box = { l: 52, r: w - 10, t: 10, b: h - 38 }, c = d.histogram.counts, max = Math.max(...c);
    axes(ctx, box, [d.histogram.lo, d.histogram.hi], [0, max], "weight / block absmax", "count");
    const X = (v) => box.l + (box.r - box.l) * (v - d.histogram.lo) / (d.histogram.hi - d.histogram.lo);
    const bw = (box.r - box.l) / c.length;
    c.forEach((n, i) => { ctx.fillStyle = "#94a3b8"; ctx.fillRect(box.l + i * bw, box.b - (box.b - box.t) * n / max, Math.max(1, bw - 1), (box.b - box.t) * n / max); });
    ctx.strokeStyle = COLORS[1]; ctx.lineWidth = 1.5;
    d.levels.forEach((v) => { ctx.beginPath(); ctx.moveTo(X(v), box.t); ctx.lineTo(X(v), box.b); ctx.stroke(); });
  } catch (e) { showError("nf4", e); }
}

// -------------------------------------------------------------------------- Merge

async function runMerge() {
  $("merge-run").disabled = true;
  $("merge-status").textContent = "measuring on the default model …";
  showError("merge", null);
  try {
    const d = await api("/api/merge", { method: "POST" });
    $("merge-status").textContent = `median of ${d.repeats} forwards of ${d.seq_len} tokens, adapter r=${d.rank}: ` +
      `merged / base = ${d.merged_over_base.toFixed(2)}, unmerged / base = ${d.unmerged_over_base.toFixed(2)}; ` +
      `max |merged − unmerged| = ${d.max_abs_diff_merged_vs_unmerged.toExponential(2)} ` +
      `(the adapter moves the base's logits by up to ${d.max_abs_diff_adapter_vs_base.toFixed(2)}); ` +
      (d.merged_has_lora_layers ? "the merged model still has LoRA layers" : "the merged model is a plain model again");
    $("merge-status").dataset.state = "done";
    barChart($("merge-chart"), [
      { label: "base", parts: [{ value: d.base_ms, color: "#64748b" }] },
      { label: "unmerged", parts: [{ value: d.unmerged_ms, color: COLORS[1] }] },
      { label: "merged", parts: [{ value: d.merged_ms, color: COLORS[2] }] },
    ], (v) => v.toFixed(1) + " ms");
  } catch (e) { showError("merge", e); $("merge-status").textContent = ""; }
  $("merge-run").disabled = false;
}

// -------------------------------------------------------------------------- Steer vs re-educate

async function runSteering() {
  showError("steer", null);
  try {
    const d = await api("/api/jobs", { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ task: "steering" }) });
    $("steer-run").disabled = true;
    $("steer-status").textContent = "training LoRA at several ranks and in full, on both tasks …";
    $("steer-status").dataset.state = "running";
    const source = new EventSource("/api/jobs/" + d.id + "/events");
    source.onmessage = (m) => {
      const ev = JSON.parse(m.data);
      if (ev.type === "log") $("steer-status").textContent = ev.line;
      else if (ev.type === "steering") { drawSteering(ev.figures); $("steer-status").textContent = "Measured now (quick settings). " + $("steer-status").textContent; }
      else if (["done", "cancelled", "error"].includes(ev.type)) {
        source.close();
        $("steer-run").disabled = false;
        $("steer-status").dataset.state = ev.type;
        if (ev.type !== "done") { showError("steer", ev.message); $("steer-status").textContent = ""; }
      }
    };
  } catch (e) { showError("steer", e); }
}

async function showCommittedSteering() {
  try {
    const d = await api("/api/steering/report");
    if (!d.figures) { $("steer-status").textContent = "No report in this checkout: run the quick version."; return; }
    drawSteering(d.figures);
    $("steer-status").textContent = "The committed report (" + d.source + ", written by rankdial claims). " + $("steer-status").textContent;
  } catch (e) { showError("steer", e); }
}

function drawSteering(f) {
  const bars = [];
  Object.entries(f.tasks).forEach(([task, runs]) => runs.forEach((run) => {
    const label = task + " " + (run.rank == null ? "full" : "r=" + run.rank);
    const color = run.rank == null ? "#64748b" : COLORS[task === Object.keys(f.tasks)[0] ? 0 : 1];
    // a diverged run's figures arrive as null (NaN/Inf are not JSON): an empty bar that says so
    bars.push(run.eval_loss == null ? { label, parts: [], text: "diverged" } : { label, parts: [{ value: run.eval_loss, color }] });
  }));
  $("steer-chart").style.height = Math.max(150, 36 * bars.length + 40) + "px";
  barChart($("steer-chart"), bars, (v) => "eval loss " + v.toFixed(3));
  const gaps = Object.entries(f.tasks).map(([task, runs]) => task + ": LoRA/full eval loss " +
    runs.filter((r) => r.rank != null).map((r) => "r=" + r.rank + " " +
      (r.loss_over_full == null ? "diverged" : r.loss_over_full.toFixed(2) + "×")).join(", "));
  $("steer-status").textContent = `${f.steps} steps each. ` + gaps.join("; ");
}

// -------------------------------------------------------------------------- One base, many adapters

let adapterBytes = null;

async function refreshAdapters() {
  try {
    const d = await api("/api/adapters");
    adapterBytes = d.bytes;
    $("many-run").dataset.adapters = String(d.adapters.length);
    if (!$("many-answers").children.length) {
      $("many-answers").innerHTML = `<p class="status">${d.adapters.length ? d.adapters.length + " adapters from your runs are ready: " + d.adapters.join(", ")
        : "The base alone for now: each finished text run above adds its adapter here."}</p>`;
    }
    drawMany();
  } catch (e) { showError("many", e); }
}

function drawMany() {
  if (!adapterBytes) return;
  const rows = adapterBytes.rows;
  lineChart($("many-chart"), [
    { label: "N full copies", color: COLORS[1], dashed: true, points: rows.map((r) => [r.n, r.full_copies / 1e6]) },
    { label: "base + N adapters", color: COLORS[0], dashed: true, points: rows.map((r) => [r.n, r.base_plus_adapters / 1e6]) },
  ], "N fine-tunes (adapter r=" + adapterBytes.rank + ")", "MB on disk");
}

async function runAnswers(event) {
  event.preventDefault();
  showError("many", null);
  $("many-run").disabled = true;
  try {
    const d = await api("/api/answers", { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ prompt: $("many-prompt").value }) });
    const box = $("many-answers");
    box.innerHTML = "";
    d.answers.forEach((a) => {
      const div = document.createElement("div"), b = document.createElement("b");
      b.textContent = a.adapter ? "adapter " + a.adapter : "base (" + a.model + ")";
      div.append(b, document.createTextNode(a.text));
      box.appendChild(div);
    });
  } catch (e) { showError("many", e); }
  $("many-run").disabled = false;
}

// -------------------------------------------------------------------------- start

function init() {
  linkSliders("lora", loraFields, updateLora);
  ["model", "rank", "batch_size", "seq_len"].forEach((f) => {
    const el = $("plan-" + f);
    el.addEventListener(el.tagName === "SELECT" ? "change" : "input", debounce(updatePlan, 150));
  });
  $("train-form").addEventListener("submit", startTrain);
  $("train-task").addEventListener("change", onTaskChange);
  $("merge-run").addEventListener("click", runMerge);
  $("steer-run").addEventListener("click", runSteering);
  $("many-form").addEventListener("submit", runAnswers);
  $("train-cancel").addEventListener("click", cancelTrain);
  $("spectrum-run").addEventListener("change", fillModules);
  $("spectrum-module").addEventListener("change", drawSpectrum);
  $("nf4-layer").addEventListener("change", updateNf4);
  document.querySelectorAll(".error").forEach((el) => (el.hidden = true));
  api("/api/limits").then((l) => {
    $("train-limits").textContent = `Limits: rank ≤ ${l.max_rank}, steps ≤ ${l.max_steps}, examples ≤ ${l.max_examples}, ` +
      `${l.max_ranks} ranks per sweep, one job per visitor.`;
  }).catch((e) => showError("train", e));
  updateLora(); updatePlan(); updateNf4(); drawTrain(); refreshAdapters(); showCommittedSteering();
  window.addEventListener("resize", debounce(() => { updateLora(); updatePlan(); updateNf4(); drawTrain(); drawSpectrum(); drawMany(); }, 200));
}

document.addEventListener("DOMContentLoaded", init);
