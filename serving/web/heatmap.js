// Attention heatmaps you can read: the tokens on both axes (rows: the query, the token that
// attends; columns: the key, the token attended to), and hovering a cell names the query token,
// the key token and the weight. The pixels are page.js's paint() (one pixel per cell, square-root
// scale), scaled up by CSS. Used by timeline.js, and by page.js for its big heatmap's axes.
"use strict";

const SPACE = "\u00b7";  // a visible space: tokens often start with one

function visibleToken(text) {
  return text.replace(/\n/g, NEWLINE).replace(/ /g, SPACE);
}

// weights[q][k] (each row sums to 1), tokens: the n token texts, caption: shown when not hovering.
function readableHeatmap(weights, tokens, caption) {
  const n = weights.length;
  const figure = document.createElement("figure");
  figure.className = "heatmap";
  const keys = document.createElement("div");
  const queries = document.createElement("div");
  labelAxes(figure, keys, queries, tokens, Math.max(6, Math.min(16, Math.floor(320 / n))));
  const canvas = document.createElement("canvas");
  paint(canvas, weights);
  const readout = document.createElement("figcaption");
  readout.className = "hm-readout";
  readout.textContent = caption;

  const show = (q, k) => {
    for (const [labels, at] of [[queries, q], [keys, k]]) {
      for (const label of labels.children) label.classList.toggle("hot", Number(label.dataset.index) === at);
    }
  };
  canvas.addEventListener("mousemove", (event) => {
    const box = canvas.getBoundingClientRect();
    const q = Math.floor(((event.clientY - box.top) / box.height) * n);
    const k = Math.floor(((event.clientX - box.left) / box.width) * n);
    if (q < 0 || k < 0 || q >= n || k >= n) return;
    readout.textContent = `query ${JSON.stringify(tokens[q])} (${q}) \u2192 key ${JSON.stringify(tokens[k])} ` +
                          `(${k}): ${weights[q][k].toFixed(3)}`;
    show(q, k);
  });
  canvas.addEventListener("mouseleave", () => { readout.textContent = caption; show(-1, -1); });

  const grid = document.createElement("div");
  grid.className = "hm-grid";
  grid.append(document.createElement("div"), keys, queries, canvas);
  figure.append(grid, readout);
  return figure;
}

// Fill the key axis (along the top) and the query axis (down the left) of an n x n map whose
// cells are `cell` pixels; `box` holds both and gets the sizes (CSS variables --n and --cell).
// Cells too small to read get a label every few tokens.
function labelAxes(box, keys, queries, tokens, cell) {
  box.style.setProperty("--n", tokens.length);
  box.style.setProperty("--cell", `${cell}px`);
  const every = Math.ceil(8 / cell);
  for (const [labels, className] of [[keys, "hm-keys"], [queries, "hm-queries"]]) {
    labels.className = className;
    labels.replaceChildren(...tokens.flatMap((text, i) => {
      if (i % every) return [];
      const label = document.createElement("span");
      label.textContent = visibleToken(text);
      label.dataset.index = i;
      label.title = `${i}: ${JSON.stringify(text)}`;
      label.style.setProperty("--span", Math.min(every, tokens.length - i));
      return [label];
    }));
  }
}
