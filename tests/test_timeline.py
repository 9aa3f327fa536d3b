"""The training timeline, end to end: a tiny model trained by the real loop with snapshots, served
by the real server; its snapshot endpoints over HTTP, then the page in headless Chromium: move a
step slider and the probabilities and attention change to the recorded ones, the heatmap's axes
carry the tokens, hovering a cell names query, key and weight, a pinned head stays in view.

Also a small CLI for a picture of the timeline of a real model:

    .venv/bin/python tests/test_timeline.py --model data/pretrain/model --out docs/timeline.png
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import expect
from test_web_page import browser_page

from llm.snapshots import SNAPSHOTS_DIR, read_record

from test_serving_support import fuzz, make_model_dir_with_snapshots, running

STEPS = [0, 20, 40]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = make_model_dir_with_snapshots(tmp_path_factory.mktemp("timeline") / "tiny")
    with running("--model", str(folder), "--seed", "0") as server:
        server.records = {step: read_record(folder / SNAPSHOTS_DIR, step) for step in STEPS}
        yield server


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=60) as http:
        yield http


def shown(token: str) -> str:
    """A token as the heatmap's axes write it: newlines as ↵, spaces as ·."""
    return token.replace("\n", "\u21b5").replace(" ", "\u00b7")


# --- HTTP -------------------------------------------------------------------------------------------

def test_models_and_snapshots_list_the_steps_and_curves(http):
    [card] = http.get("/v1/models").json()["data"]
    assert card["snapshots"] == STEPS
    listing = http.get("/v1/snapshots").json()
    assert listing["steps"] == STEPS and listing["probes"] == ["probe text", "training row"]
    assert listing["train"]["steps"] == list(range(40)) and listing["val"]["steps"] == [10, 20, 30, 40]
    record = http.get("/v1/snapshots/20").json()
    assert record["step"] == 20 and record["val_loss"] == pytest.approx(listing["val"]["loss"][1])


def test_introspection_at_a_step_reads_the_snapshots_weights(http, server):
    probe = server.records[20]["probes"][0]
    at = {step: http.post("/v1/introspect", json={"token_ids": probe["ids"], "step": step}).json()
          for step in (0, 20)}
    trained = http.post("/v1/introspect", json={"token_ids": probe["ids"]}).json()
    assert at[20]["step"] == 20 and trained["step"] is None
    for recorded, served in zip(probe["tokens"][1:], at[20]["tokens"][1:]):
        assert math.isclose(recorded["prob"], served["prob"], abs_tol=2e-3)   # float16 weights, same numbers
    assert at[0]["tokens"][3]["prob"] != pytest.approx(trained["tokens"][3]["prob"], abs=1e-3)
    # Why this token, asked of the untrained and the trained snapshot: other logits, each summed exactly.
    why = {step: http.post("/v1/attribution", json={"token_ids": probe["ids"], "step": step}).json() for step in (0, 40)}
    assert [why[step]["step"] for step in (0, 40)] == [0, 40] and why[0]["logit"] != pytest.approx(why[40]["logit"])
    assert all(w["sum"] == pytest.approx(w["logit"] - w["bias_term"], abs=1e-3) for w in why.values())
    patched = http.post("/v1/patching", json={"clean": {"token_ids": probe["ids"][:6]},
                                              "corrupted": {"token_ids": probe["ids"][1:7]}, "step": 20}).json()
    assert patched["step"] == 20 and len(patched["layers"]) == 3   # embeddings + 2 blocks


@pytest.mark.parametrize("method, path, body", [
    ("POST", "/v1/introspect", {"text": "hi", "step": 7}),
    ("POST", "/v1/attribution", {"text": "hi", "step": 7}),
    ("POST", "/v1/patching", {"clean": {"text": "ab"}, "corrupted": {"text": "ac"}, "step": 7}),
    ("GET", "/v1/snapshots/7", None),
])
def test_an_unknown_step_is_a_404_listing_the_steps(http, method, path, body):
    response = http.request(method, path, json=body)
    assert response.status_code == 404
    assert "step 7 is not a snapshot of 'tiny'; its snapshots are at steps 0, 20, 40" in response.json()["error"]["message"]
    assert http.get("/v1/snapshots/seven").status_code == 400


def test_fuzzing_the_snapshot_endpoints_finds_no_server_error(server):
    """Here the model has snapshots: valid steps get real records, checked against the schema."""
    fuzz(server.url, max_examples=15, max_time_s=20, only="^/v1/(snapshots|introspect|attribution)")


# --- the page ---------------------------------------------------------------------------------------

def probabilities(page, side: str) -> list[str]:
    return page.eval_on_selector_all(f"#tl-{side} .tl-tokens .token", "spans => spans.map(s => s.dataset.prob)")


def recorded(record: dict, probe: int = 0) -> list[str]:
    return ["" if t["prob"] is None else f"{t['prob']:.4f}" for t in record["probes"][probe]["tokens"]]


