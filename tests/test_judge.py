"""The judge client without a model: score parsing, the cache, the statistics, and bad endpoints.

Bad endpoints are real HTTP servers on 127.0.0.1 (garbage, slow, trickling, failing, down): the
judge must fail clearly or record an item as unscored, within a bounded time, never hang.
"""

from __future__ import annotations

import json
import math
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from llm.judge import (
    Judge,
    JudgeConfig,
    JudgeError,
    JudgementCache,
    JudgeUnavailable,
    calibration,
    mean_interval,
    mismatched,
    parse_score,
    request_body,
    rubric_messages,
    separation,
    win_rate,
)
from tests.conftest import free_port

# --- parsing ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("answer, expected", [
    ("85", 85),
    ("85.", 85),
    (" 85\n", 85),
    ("100", 100),
    ("0", 0),
    ("Score: 85", 85),
    ("score:85", 85),
    ("**Score:** 85", 85),
    ("The score is 72.", 72),
    ("Rating: 90/100", 90),
    ("85/100", 85),
    ("**85/100**", 85),
    ("85 / 100", 85),
    ("85 out of 100", 85),
    ("8/10", 80),
    ("I would rate it 7 out of 10.", 70),
    ("4/5", 80),
    ("85%", 85),
    ("`90`", 90),
    ("# 60", 60),
    ('{"score": 85}', 85),
    ('```json\n{"score": 40, "reason": "partly right"}\n```', 40),
    ("Score: 85\nThe response lists 3 of the 4 steps; a score of 100 would need all of them.", 85),
    ("The response misses two points. Final score: 40", 40),
    ("Score: 30. Final score: 35", 35),
    ("The response is accurate and complete. 95", 95),
    ("72.5", 72.5),
])
def test_parse_score_reads_many_answer_shapes(answer, expected):
    assert parse_score(answer) == expected


@pytest.mark.parametrize("answer", [
    "",
    "   ",
    None,
    "I cannot judge this response.",
    "Excellent!",
    "one hundred",
    "150",                      # out of range: not silently clipped
    "-5",
    "Score: 120",
    "12/10",
    "Between 70 and 80.",       # two different numbers, no label: ambiguous
    "1. Correct facts 2. Clear wording",
    '{"score": "high"}',
    '{"score": true}',
])
def test_parse_score_refuses_to_guess(answer):
    assert parse_score(answer) is None


def test_the_prompt_carries_the_item_and_asks_for_a_number():
    messages = rubric_messages("Add the numbers.", "2 and 3", "5", "6")
    prompt = messages[-1]["content"]
    assert "Instruction: Add the numbers.\nInput: 2 and 3\nReference answer: 5\nResponse to grade: 6" in prompt
    assert "one integer from 0 to 100" in prompt
    assert "Input:" not in rubric_messages("Say hi.", "", "hi", "hello")[-1]["content"]


def test_long_fields_are_clipped_to_fit_a_small_context():
    prompt = rubric_messages("x", "", "y" * 50_000, "z")[-1]["content"]
    assert len(prompt) < 5000 and "[...truncated]" in prompt


def test_requests_are_deterministic():
    config = JudgeConfig(base_url="http://127.0.0.1:1/v1", model="m", seed=7)
    body = request_body(config, [{"role": "user", "content": "hi"}])
    assert body["temperature"] == 0 and body["seed"] == 7 and body["stream"] is False


# --- cache --------------------------------------------------------------------------------------------

def test_cache_survives_a_restart_and_a_torn_last_line(tmp_path):
    path = tmp_path / "judgements.jsonl"
    body = {"model": "m", "messages": [{"role": "user", "content": "q"}]}
    cache = JudgementCache(path)
    cache.put(body, "85")
    with open(path, "a") as f:
        f.write('{"key": "abc", "answ')  # a crash mid-write
    reloaded = JudgementCache(path)
    assert reloaded.get(body) == "85" and len(reloaded) == 1


