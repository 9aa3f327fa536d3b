// The page's logic, top to bottom: load the model card, generate (streamed), then ask
// /v1/introspect about the prompt and answer and draw what it says. No libraries: the
// heatmaps are canvases with one pixel per cell, scaled up by CSS.
"use strict";

const TOP_K = 5;
const NEWLINE = "\u21b5";  // ↵: a newline token needs something to see and hover
const $ = (id) => document.getElementById(id);
const state = { card: null, ids: [], tokens: [], answerStart: 0, caps: null, attention: null };

// --- talking to the server ---------------------------------------------------------------------

// POST JSON; the response, or an error carrying the server's message.
async function send(path, body) {
  const response = await fetch(path, {
    method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
  });
  if (!response.ok) {
    const payload = await response.json().catch(() => ({}));
    throw new Error(errorMessage(payload) || `${path}: HTTP ${response.status}`);
  }
  return response;
}

async function post(path, body) {
  return (await send(path, body)).json();
}

function errorMessage(payload) {
  const error = payload && (payload.error || payload.detail);
  return typeof error === "string" ? error : error && error.message;
}

// Server-sent events from a streamed completion: calls onText with each piece of new text.
async function stream(path, body, onText) {
  const response = await send(path, body);
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    const events = buffer.split("\n\n");
    buffer = events.pop();  // an incomplete event waits for the next read
    for (const event of events) {
      const data = event.split("\n").filter((l) => l.startsWith("data: ")).map((l) => l.slice(6)).join("");
      if (!data || data === "[DONE]") continue;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new Error(chunk.error.message);
      const choice = chunk.choices && chunk.choices[0];
      if (choice) onText(choice.delta ? choice.delta.content || "" : choice.text || "");
    }
  }
}

// --- the model card ----------------------------------------------------------------------------

async function loadModel() {
  const models = await (await fetch("/v1/models")).json();
  const card = (state.card = models.data[0]);
  $("model-name").textContent = card.id;
  document.title = `Inside ${card.id}`;
  const rows = { model: card.id, source: card.source, ...card.config };
  $("config").replaceChildren(...Object.entries(rows).map(([key, value]) => row([key, String(value)])));
  fillSelect($("layer"), card.config.n_layer, "layer");
  fillSelect($("head"), card.config.n_head, "head");
}

function row(cells, tag = "td") {
  const tr = document.createElement("tr");
  for (const cell of cells) {
    const td = document.createElement(tag);
    if (cell instanceof Node) td.append(cell); else td.textContent = cell;
    tr.append(td);
  }
  return tr;
}

function fillSelect(select, count, label) {
  select.replaceChildren(...Array.from({ length: count }, (_, i) => new Option(`${label} ${i}`, i)));
}

// --- generation --------------------------------------------------------------------------------

function request() {
  const prompt = $("prompt").value;
  const chat = $("chat").checked;
  const sampling = {
    model: state.card.id, stream: true,
    max_tokens: Number($("max-tokens").value), temperature: Number($("temperature").value),
    seed: Number($("seed").value),
  };
  return chat
    ? { path: "/v1/chat/completions", body: { ...sampling, messages: [{ role: "user", content: prompt }] },
        tokenize: { messages: [{ role: "user", content: prompt }] } }
    : { path: "/v1/completions", body: { ...sampling, prompt }, tokenize: { text: prompt } };
}

async function generate() {
  const status = $("status");
  status.className = "";
  $("generate").disabled = true;
  $("answer").textContent = "";
  try {
    const job = request();
    status.textContent = "generating…";
    let answer = "";
    await stream(job.path, job.body, (text) => { answer += text; $("answer").textContent = answer; });
    status.textContent = "analysing…";
    const promptIds = (await post("/v1/tokenize", job.tokenize)).tokens.map((t) => t.id);
    const answerIds = answer ? (await post("/v1/tokenize", { text: answer })).tokens.map((t) => t.id) : [];
    await analyse(promptIds, answerIds);
    status.textContent = `${promptIds.length} prompt + ${answerIds.length} answer tokens`;
  } catch (error) {
    status.className = "error";
    status.textContent = error.message;
  } finally {
    $("generate").disabled = false;
  }
}