def pixels(page, selector: str) -> list[int]:
    return page.eval_on_selector(selector, "c => Array.from(c.getContext('2d').getImageData(0, 0, c.width, c.height).data)")


def test_the_timeline_compares_two_steps_and_its_heatmaps_are_readable(server, tmp_path):
    records = server.records
    with browser_page() as page:
        page.goto(server.url)
        expect(page.locator("#tl-b")).to_have_attribute("data-step", "40", timeout=30_000)
        expect(page.locator("#tl-a")).to_have_attribute("data-step", "0")
        assert page.locator("#tl-chart .tl-snap").count() == 3 and page.locator("#tl-chart .tl-val").count() == 1

        # Side by side: the untrained model and the trained one, each with its recorded numbers.
        assert probabilities(page, "a") == recorded(records[0]) and probabilities(page, "b") == recorded(records[40])
        assert probabilities(page, "a") != probabilities(page, "b")
        map_a, map_b = "#tl-a .heatmap canvas", "#tl-b .heatmap canvas"
        assert pixels(page, map_a) != pixels(page, map_b)

        # The step slider: step 20 on the left, its probabilities and attention.
        before = pixels(page, map_a)
        page.fill("#tl-step-a", "1")
        expect(page.locator("#tl-a")).to_have_attribute("data-step", "20")
        assert page.inner_text("#tl-step-a-value") == "step 20"
        assert probabilities(page, "a") == recorded(records[20])
        assert pixels(page, map_a) != before

        # The axes carry the tokens, in order, on both sides of the map.
        tokens = [t["text"] for t in records[20]["probes"][0]["tokens"]]
        for axis in ("hm-keys", "hm-queries"):
            labels = page.eval_on_selector_all(f"#tl-a .{axis} span", "spans => spans.map(s => s.textContent)")
            assert labels == [shown(t) for t in tokens]

        # Hovering a cell: query token, key token and weight of layer 0, head 0 at step 20.
        box = page.locator(map_a).bounding_box()
        n, q, k = len(tokens), 5, 2
        page.mouse.move(box["x"] + (k + 0.5) * box["width"] / n, box["y"] + (q + 0.5) * box["height"] / n)
        weight = records[20]["probes"][0]["attention"][0]["heads"][0]["weights"][q][k]
        readout = page.inner_text("#tl-a .hm-readout")
        assert readout.startswith(f'query "{tokens[q]}" ({q}) \u2192 key "{tokens[k]}" ({k}): ')
        assert readout.endswith(f"{weight:.3f}")
        assert page.inner_text("#tl-a .hm-queries span.hot") == shown(tokens[q])

        # Hovering a token: the candidates recorded at the position before it.
        page.hover("#tl-a .tl-tokens .token >> nth=3")
        page.wait_for_selector("#tl-tooltip:not([hidden])")
        rows = page.eval_on_selector_all("#tl-tooltip tr", "rows => rows.map(r => r.cells[1].textContent)")
        assert rows == [f"{c['prob']:.3f}" for c in records[20]["probes"][0]["tokens"][2]["next"]]

        # Pin head 1 of layer 0, then look at layer 1: the pinned head stays, at both steps.
        page.select_option("#tl-head", "1")
        page.click("#tl-pin")
        page.select_option("#tl-layer", "1")
        expect(page.locator("#tl-a .heatmap")).to_have_attribute("data-layer", "1")
        pinned = page.locator("#tl-pinned .tl-pin")
        assert pinned.count() == 1 and pinned.get_attribute("data-layer") == "0"
        assert pinned.locator(".heatmap").evaluate_all("maps => maps.map(m => [m.dataset.step, m.dataset.head])") == [
            ["20", "1"], ["40", "1"]]
        assert pixels(page, "#tl-pinned .heatmap >> nth=0 >> canvas") != pixels(page, map_a)   # another layer

        # The other text: the training row, at the same steps.
        page.select_option("#tl-probe", "1")
        expect(page.locator("#tl-b .tl-tokens .token")).to_have_count(len(records[40]["probes"][1]["tokens"]))
        assert probabilities(page, "b") == recorded(records[40], probe=1)
        page.screenshot(path=str(tmp_path / "timeline.png"), full_page=True)
        assert (tmp_path / "timeline.png").stat().st_size > 10_000


def main() -> None:
    parser = argparse.ArgumentParser(description="Screenshot the training timeline of a model with snapshots.")
    parser.add_argument("--model", default="data/pretrain/model", help="a model folder or models:/NAME@ALIAS")
    parser.add_argument("--out", type=Path, default=Path("docs/timeline.png"))
    args = parser.parse_args()
    with running("--model", args.model, "--seed", "0") as server, browser_page() as page:
        page.goto(server.url)
        expect(page.locator("#tl-b .heatmap")).to_have_count(1, timeout=30_000)
        page.click("#tl-pin")                   # layer 0's head 0, kept beside the next layer's
        page.select_option("#tl-layer", "1")
        args.out.parent.mkdir(parents=True, exist_ok=True)
        page.locator("#timeline").screenshot(path=str(args.out))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