def test_cache_key_depends_on_the_judge_model_and_the_prompt():
    base = {"model": "a", "messages": [{"role": "user", "content": "q"}]}
    assert JudgementCache.key(base) == JudgementCache.key(json.loads(json.dumps(base)))
    assert JudgementCache.key(base) != JudgementCache.key({**base, "model": "b"})
    assert JudgementCache.key(base) != JudgementCache.key({**base, "messages": [{"role": "user", "content": "r"}]})


# --- statistics ---------------------------------------------------------------------------------------

def test_mean_interval_brackets_the_mean_and_skips_unscored():
    scores = [80, 90, None, 70, 100, 60, 85, None]
    interval = mean_interval(scores, seed=1)
    assert interval.n == 6
    assert interval.value == pytest.approx(sum([80, 90, 70, 100, 60, 85]) / 6)
    assert interval.low <= interval.value <= interval.high
    assert mean_interval(scores, seed=1) == interval  # seeded: reproducible
    assert math.isnan(mean_interval([None, None]).value) and mean_interval([]).n == 0


def test_bootstrap_interval_is_roughly_right_for_a_known_distribution():
    import numpy as np
    scores = np.random.default_rng(0).normal(50, 10, 400).tolist()
    interval = mean_interval(scores, n_boot=1000, seed=0)
    half_width = (interval.high - interval.low) / 2
    assert half_width == pytest.approx(1.96 * 10 / 20, rel=0.2)  # 1.96 * sigma / sqrt(n)


def test_separation_is_paired_and_drops_items_with_an_unscored_side():
    reference = [90, 80, None, 100]
    wrong = [10, None, 30, 20]
    gap = separation(reference, wrong, seed=0)
    assert gap.n == 2 and gap.value == pytest.approx((90 + 100) / 2 - (10 + 20) / 2)
    assert gap.low <= gap.value <= gap.high
    with pytest.raises(ValueError):
        separation([1, 2], [1])


def test_win_rate_counts_ties_as_half():
    result = win_rate([90, 50, 70, None], [80, 50, 90, 10], seed=0)
    assert (result["wins"], result["ties"], result["losses"], result["n"]) == (1, 1, 1, 3)
    assert result["rate"] == pytest.approx(0.5)
    assert win_rate([None], [None])["rate"] is None


def test_calibration_flags_a_judge_that_cannot_separate():
    good = calibration([90, 95, 85, 100], [10, 20, 5, 30], min_separation=30)
    assert good["reliable"] and good["ratio"] > 2
    blind = calibration([90, 95, 85, 100], [90, 90, 85, 100], min_separation=30)
    assert not blind["reliable"]
    nothing = calibration([None, None], [None, None], min_separation=30)
    assert not nothing["reliable"] and nothing["separation"]["value"] is None
    json.dumps(good), json.dumps(nothing)  # metrics-ready: no NaN/inf


def test_mismatched_never_gives_an_item_its_own_reference():
    items = [{"instruction": f"q{i}", "reference": f"a{i}", "response": f"r{i}"} for i in range(7)]
    for seed in range(20):
        shuffled = mismatched(items, seed)
        assert all(s["response"] != s["reference"] for s in shuffled)
        assert sorted(s["response"] for s in shuffled) == sorted(i["reference"] for i in items)
    assert items[0]["response"] == "r0"  # the input is left alone


# --- endpoints, good and bad ----------------------------------------------------------------------------