// --- introspection -----------------------------------------------------------------------------

async function analyse(promptIds, answerIds) {
  // Introspection sees at most the context: keep the newest tokens.
  const all = promptIds.concat(answerIds);
  const keep = Math.min(all.length, state.card.context_length);
  state.ids = all.slice(all.length - keep);
  state.answerStart = Math.max(0, promptIds.length - (all.length - keep));
  const result = await post("/v1/introspect", { token_ids: state.ids, top_k: TOP_K, logit_lens: true });
  state.tokens = result.tokens;
  state.caps = result.caps;
  drawTokens();
  drawLens(result.logit_lens);
  await loadAttention();
  for (const id of ["probabilities", "attention", "lens"]) $(id).hidden = false;
}

// p = 0 is red, p = 1 is green; the first token has no probability (nothing came before it).
function probabilityColour(p) {
  return p === null ? "#e4e6ea" : `hsl(${Math.round(130 * p)}, 70%, ${Math.round(84 - 6 * p)}%)`;
}

function drawTokens() {
  const spans = state.tokens.map((token, i) => {
    const span = document.createElement("span");
    span.className = i >= state.answerStart ? "token answer" : "token";
    span.textContent = token.text.replace(/\n/g, NEWLINE + "\n");
    span.style.background = probabilityColour(token.prob);
    span.dataset.position = i;
    span.dataset.prob = token.prob === null ? "" : token.prob.toFixed(4);
    span.addEventListener("mouseenter", (event) => showTooltip(i, event));
    span.addEventListener("mouseleave", () => { $("tooltip").hidden = true; });
    return span;
  });
  $("tokens").replaceChildren(...spans);
}

// The candidates for position i were predicted at position i - 1.
function showTooltip(i, event, tokens = state.tokens, tooltip = $("tooltip")) {
  const token = tokens[i];
  const heading = document.createElement("div");
  if (i === 0) {
    heading.textContent = `${JSON.stringify(token.text)}: the first token, nothing predicts it`;
    tooltip.replaceChildren(heading);
  } else {
    heading.textContent = `${JSON.stringify(token.text)}: p = ${token.prob.toFixed(3)}, ` +
                          `${token.surprisal_bits.toFixed(1)} bits. The model expected:`;
    const table = document.createElement("table");
    for (const c of tokens[i - 1].next) {
      const tr = row([JSON.stringify(c.text), c.prob.toFixed(3)]);
      tr.lastChild.className = "p";
      if (c.id === token.id) tr.style.fontWeight = "bold";
      table.append(tr);
    }
    tooltip.replaceChildren(heading, table);
  }
  const box = event.target.getBoundingClientRect();
  tooltip.style.left = `${Math.min(box.left, window.innerWidth - 320)}px`;
  tooltip.style.top = `${box.bottom + 6}px`;
  tooltip.hidden = false;
}

// All heads of the layer in one request when the caps allow it, else the chosen head only.
async function loadAttention() {
  const layer = Number($("layer").value);
  const n = state.ids.length;
  const heads = state.card.config.n_head * n * n <= state.caps.max_values ? null : [Number($("head").value)];
  const attention = { layers: [layer] };
  if (heads) attention.heads = heads;
  const result = await post("/v1/introspect", { token_ids: state.ids, top_k: 1, attention });
  state.attention = result.attention[0];
  $("attention-note").textContent = heads ? "(one head at a time: all heads would exceed the server's cap)" : "";
  drawHeads();
  drawHeatmap();
}

function drawHeads() {
  const selected = Number($("head").value);
  const cells = state.attention.heads.map((map) => {
    const cell = document.createElement("div");
    cell.className = map.head === selected ? "head selected" : "head";
    cell.dataset.head = map.head;
    const canvas = document.createElement("canvas");
    paint(canvas, map.weights);
    cell.append(canvas, `head ${map.head}`);
    cell.addEventListener("click", () => { $("head").value = map.head; selectHead(); });
    return cell;
  });
  $("heads").replaceChildren(...cells);
}

