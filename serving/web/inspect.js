// The inspect views, top to bottom: the architecture diagram (GET /v1/architecture), "why this
// token?" (POST /v1/attribution and /v1/patching) and tokenizers side by side
// (POST /v1/tokenizers/compare). Loaded after page.js, whose helpers it uses: $, post, row.
// One function scope: nothing here becomes a global that could clash with page.js's.
(() => {
"use strict";

const inspect = { attribution: null };
const formatCount = (n) => n.toLocaleString("en-US");

// A compact count: 1.2M, 34.5k, 812.
function shortCount(n) {
  if (n >= 1e9) return `${(n / 1e9).toFixed(2)}G`;
  if (n >= 1e6) return `${(n / 1e6).toFixed(2)}M`;
  if (n >= 1e3) return `${(n / 1e3).toFixed(1)}k`;
  return String(n);
}

function element(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function setStatus(id, message, isError = false) {
  $(id).textContent = message;
  $(id).className = isError ? "error" : "";
}

// --- the architecture diagram ------------------------------------------------------------------

// One box per part: label, detail, equation, parameters and FLOPs (per block, and over all blocks).
function partBox(part) {
  const box = element("div", "part");
  box.dataset.part = part.name;
  box.dataset.params = part.params;
  if (part.params_all !== null) box.dataset.paramsAll = part.params_all;
  const numbers = part.params_all === null
    ? `${formatCount(part.params)} params · ${shortCount(part.flops)} FLOPs/token`
    : `${formatCount(part.params)} params per block (${formatCount(part.params_all)} in all) · ` +
      `${shortCount(part.flops)} FLOPs/token per block`;
  box.append(element("div", "part-label", part.label), element("div", "part-detail", part.detail),
             element("code", "part-equation", part.equation), element("div", "part-numbers", numbers));
  return box;
}

const arrow = () => element("div", "arrow", "↓");

function residualAdd(text) {
  return element("div", "residual", text);
}

// Pre-norm: norm → attention → add, norm → MLP → add. Post-norm: attention → add → norm, MLP → add → norm.
function blockOrder(block) {
  const byName = Object.fromEntries(block.parts.map((p) => [p.name, p]));
  const add = "⊕ add to the residual stream";
  return block.norm_placement === "pre"
    ? [byName.norm1, byName.attn, add, byName.norm2, byName.mlp, add]
    : [byName.attn, add, byName.norm1, byName.mlp, add, byName.norm2];
}

function drawArchitecture(arch) {
  const totals = arch.totals;
  $("arch-totals").textContent =
    `${formatCount(totals.params)} parameters (${formatCount(totals.non_embedding_params)} outside the ` +
    `embeddings) · ${formatCount(totals.flops_per_token)} ${totals.flops_note}`;
  $("arch-totals").dataset.params = totals.params;
  const items = [];
  for (const part of arch.input) items.push(partBox(part), arrow());
  const block = element("div", "block");
  block.dataset.count = arch.block.count;
  block.append(element("div", "block-title", `Transformer block × ${arch.block.count} ` +
                                              `(${arch.block.norm_placement}-norm)`),
               element("code", "part-equation", arch.block.equation));
  for (const item of blockOrder(arch.block)) {
    block.append(typeof item === "string" ? residualAdd(item) : partBox(item));
  }
  items.push(block);
  for (const part of arch.output) items.push(arrow(), partBox(part));
  $("arch-diagram").replaceChildren(...items);
}

async function loadArchitecture() {
  const response = await fetch("/v1/architecture");
  if (!response.ok) throw new Error(`/v1/architecture: HTTP ${response.status}`);
  drawArchitecture(await response.json());
}

// --- why this token? ---------------------------------------------------------------------------

// Red pushes the token down, blue pushes it up; the strongest cell of the table is the most saturated.
function signedColour(value, scale) {
  const t = scale > 0 ? Math.min(1, Math.abs(value) / scale) : 0;
  const hue = value >= 0 ? 215 : 0;
  return `hsl(${hue}, 75%, ${Math.round(97 - 35 * t)}%)`;
}

function valueCell(value, scale) {
  const td = element("td", "value", value.toFixed(3));
  td.style.background = signedColour(value, scale);
  return td;
}

function drawAttribution(result) {
  inspect.attribution = result;
  const chips = result.top.map((p) => {
    const chip = element("button", p.id === result.target.id ? "chip selected" : "chip",
                         `${JSON.stringify(p.text)} ${p.prob.toFixed(3)}`);
    chip.dataset.id = p.id;
    chip.addEventListener("click", () => explain(p.id).catch((e) => setStatus("why-status", e.message, true)));
    return chip;
  });
  $("why-top").replaceChildren(element("span", "hint", "Top predictions after the prompt (click one to explain it): "),
                               ...chips);
  $("why-summary").textContent =
    `Explaining ${JSON.stringify(result.target.text)} (id ${result.target.id}) after ` +
    `${JSON.stringify(result.tokens[result.position].text)}: logit ${result.logit.toFixed(4)} = ` +
    `contributions ${result.sum.toFixed(4)} + final norm bias ${result.bias_term.toFixed(4)}.`;
  $("why-summary").dataset.sum = result.sum;
  const nHead = result.layers[0].heads.length;
  const values = result.layers.flatMap((l) => [...l.heads, l.attention_bias, l.mlp])
    .concat(Object.values(result.embeddings));
  const scale = Math.max(...values.map(Math.abs));
  const header = row(["", ...Array.from({ length: nHead }, (_, h) => `head ${h}`), "attn bias", "MLP"], "th");
  const rows = result.layers.map((l) => {
    const tr = row([`block ${l.layer}`]);
    l.heads.forEach((v, h) => {
      const td = valueCell(v, scale);
      td.classList.add("head-cell");
      td.dataset.head = h;
      td.title = "click: which tokens this head read from";
      td.addEventListener("click", () => drawSources(l.layer, h));
      tr.append(td);
    });
    for (const v of [l.attention_bias, l.mlp]) tr.append(valueCell(v, scale));
    tr.dataset.layer = l.layer;
    return tr;
  });
  $("why-grid").replaceChildren(header, ...rows);
  // The embeddings are writes too: the token's own row of W_E, and its position's row of W_P.
  const parts = Object.entries(result.embeddings).map(([name, v]) => {
    const span = element("span", "value", `${name} ${v.toFixed(3)}`);
    span.style.background = signedColour(v, scale);
    return span;
  });
  $("why-embeddings").replaceChildren("embeddings: ", ...parts);
  $("why-method").textContent = result.method;
  $("why-sources").replaceChildren();
}

// A head's contribution, split over the prompt's tokens it read from (attention weight x value).
function drawSources(layer, head) {
  const result = inspect.attribution;
  const sources = result.layers[layer].sources[head];
  const scale = Math.max(...sources.map(Math.abs));
  const spans = sources.map((v, k) => {
    const span = element("span", "source", result.tokens[k].text.replace(/\n/g, "↵"));
    span.style.background = signedColour(v, scale);
    span.title = v.toFixed(4);
    span.dataset.value = v;
    return span;
  });
  const title = element("div", "hint", `Block ${layer}, head ${head}: its ${result.layers[layer].heads[head].toFixed(3)}, ` +
                                         "by the token it read (blue pushed the token up, red down):");
  $("why-sources").dataset.layer = layer;
  $("why-sources").dataset.head = head;
  $("why-sources").replaceChildren(title, ...spans);
}

async function explain(target) {
  setStatus("why-status", "explaining…");
  const body = { text: $("why-prompt").value };
  if (target !== undefined) body.target = target;
  drawAttribution(await post("/v1/attribution", body));
  setStatus("why-status", "");
}

function drawPatching(result) {
  const foil = result.foil ? ` against ${JSON.stringify(result.foil.text)}` : "";
  $("patch-summary").textContent =
    `Answer ${JSON.stringify(result.target.text)}${foil}: ${result.metric} is ${result.clean.toFixed(3)} on the ` +
    `clean prompt and ${result.corrupted.toFixed(3)} on the corrupted one. Each cell: how much of the ` +
    "difference comes back when that layer and position are taken from the clean run (1 = all of it).";
  const heads = result.tokens.clean.map((text, i) => {
    const corrupted = result.tokens.corrupted[i];
    return text === corrupted ? text : `${text} / ${corrupted}`;
  });
  const header = row(["", ...heads.map((t) => t.replace(/\n/g, "↵"))], "th");
  const rows = result.layers.map((layer) => {
    const tr = row([layer.label]);
    layer.restored.forEach((r, i) => {
      const td = element("td", "value", r === null ? "–" : r.toFixed(2));
      td.style.background = r === null ? "#eee" : signedColour(r, 1);
      td.title = `${result.metric} = ${layer.values[i].toFixed(3)}`;
      tr.append(td);
    });
    tr.dataset.layer = layer.layer;
    return tr;
  });
  $("patch-grid").replaceChildren(header, ...rows);
}

async function patch() {
  setStatus("patch-status", "patching…");
  const body = { clean: { text: $("why-prompt").value }, corrupted: { text: $("patch-prompt").value } };
  if (inspect.attribution) body.target = inspect.attribution.target.id;
  drawPatching(await post("/v1/patching", body));
  setStatus("patch-status", "");
}

// --- tokenizers side by side -------------------------------------------------------------------

// A token that is a piece of a character (a byte of byte fallback, or of a byte-level BPE): the
// character it belongs to, from the text's own UTF-8 bytes.
function partOf(bytes, start, end) {
  const continuation = (b) => (b & 0xc0) === 0x80;
  let from = start;
  let to = end;
  while (from > 0 && continuation(bytes[from])) from--;
  while (to < bytes.length && continuation(bytes[to])) to++;
  if (from === start && to === end) return "";
  return `, part of ${JSON.stringify(new TextDecoder().decode(bytes.slice(from, to)))}`;
}

function drawSplits(result, text) {
  const bytes = new TextEncoder().encode(text);
  const blocks = result.tokenizers.map((t) => {
    const block = element("div", "split");
    block.dataset.name = t.name;
    block.dataset.count = t.count;
    const title = element("div", "split-title");
    title.append(element("strong", "", t.name),
                 ` ${t.kind}, vocabulary ${formatCount(t.vocab_size)}: `,
                 element("span", "split-count", `${t.count} tokens`),
                 `, ${t.chars_per_token.toFixed(2)} characters per token`);
    const pieces = element("div", "pieces");
    // Spans index the decoded text: the same bytes as the typed text for a lossless tokenizer.
    const lossless = t.tokens.length > 0 && t.tokens[t.tokens.length - 1].byte_end === bytes.length;
    t.tokens.forEach((token, i) => {
      const piece = element("span", i % 2 ? "piece odd" : "piece", token.text.replace(/\n/g, "↵"));
      piece.title = `id ${token.id}, bytes ${token.byte_start}–${token.byte_end}` +
                    (lossless ? partOf(bytes, token.byte_start, token.byte_end) : "");
      pieces.append(piece);
    });
    block.append(title, pieces);
    return block;
  });
  $("compare-results").replaceChildren(...blocks);
  setStatus("compare-status", result.message || `${result.chars} characters, ${result.bytes} bytes`);
}

async function compareTokenizers() {
  setStatus("compare-status", "splitting…");
  const text = $("compare-text").value;
  drawSplits(await post("/v1/tokenizers/compare", { text }), text);
}

// --- wiring ------------------------------------------------------------------------------------

window.addEventListener("DOMContentLoaded", () => {
  const failed = (id) => (error) => setStatus(id, error.message, true);
  $("why-explain").addEventListener("click", () => explain().catch(failed("why-status")));
  $("patch-run").addEventListener("click", () => patch().catch(failed("patch-status")));
  $("compare-run").addEventListener("click", () => compareTokenizers().catch(failed("compare-status")));
  loadArchitecture().catch((error) => { $("arch-totals").textContent = error.message; });
  compareTokenizers().catch(failed("compare-status"));
});
})();