class FakeJudge:
    """A chat-completions server whose behaviour a test sets: a list of answers, or a failure mode."""

    def __init__(self):
        self.answers: list[str] = []
        self.mode = "ok"
        self.requests: list[dict] = []
        self.headers: list[dict] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                fake.requests.append(body)
                fake.headers.append(dict(self.headers))
                fake.respond(self)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def respond(self, handler: BaseHTTPRequestHandler) -> None:
        mode = self.mode
        if mode == "slow":
            time.sleep(3)
            return
        if mode == "trickle":  # headers at once, then a byte every 0.2 s: no single read times out
            handler.send_response(200)
            handler.send_header("Content-Length", "1000")
            handler.end_headers()
            try:
                for _ in range(1000):
                    handler.wfile.write(b" ")
                    handler.wfile.flush()
                    time.sleep(0.2)
            except OSError:  # the judge hung up at its deadline, as it should
                pass
            return
        status, payload = {
            "garbage": (200, b"<html>502 Bad Gateway</html>"),
            "wrong-shape": (200, json.dumps({"choices": []}).encode()),
            "error500": (500, b'{"error": "model crashed"}'),
            "error401": (401, b'{"error": "invalid api key"}'),
        }.get(mode, (200, None))
        if payload is None:
            content = self.answers.pop(0) if self.answers else "50"
            choice = {"message": {"role": "assistant", "content": content}}
            if isinstance(content, dict):  # {token: probability}: the first token's top logprobs
                top = [{"token": t, "logprob": math.log(p)} for t, p in content.items()]
                choice = {"message": {"role": "assistant", "content": top[0]["token"]},
                          "logprobs": {"content": [{"token": top[0]["token"], "logprob": top[0]["logprob"],
                                                    "top_logprobs": top}]}}
            payload = json.dumps({"choices": [choice]}).encode()
        handler.send_response(status)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(payload)))
        handler.end_headers()
        handler.wfile.write(payload)

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def fake():
    server = FakeJudge()
    yield server
    server.close()


def make_judge(url: str, tmp_path=None, **overrides) -> Judge:
    settings = dict(base_url=url, model="fake-judge", timeout_s=1.0, retries=1, backoff_s=0.05, scoring="rubric",
                    cache_path=str(tmp_path / "cache.jsonl") if tmp_path else None)
    return Judge(JudgeConfig(**{**settings, **overrides}))


ITEM = {"instruction": "Name the capital of France.", "input": "", "reference": "Paris.", "response": "Paris"}


def test_a_good_answer_is_scored_and_a_rerun_costs_nothing(fake, tmp_path):
    fake.answers = ["Score: 90"]
    records = make_judge(fake.url, tmp_path).score_items([ITEM])
    assert records[0]["score"] == 90 and records[0]["status"] == "scored" and not records[0]["cached"]
    assert records[0]["response"] == "Paris" and records[0]["judge_model"] == "fake-judge"
    fake.mode = "error500"  # the endpoint is now broken, but the judgement is in the cache
    again = make_judge(fake.url, tmp_path)
    assert again.score_items([ITEM])[0]["score"] == 90 and again.requests_sent == 0
    assert len(fake.requests) == 1


def test_an_unreadable_answer_gets_one_stricter_question(fake):
    fake.answers = ["The response is quite good.", "85"]
    record = make_judge(fake.url).score_items([ITEM])[0]
    assert record["score"] == 85 and record["judge_answers"] == ["The response is quite good.", "85"]
    follow_up = fake.requests[1]["messages"]
    assert follow_up[-2] == {"role": "assistant", "content": "The response is quite good."}
    assert "nothing but one integer" in follow_up[-1]["content"]


def test_two_unreadable_answers_leave_the_item_unscored(fake, tmp_path):
    fake.answers = ["Good answer.", "It is fine, really."]
    record = make_judge(fake.url, tmp_path).score_items([ITEM])[0]
    assert record["score"] is None and record["status"] == "unscored" and len(fake.requests) == 2
    # ...and the unscored verdict is cached too: a re-run asks nothing
    assert make_judge(fake.url, tmp_path).score_items([ITEM])[0]["status"] == "unscored"
    assert len(fake.requests) == 2


@pytest.mark.parametrize("mode", ["garbage", "wrong-shape", "error500", "slow", "trickle"])
def test_a_bad_endpoint_fails_clearly_after_retries_within_bounded_time(fake, mode):
    fake.mode = mode
    started = time.monotonic()
    with pytest.raises(JudgeUnavailable, match="failed 2 times"):
        make_judge(fake.url).score_items([ITEM])
    # two attempts of at most 1 s each, a 0.05 s pause, and slack for a loaded machine
    assert time.monotonic() - started < 6
    assert len(fake.requests) == 2