function selectHead() {
  const head = Number($("head").value);
  if (!state.attention.heads.some((m) => m.head === head)) return loadAttention();
  for (const cell of $("heads").children) cell.classList.toggle("selected", Number(cell.dataset.head) === head);
  drawHeatmap();
}

function drawHeatmap() {
  const head = Number($("head").value);
  const map = state.attention.heads.find((m) => m.head === head);
  const canvas = $("heatmap");
  paint(canvas, map.weights);
  canvas.dataset.layer = state.attention.layer;
  canvas.dataset.head = head;
  canvas.dataset.size = map.weights.length;
  // The tokens on both axes (heatmap.js), at the canvas's 420 CSS pixels.
  const tokens = state.tokens.map((t) => t.text);
  labelAxes($("heatmap-grid"), $("heatmap-keys"), $("heatmap-queries"), tokens, 420 / tokens.length);
}

// One pixel per (query, key) cell: white (0) to dark blue (1), on a square-root scale so that
// weights spread thinly over many tokens still show.
function paint(canvas, weights) {
  const n = weights.length;
  canvas.width = canvas.height = n;
  const context = canvas.getContext("2d");
  const image = context.createImageData(n, n);
  for (let q = 0; q < n; q++) {
    for (let k = 0; k < n; k++) {
      const w = Math.sqrt(weights[q][k]);
      const at = 4 * (q * n + k);
      image.data[at] = 255 - w * 235;
      image.data[at + 1] = 255 - w * 195;
      image.data[at + 2] = 255 - w * 115;
      image.data[at + 3] = 255;
    }
  }
  context.putImageData(image, 0, 0);
}

function readCell(event) {
  const canvas = $("heatmap");
  if (!state.attention) return;
  const n = Number(canvas.dataset.size);
  const box = canvas.getBoundingClientRect();
  const q = Math.floor(((event.clientY - box.top) / box.height) * n);
  const k = Math.floor(((event.clientX - box.left) / box.width) * n);
  const map = state.attention.heads.find((m) => m.head === Number(canvas.dataset.head));
  if (q < 0 || k < 0 || q >= n || k >= n) return;
  $("cell-readout").textContent = `${JSON.stringify(state.tokens[q].text)} → ` +
    `${JSON.stringify(state.tokens[k].text)}: ${map.weights[q][k].toFixed(3)}`;
}

function drawLens(layers) {
  const header = row(["", ...state.tokens.map((t) => t.text.replace(/\n/g, NEWLINE))], "th");
  const rows = layers.map((layer) => {
    const cells = layer.positions.map((candidates) => {
      const top = candidates[0];
      const cell = document.createElement("span");
      cell.textContent = top.text.replace(/\n/g, NEWLINE);
      const small = document.createElement("small");
      small.textContent = top.prob.toFixed(2);
      cell.append(small);
      return cell;
    });
    const tr = row([layer.label, ...cells]);
    tr.querySelectorAll("td").forEach((td, j) => {
      if (j === 0) return;
      const candidates = layer.positions[j - 1];
      td.style.background = probabilityColour(candidates[0].prob);
      td.title = candidates.map((c) => `${JSON.stringify(c.text)} ${c.prob.toFixed(3)}`).join("\n");
    });
    return tr;
  });
  $("lens-grid").replaceChildren(header, ...rows);
}

// --- wiring ------------------------------------------------------------------------------------

window.addEventListener("DOMContentLoaded", async () => {
  $("generate").addEventListener("click", generate);
  $("prompt").addEventListener("keydown", (e) => { if (e.key === "Enter" && e.ctrlKey) generate(); });
  $("layer").addEventListener("change", () => loadAttention().catch(showError));
  $("head").addEventListener("change", () => Promise.resolve(selectHead()).catch(showError));
  $("heatmap").addEventListener("mousemove", readCell);
  try {
    await loadModel();
    $("status").textContent = "ready";
  } catch (error) {
    showError(error);
  }
});

function showError(error) {
  $("status").className = "error";
  $("status").textContent = error.message;
}
