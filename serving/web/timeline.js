// The training timeline: the model as it was at its training snapshots (GET /v1/snapshots and
// /v1/snapshots/{step}, recorded by the pretrain or instruct stage). The loss curves with the snapshot steps;
// two step sliders put the same text side by side at two steps: each token's probability (hover
// for the top-k candidates) and the attention of a chosen layer and head, with tokens on both
// axes. A head can be pinned, to keep it in view while another layer is chosen.
// Uses page.js's helpers ($, errorMessage, fillSelect, probabilityColour, showTooltip, NEWLINE) and
// heatmap.js's readableHeatmap. One function scope: nothing here becomes a global.
(() => {
"use strict";

const timeline = { steps: [], records: new Map(), pinned: [], curves: null };
const SIDES = ["a", "b"];

async function loadTimeline() {
  $("timeline").hidden = false;
  const response = await fetch("/v1/snapshots");
  const body = await response.json().catch(() => ({}));
  if (!response.ok) {  // a model without snapshots: say why, and which model would have them
    $("tl-note").textContent = errorMessage(body) || `/v1/snapshots: HTTP ${response.status}`;
    $("tl-view").hidden = true;
    return;
  }
  timeline.steps = body.steps;
  timeline.curves = body;
  $("tl-probe").replaceChildren(...body.probes.map((name, i) => new Option(name, i)));
  const first = await snapshot(body.steps[0]);
  const attention = first.probes[0].attention;
  fillSelect($("tl-layer"), attention.length, "layer");
  fillSelect($("tl-head"), attention[0].heads.length, "head");
  for (const side of SIDES) $(`tl-step-${side}`).max = body.steps.length - 1;
  $("tl-step-a").value = 0;
  $("tl-step-b").value = body.steps.length - 1;
  $("tl-note").textContent = `${body.steps.length} snapshots, steps ${body.steps.join(", ")}.`;
  drawCurves();
  await renderAll();
}

// A snapshot's record, fetched once.
async function snapshot(step) {
  if (!timeline.records.has(step)) {
    const response = await fetch(`/v1/snapshots/${step}`);
    const body = await response.json();
    if (!response.ok) throw new Error(errorMessage(body) || `/v1/snapshots/${step}: HTTP ${response.status}`);
    timeline.records.set(step, body);
  }
  return timeline.records.get(step);
}

function stepOf(side) {
  return timeline.steps[Number($(`tl-step-${side}`).value)];
}

function choice() {
  return { probe: Number($("tl-probe").value), layer: Number($("tl-layer").value), head: Number($("tl-head").value) };
}

async function renderAll() {
  await Promise.all([...SIDES.map(renderSide), renderPinned()]);
}

// One side: the step's loss, the tokens coloured by probability, the chosen head's heatmap.
async function renderSide(side) {
  const step = stepOf(side);
  $(`tl-step-${side}-value`).textContent = `step ${step}`;
  moveMarker(side, step);
  const record = await snapshot(step);
  if (stepOf(side) !== step) return;  // the slider moved on while this one loaded
  const { probe, layer, head } = choice();
  const text = record.probes[probe];
  const panel = $(`tl-${side}`);
  panel.dataset.step = step;
  panel.querySelector(".tl-loss").textContent =
    record.val_loss === null ? "untrained (no update yet)" : `validation loss ${record.val_loss.toFixed(3)}`;
  panel.querySelector(".tl-tokens").replaceChildren(...tokenSpans(text.tokens));
  const weights = text.attention[layer].heads[head].weights;
  const map = readableHeatmap(weights, text.tokens.map((t) => t.text), `layer ${layer}, head ${head} at step ${step}`);
  Object.assign(map.dataset, { step, layer, head });
  panel.querySelector(".tl-map").replaceChildren(map);
}

function tokenSpans(tokens) {
  return tokens.map((token, i) => {
    const span = document.createElement("span");
    span.className = "token";
    span.textContent = token.text.replace(/\n/g, NEWLINE + "\n");
    span.style.background = probabilityColour(token.prob);
    span.dataset.prob = token.prob === null ? "" : token.prob.toFixed(4);
    span.addEventListener("mouseenter", (event) => showTooltip(i, event, tokens, $("tl-tooltip")));
    span.addEventListener("mouseleave", () => { $("tl-tooltip").hidden = true; });
    return span;
  });
}

// --- pinned heads: kept in view at both steps while another layer or head is chosen -----------------

function pin() {
  const { layer, head } = choice();
  if (!timeline.pinned.some((p) => p.layer === layer && p.head === head)) timeline.pinned.push({ layer, head });
  return renderPinned();
}

async function renderPinned() {
  const steps = SIDES.map(stepOf);
  const records = await Promise.all(steps.map(snapshot));
  const { probe } = choice();
  const rows = timeline.pinned.map(({ layer, head }) => {
    const row = document.createElement("div");
    row.className = "tl-pin";
    Object.assign(row.dataset, { layer, head });
    const title = document.createElement("div");
    title.className = "tl-pin-title";
    const unpin = document.createElement("button");
    unpin.textContent = "unpin";
    unpin.addEventListener("click", () => {
      timeline.pinned = timeline.pinned.filter((p) => p.layer !== layer || p.head !== head);
      renderPinned();
    });
    title.append(`layer ${layer}, head ${head}`, unpin);
    const maps = records.map((record, i) => {
      const text = record.probes[probe];
      const map = readableHeatmap(text.attention[layer].heads[head].weights, text.tokens.map((t) => t.text),
                                  `step ${steps[i]}`);
      Object.assign(map.dataset, { step: steps[i], layer, head });
      return map;
    });
    row.append(title, ...maps);
    return row;
  });
  $("tl-pinned").replaceChildren(...rows);
}

// --- the loss curves ----------------------------------------------------------------------------------

const SVG = "http://www.w3.org/2000/svg";
const CHART = { width: 720, height: 190, left: 44, right: 12, top: 10, bottom: 26 };

function svg(tag, attributes) {
  const element = document.createElementNS(SVG, tag);
  for (const [key, value] of Object.entries(attributes)) element.setAttribute(key, value);
  return element;
}

// [[step, loss], ...] of a curve {steps, loss}.
function points(curve) {
  return curve.steps.map((step, i) => [step, curve.loss[i]]);
}

function scales() {
  const { train, val } = timeline.curves;
  const losses = train.loss.concat(val.loss);
  const last = Math.max(...timeline.steps, ...train.steps, 1);
  const low = Math.min(...losses), high = Math.max(...losses);
  const x = (step) => CHART.left + (step / last) * (CHART.width - CHART.left - CHART.right);
  const y = (loss) => CHART.top + ((high - loss) / (high - low || 1)) * (CHART.height - CHART.top - CHART.bottom);
  return { x, y, low, high, last };
}

function drawCurves() {
  const { x, y, low, high, last } = scales();
  const [train, val] = [points(timeline.curves.train), points(timeline.curves.val)];
  const every = Math.ceil(train.length / 1000);  // long runs: a thousand points draw the same line
  const line = (points) => points.map(([s, l]) => `${x(s).toFixed(1)},${y(l).toFixed(1)}`).join(" ");
  const chart = svg("svg", { viewBox: `0 0 ${CHART.width} ${CHART.height}`, id: "tl-chart" });
  const bottom = CHART.height - CHART.bottom;
  chart.append(
    svg("line", { x1: CHART.left, x2: CHART.width - CHART.right, y1: bottom, y2: bottom, class: "tl-axis" }),
    svg("polyline", { points: line(train.filter((_, i) => i % every === 0)), class: "tl-train" }),
    svg("polyline", { points: line(val), class: "tl-val" }),
  );
  for (const [text, at, anchor] of [[high.toFixed(2), y(high) + 4, "end"], [low.toFixed(2), y(low), "end"]]) {
    const label = svg("text", { x: CHART.left - 4, y: at, "text-anchor": anchor, class: "tl-label" });
    label.textContent = text;
    chart.append(label);
  }
  const steps = svg("text", { x: CHART.width - CHART.right, y: CHART.height - 4, "text-anchor": "end", class: "tl-label" });
  steps.textContent = `step ${last}`;
  chart.append(steps);
  timeline.steps.forEach((step, index) => {
    const tick = svg("circle", { cx: x(step), cy: bottom, r: 4, class: "tl-snap" });
    tick.dataset.step = step;
    const title = svg("title", {});
    title.textContent = `snapshot at step ${step} (click: show it on the left)`;
    tick.append(title);
    tick.addEventListener("click", () => { $("tl-step-a").value = index; renderAll().catch(showTimelineError); });
    chart.append(tick);
  });
  for (const side of SIDES) {
    chart.append(svg("line", { y1: CHART.top, y2: bottom, x1: 0, x2: 0, class: `tl-mark tl-mark-${side}` }));
  }
  const legend = svg("text", { x: CHART.left + 6, y: CHART.top + 10, class: "tl-label" });
  legend.textContent = "training loss (grey), validation loss (blue); the dots are snapshots";
  chart.append(legend);
  $("tl-curves").replaceChildren(chart);
}

function moveMarker(side, step) {
  const mark = document.querySelector(`#tl-chart .tl-mark-${side}`);
  if (!mark) return;
  const at = scales().x(step);
  mark.setAttribute("x1", at);
  mark.setAttribute("x2", at);
}

// One side: a step slider with its value, the loss at that step, the tokens, the heatmap.
function buildSide(side) {
  const panel = document.createElement("div");
  panel.className = "tl-side";
  panel.id = `tl-${side}`;
  const label = document.createElement("label");
  label.className = "tl-step";
  const slider = Object.assign(document.createElement("input"), { type: "range", id: `tl-step-${side}`, min: 0, max: 0,
                                                                  step: 1, value: 0 });
  const value = Object.assign(document.createElement("output"), { id: `tl-step-${side}-value` });
  label.append(slider, value);
  panel.append(label, ...["tl-loss", "tl-tokens", "tl-map"].map((name) => {
    const part = document.createElement("div");
    part.className = name;
    return part;
  }));
  return panel;
}

// --- wiring --------------------------------------------------------------------------------------------

function showTimelineError(error) {
  $("tl-note").textContent = error.message;
  $("tl-note").classList.add("error");
}

window.addEventListener("DOMContentLoaded", () => {
  $("tl-sides").replaceChildren(...SIDES.map(buildSide));
  for (const side of SIDES) $(`tl-step-${side}`).addEventListener("input", () => renderSide(side).catch(showTimelineError));
  for (const side of SIDES) $(`tl-step-${side}`).addEventListener("change", () => renderPinned().catch(showTimelineError));
  for (const id of ["tl-probe", "tl-layer", "tl-head"]) $(id).addEventListener("change", () => renderAll().catch(showTimelineError));
  $("tl-pin").addEventListener("click", () => pin().catch(showTimelineError));
  loadTimeline().catch(showTimelineError);
});
})();
