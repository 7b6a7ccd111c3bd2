// rankdial playground: the small canvas charts the panels draw (line, bar, axes); no library, nothing fetched.
"use strict";

// ------------------------------------------------------------------------------------------ charts

function setupCanvas(canvas) {
  const ratio = window.devicePixelRatio || 1;
  const w = canvas.clientWidth || 300, h = canvas.clientHeight || 200;
  canvas.width = Math.round(w * ratio);
  canvas.height = Math.round(h * ratio);
  const ctx = canvas.getContext("2d");
  ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
  ctx.clearRect(0, 0, w, h);
  ctx.font = "12px system-ui, sans-serif";
  return { ctx, w, h };
}

function niceRange(lo, hi) {
  if (!isFinite(lo) || !isFinite(hi)) return [0, 1];
  if (lo === hi) return [lo - 1, hi + 1];
  const pad = (hi - lo) * 0.05;
  return [lo >= 0 ? Math.max(0, lo - pad) : lo - pad, hi + pad];  // losses and bytes never dip below zero
}

// xticks: the x values to label (default: five evenly spaced); the labels drawn are kept in the canvas's
// data-xticks and data-yticks (space-separated), so tests can read what a chart says.
function axes(ctx, box, xr, yr, xlabel, ylabel, ylog, xticks) {
  ctx.strokeStyle = "#888"; ctx.fillStyle = "#444"; ctx.lineWidth = 1;
  ctx.beginPath(); ctx.moveTo(box.l, box.t); ctx.lineTo(box.l, box.b); ctx.lineTo(box.r, box.b); ctx.stroke();
  ctx.textAlign = "right"; ctx.textBaseline = "middle";
  const ylabels = [], xlabels = [];
  for (let i = 0; i <= 4; i++) {
    const v = yr[0] + (yr[1] - yr[0]) * i / 4, y = box.b - (box.b - box.t) * i / 4;
    ylabels.push(ylog ? Math.pow(10, v).toPrecision(2) : Number(v.toPrecision(3)).toString());
    ctx.fillText(ylabels[i], box.l - 4, y);
  }
  ctx.textAlign = "center"; ctx.textBaseline = "top";
  (xticks || [0, 1, 2, 3, 4].map((i) => xr[0] + (xr[1] - xr[0]) * i / 4)).forEach((v) => {
    xlabels.push(Number(v.toPrecision(3)).toString());
    ctx.fillText(xlabels[xlabels.length - 1], box.l + (box.r - box.l) * (v - xr[0]) / (xr[1] - xr[0]), box.b + 4);
  });
  ctx.canvas.dataset.xticks = xlabels.join(" ");
  ctx.canvas.dataset.yticks = ylabels.join(" ");
  ctx.fillText(xlabel, (box.l + box.r) / 2, box.b + 18);
  ctx.save(); ctx.translate(12, (box.t + box.b) / 2); ctx.rotate(-Math.PI / 2); ctx.fillText(ylabel, 0, -6); ctx.restore();
}

// Integer ticks from lo to hi (indices, counts): at most `most` of them, evenly stepped, starting at lo.
function integerTicks(lo, hi, most = 6) {
  const step = Math.max(1, Math.ceil((hi - lo) / (most - 1))), ticks = [];
  for (let v = lo; v <= hi; v += step) ticks.push(v);
  return ticks;
}

// series: [{label, color, dashed, points: [[x, y], ...]}]
function lineChart(canvas, series, xlabel, ylabel) {
  const { ctx, w, h } = setupCanvas(canvas);
  const box = { l: 52, r: w - 10, t: 10, b: h - 38 };
  const pts = series.flatMap((s) => s.points);
  if (!pts.length) { ctx.fillStyle = "#666"; ctx.fillText("no data yet", box.l + 10, box.t + 20); return; }
  const xr = [0, Math.max(1, ...pts.map((p) => p[0]))];
  const yr = niceRange(Math.min(...pts.map((p) => p[1])), Math.max(...pts.map((p) => p[1])));
  axes(ctx, box, xr, yr, xlabel, ylabel);
  const X = (x) => box.l + (box.r - box.l) * (x - xr[0]) / (xr[1] - xr[0]);
  const Y = (y) => box.b - (box.b - box.t) * (y - yr[0]) / (yr[1] - yr[0]);
  series.forEach((s, i) => {
    ctx.strokeStyle = s.color; ctx.fillStyle = s.color; ctx.lineWidth = 2; ctx.setLineDash(s.dashed ? [5, 4] : []);
    ctx.beginPath();
    s.points.forEach((p, j) => (j ? ctx.lineTo(X(p[0]), Y(p[1])) : ctx.moveTo(X(p[0]), Y(p[1]))));
    ctx.stroke();
    if (s.dashed) s.points.forEach((p) => { ctx.beginPath(); ctx.arc(X(p[0]), Y(p[1]), 2.5, 0, 7); ctx.fill(); });
    ctx.setLineDash([]);
  });
  ctx.fillStyle = "rgba(255,255,255,0.85)";  // the legend on a light box, over the curves
  ctx.fillRect(box.r - 134, box.t - 2, 134, 14 * series.length + 4);
  series.forEach((s, i) => {
    ctx.fillStyle = s.color;
    ctx.textAlign = "left"; ctx.textBaseline = "top";
    ctx.fillRect(box.r - 130, box.t + 4 + 14 * i, 10, 3);
    ctx.fillText(s.label, box.r - 115, box.t + 14 * i - 1);
  });
}

// bars: [{label, parts: [{name, value, color}]}], stacked horizontally
function barChart(canvas, bars, unit, markers) {
  const { ctx, w, h } = setupCanvas(canvas);
  const box = { l: 90, r: w - 12, t: 8, b: h - 30 };
  const max = Math.max(1e-12, ...bars.map((b) => b.parts.reduce((a, p) => a + p.value, 0)), ...(markers || []).map((m) => m.value));
  const X = (v) => box.l + (box.r - box.l) * v / max;
  const bh = Math.min(28, (box.b - box.t) / bars.length - 8);
  bars.forEach((bar, i) => {
    const y = box.t + i * (bh + 8);
    let x0 = 0;
    bar.parts.forEach((p) => { ctx.fillStyle = p.color; ctx.fillRect(X(x0), y, Math.max(0.5, X(x0 + p.value) - X(x0)), bh); x0 += p.value; });
    ctx.fillStyle = "#222"; ctx.textAlign = "right"; ctx.textBaseline = "middle";
    ctx.fillText(bar.label, box.l - 6, y + bh / 2);
    ctx.textAlign = "left";
    const txt = bar.text ?? unit(x0);  // a bar may say what it is instead ("diverged")
    ctx.fillText(txt, Math.min(X(x0) + 4, box.r - ctx.measureText(txt).width), y + bh / 2);
  });
  (markers || []).forEach((m) => {
    ctx.strokeStyle = "#999"; ctx.setLineDash([3, 3]); ctx.beginPath(); ctx.moveTo(X(m.value), box.t); ctx.lineTo(X(m.value), box.b); ctx.stroke();
    ctx.setLineDash([]); ctx.fillStyle = "#666"; ctx.textAlign = "center"; ctx.textBaseline = "top"; ctx.fillText(m.label, X(m.value), box.b + 4);
  });
}