def test_a_down_endpoint_fails_clearly():
    started = time.monotonic()
    with pytest.raises(JudgeUnavailable, match="ConnectionRefusedError"):
        make_judge(f"http://127.0.0.1:{free_port()}/v1").score_items([ITEM])
    assert time.monotonic() - started < 5


def test_a_rejected_request_is_not_retried(fake):
    fake.mode = "error401"
    with pytest.raises(JudgeError, match="HTTP 401"):
        make_judge(fake.url).score_items([ITEM])
    assert len(fake.requests) == 1


def test_the_api_key_comes_from_the_named_environment_variable(fake, monkeypatch):
    monkeypatch.setenv("MY_JUDGE_KEY", "sk-test")
    make_judge(fake.url, api_key_env="MY_JUDGE_KEY").score_items([ITEM])
    assert fake.headers[0]["Authorization"] == "Bearer sk-test"
    monkeypatch.delenv("MY_JUDGE_KEY")
    with pytest.raises(JudgeError, match=r"\$MY_JUDGE_KEY"):
        make_judge(fake.url, api_key_env="MY_JUDGE_KEY").score_items([ITEM])


def test_no_key_is_sent_unless_configured(fake):
    make_judge(fake.url).score_items([ITEM])
    assert "Authorization" not in fake.headers[0]


# --- scoring yes_probability: 100 x P(Yes) from the first token's logprobs ------------------------------

def test_the_verdict_score_is_the_probability_of_yes_among_yes_and_no(fake, tmp_path):
    fake.answers = [{"Yes": 0.6, "No": 0.2, " yes": 0.1, "Maybe": 0.05}]
    record = make_judge(fake.url, tmp_path, scoring="yes_probability").score_items([ITEM])[0]
    assert record["score"] == pytest.approx(100 * 0.7 / 0.9, abs=0.01) and record["status"] == "scored"
    body = fake.requests[0]
    assert body["max_tokens"] == 1 and body["logprobs"] is True and body["top_logprobs"] == 10
    assert "Reply Yes or No" in body["messages"][-1]["content"] and "Paris." in body["messages"][-1]["content"]
    again = make_judge(fake.url, tmp_path, scoring="yes_probability")  # cached: nothing asked
    assert again.score_items([ITEM])[0]["score"] == record["score"] and again.requests_sent == 0


def test_a_verdict_that_is_neither_yes_nor_no_gets_one_stricter_question(fake):
    fake.answers = [{"The": 0.7, "Yes": 0.1}, {"No": 0.9, "Yes": 0.05}]
    record = make_judge(fake.url, scoring="yes_probability").score_items([ITEM])[0]
    assert record["score"] == pytest.approx(100 * 0.05 / 0.95, abs=0.01)
    follow_up = fake.requests[1]["messages"]
    assert follow_up[-2] == {"role": "assistant", "content": "The"}
    assert follow_up[-1]["content"] == "Reply with one word: Yes or No."
    fake.answers = [{"The": 0.9}, {"Sure": 0.9}]
    assert make_judge(fake.url, scoring="yes_probability").score_items([ITEM])[0]["status"] == "unscored"


def test_an_endpoint_without_logprobs_is_told_to_use_the_rubric(fake):
    fake.answers = ["Yes"]  # a plain answer: no logprobs in it
    with pytest.raises(JudgeError, match="judge.scoring: rubric"):
        make_judge(fake.url, scoring="yes_probability").score_items([ITEM])
    assert len(fake.requests) == 1  # not retried: asking again would not help


def test_an_unknown_scoring_method_is_refused():
    with pytest.raises(ValueError, match="scoring must be one of"):
        JudgeConfig(base_url="http://127.0.0.1:1/v1", model="m", scoring="vibes")
