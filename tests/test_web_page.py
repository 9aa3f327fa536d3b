"""The web page at `/`, driven in headless Chromium (Debian's, through Playwright) against a real
server: type a prompt, wait for the streamed answer, then check that every view holds the
server's numbers: token probabilities, top-k tooltips, attention heatmaps, the logit lens and
the model config. The browser must fetch nothing but the server itself.

Also a small CLI for the README's screenshot of a real model:

    .venv/bin/python tests/test_web_page.py --model data/instruct/model --out docs/page.png
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Page, expect, sync_playwright

from llm.checkpoint import load_checkpoint
from llm.model import num_params, parts_of
from llm.tokenizer import load_tokenizer, load_tokenizers

sys.path.insert(0, str(Path(__file__).parent))
from test_serving_support import make_comparison_dir, make_model_dir, running  # noqa: E402

CHROMIUM = Path(os.environ.get("CHROMIUM", "/usr/bin/chromium"))
# Without the networking flags Chromium keeps trying to reach Google's hosts on a closed network.
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--no-first-run", "--disable-sync", "--disable-quic"]
PROMPT = "Hello world! How are you today?"
N_LAYER, N_HEAD = 2, 4


@contextlib.contextmanager
def browser_page():
    assert CHROMIUM.exists(), (f"{CHROMIUM} is missing: `make test` installs Debian's chromium package; "
                                "elsewhere, set CHROMIUM to a Chromium or Chrome binary")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_FLAGS)
        try:
            yield browser.new_page(viewport={"width": 1200, "height": 900})
        finally:
            browser.close()


def ask(page: Page, url: str, prompt: str, max_tokens: int = 24) -> None:
    """Open the page, generate an answer, wait until every view is drawn."""
    page.goto(url)
    expect(page.locator("#status")).to_have_text("ready", timeout=30_000)
    page.fill("#prompt", prompt)
    page.fill("#max-tokens", str(max_tokens))
    page.click("#generate")
    page.wait_for_selector("#lens-grid tr", timeout=60_000)
    page.wait_for_selector("#heads .head", timeout=60_000)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = make_model_dir(tmp_path_factory.mktemp("web") / "tiny", context_length=128)
    comparison = make_comparison_dir(folder.parent / "comparison")
    with running("--model", str(folder), "--seed", "0", "--tokenizers", str(comparison)) as server:
        server.folder, server.comparison = folder, comparison
        yield server


@pytest.fixture(scope="module")
def page_after_generation(server):
    """The page after one generation, with every request the browser made."""
    with browser_page() as page:
        requests, streams = [], []
        page.on("request", lambda r: requests.append(r.url))
        page.on("response", lambda r: streams.append(r.url) if "event-stream" in r.headers.get("content-type", "") else None)
        ask(page, server.url, PROMPT)
        page.requests, page.streams = requests, streams
        yield page


def test_the_page_is_served_with_a_same_origin_policy(server):
    response = httpx.get(server.url + "/")
    assert response.status_code == 200 and "text/html" in response.headers["content-type"]
    assert "default-src 'self'" in response.headers["content-security-policy"]
    assert httpx.get(server.url + "/web/page.js").status_code == 200
    assert httpx.get(server.url + "/web/missing.js").status_code == 404


def test_the_answer_is_streamed_and_nothing_leaves_the_server(page_after_generation, server):
    page = page_after_generation
    assert page.inner_text("#answer").strip()
    assert page.streams == [server.url + "/v1/chat/completions"]
    outside = [url for url in page.requests if not url.startswith(server.url + "/")]
    assert not outside, f"the page fetched from elsewhere: {outside}"
    assert "error" not in (page.get_attribute("#status", "class") or "")


def test_tokens_carry_the_servers_probabilities(page_after_generation, server):
    page = page_after_generation
    answer = page.inner_text("#answer")
    with httpx.Client(base_url=server.url) as http:
        prompt_ids = [t["id"] for t in http.post("/v1/tokenize", json={
            "messages": [{"role": "user", "content": PROMPT}]}).json()["tokens"]]
        answer_ids = [t["id"] for t in http.post("/v1/tokenize", json={"text": answer}).json()["tokens"]]
        truth = http.post("/v1/introspect", json={"token_ids": prompt_ids + answer_ids, "top_k": 5}).json()
    shown = page.eval_on_selector_all("#tokens .token", "spans => spans.map(s => [s.textContent, s.dataset.prob])")
    assert len(shown) == len(truth["tokens"]) == len(prompt_ids) + len(answer_ids)
    assert page.locator("#tokens .token.answer").count() == len(answer_ids)
    for (text, prob), token in zip(shown, truth["tokens"]):
        assert text == token["text"].replace("\n", "\u21b5\n")  # a newline shows as ↵, then breaks
        assert prob == ("" if token["prob"] is None else f"{token['prob']:.4f}")

    # Hovering a token shows what the model expected there: the previous position's top 5.
    page.hover("#tokens .token >> nth=3")
    page.wait_for_selector("#tooltip:not([hidden])")
    rows = page.eval_on_selector_all("#tooltip tr", "rows => rows.map(r => r.cells[1].textContent)")
    assert rows == [f"{c['prob']:.3f}" for c in truth["tokens"][2]["next"]]


def test_attention_heatmap_and_head_grid(page_after_generation):
    page = page_after_generation
    n = page.locator("#tokens .token").count()
    assert page.locator("#heads .head").count() == N_HEAD
    assert page.eval_on_selector("#heatmap", "c => [c.width, c.height]") == [n, n]
    # Real attention: the first token can attend only to itself (weight 1, darkest), never ahead.
    first_row = page.eval_on_selector(
        "#heatmap", "c => Array.from(c.getContext('2d').getImageData(0, 0, 2, 1).data)")
    assert first_row[:3] == [20, 60, 140] and first_row[4:7] == [255, 255, 255]

    # The tokens on both axes; when cells are under 8 pixels, every few tokens (heatmap.js).
    texts = page.eval_on_selector_all("#tokens .token", "spans => spans.map(s => s.textContent)")
    every = math.ceil(8 / (420 / n))
    for axis in ("#heatmap-keys", "#heatmap-queries"):
        labels = page.eval_on_selector_all(f"{axis} span", "spans => spans.map(s => [Number(s.dataset.index), s.textContent])")
        assert labels == [[i, texts[i].replace("\u21b5\n", "\u21b5").replace(" ", "\u00b7")] for i in range(0, n, every)]

    page.select_option("#layer", "1")
    page.wait_for_selector("#heatmap[data-layer='1']")
    page.click("#heads .head >> nth=2")
    assert page.get_attribute("#heatmap", "data-head") == "2"
    assert page.get_attribute("#heads .head.selected", "data-head") == "2"
    page.hover("#heatmap", position={"x": 2, "y": 2})
    assert page.inner_text("#cell-readout").endswith("1.000")


def test_logit_lens_grid_and_config(page_after_generation, tmp_path):
    page = page_after_generation
    n = page.locator("#tokens .token").count()
    rows = page.locator("#lens-grid tr")
    assert rows.count() == 1 + N_LAYER + 1  # header, embeddings, one row per block
    assert page.locator("#lens-grid tr >> nth=1").locator("td").count() == n + 1
    config = dict(page.eval_on_selector_all(
        "#config tr", "rows => rows.map(r => [r.cells[0].textContent, r.cells[1].textContent])"))
    assert config["n_layer"] == str(N_LAYER) and config["n_head"] == str(N_HEAD)
    assert page.inner_text("#model-name") == "tiny"
    # The training timeline says why it has nothing to show: this model kept no snapshots.
    assert "has no training snapshots" in page.inner_text("#tl-note") and page.is_hidden("#tl-view")
    page.screenshot(path=str(tmp_path / "page.png"), full_page=True)
    assert (tmp_path / "page.png").stat().st_size > 10_000


# --- the inspect views (serving/web/inspect.js) ---------------------------------------------------

def test_architecture_diagram_counts_match_the_model(page_after_generation, server):
    page = page_after_generation
    page.wait_for_selector("#arch-diagram .part")
    model = load_checkpoint(server.folder)
    boxes = page.eval_on_selector_all("#arch-diagram .part", "boxes => boxes.map(b => [b.dataset.part, "
                                      "Number(b.dataset.params), b.dataset.paramsAll ? Number(b.dataset.paramsAll) : null])")
    assert [name for name, *_ in boxes] == ["tok_emb", "pos_emb", "norm1", "attn", "norm2", "mlp", "final_norm", "lm_head"]
    counted = {p["name"]: p["params"] for p in parts_of(model)}
    for name, params, params_all in boxes:
        if params_all is None:
            assert params == counted[name]
        else:  # a block's part: one block's count, and all blocks'
            assert params == counted[f"blocks.0.{name}"]
            assert params_all == sum(counted[f"blocks.{i}.{name}"] for i in range(N_LAYER))
    total = sum(params_all if params_all is not None else params for _, params, params_all in boxes)
    assert total == num_params(model) == int(page.get_attribute("#arch-totals", "data-params"))
    assert f"{num_params(model):,} parameters" in page.inner_text("#arch-totals")
    assert page.get_attribute("#arch-diagram .block", "data-count") == str(N_LAYER)
    assert "softmax" in page.inner_text("#arch-diagram [data-part=attn]")


def test_why_this_token_attribution_and_patching_views(page_after_generation, server):
    page = page_after_generation
    prompt = "Hello world! How are you"
    page.fill("#why-prompt", prompt)
    page.click("#why-explain")
    page.wait_for_selector("#why-grid tr[data-layer]")
    truth = httpx.post(server.url + "/v1/attribution", json={"text": prompt}).json()
    assert page.locator("#why-grid tr[data-layer]").count() == N_LAYER
    first = page.eval_on_selector_all("#why-grid tr[data-layer='0'] td.value", "cells => cells.map(c => c.textContent)")
    layer = truth["layers"][0]
    assert first == [f"{v:.3f}" for v in [*layer["heads"], layer["attention_bias"], layer["mlp"]]]
    assert float(page.get_attribute("#why-summary", "data-sum")) == truth["sum"]
    # A head's cell opens what it read: one value per prompt token, adding up to the head's part.
    page.click("#why-grid tr[data-layer='1'] td.head-cell[data-head='2']")
    page.wait_for_selector("#why-sources[data-head='2'] .source")
    shown = page.eval_on_selector_all("#why-sources .source", "spans => spans.map(s => Number(s.dataset.value))")
    assert shown == truth["layers"][1]["sources"][2] and len(shown) == len(prompt)
    # Another candidate: the view explains that token instead.
    other = page.locator("#why-top .chip >> nth=1")
    other_id = other.get_attribute("data-id")
    other.click()
    page.wait_for_selector(f"#why-top .chip.selected[data-id='{other_id}']")
    assert f"(id {other_id})" in page.inner_text("#why-summary")

    page.fill("#patch-prompt", "Hello world! How are yoo")
    page.click("#patch-run")
    page.wait_for_selector("#patch-grid tr[data-layer]")
    assert page.locator("#patch-grid tr[data-layer]").count() == N_LAYER + 1
    assert page.locator("#patch-grid tr >> nth=0").locator("th").count() == len(prompt) + 1  # a char tokenizer
    assert "u / o" in page.inner_text("#patch-grid tr >> nth=0")  # the changed position names both tokens
    page.fill("#patch-prompt", "Hi")
    page.click("#patch-run")
    expect(page.locator("#patch-status")).to_contain_text("same number of tokens")


def test_tokenizers_side_by_side(page_after_generation, server):
    page = page_after_generation
    text = "The quick brown fox. الطقس جميل"
    page.fill("#compare-text", text)
    page.click("#compare-run")
    expect(page.locator("#compare-status")).to_have_text(f"{len(text)} characters, {len(text.encode())} bytes")
    splits = page.eval_on_selector_all("#compare-results .split", "blocks => blocks.map(b => "
                                       "[b.dataset.name, Number(b.dataset.count), b.querySelectorAll('.piece').length])")
    tokenizers = {"served model": load_tokenizer(server.folder / "tokenizer"), **load_tokenizers(server.comparison)}
    assert [name for name, *_ in splits] == list(tokenizers) == ["served model", "bpe", "char"]
    for (name, count, pieces), tokenizer in zip(splits, tokenizers.values()):
        assert count == pieces == len(tokenizer.encode(text)), name
    assert splits[1][1] < splits[2][1]  # the BPE merges what the character tokenizer spells out
    # A byte-fallback piece names the character it is a byte of.
    title = page.get_attribute("#compare-results .split[data-name=char] .piece >> text=<0xD8> >> nth=0", "title")
    assert title.endswith('part of "ا"')


def main() -> None:
    parser = argparse.ArgumentParser(description="Screenshot the web page serving a model.")
    parser.add_argument("--model", required=True, help="a model folder or models:/NAME@ALIAS")
    parser.add_argument("--prompt", default="Tell me about the history of the United States.")
    parser.add_argument("--out", type=Path, default=Path("docs/page.png"))
    args = parser.parse_args()
    with running("--model", args.model, "--seed", "0") as server, browser_page() as page:
        ask(page, server.url, args.prompt, max_tokens=40)
        answer = page.locator("#tokens .token.answer")
        answer.nth(min(2, answer.count() - 1)).hover()  # a tooltip in the picture
        args.out.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(args.out), full_page=True)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
