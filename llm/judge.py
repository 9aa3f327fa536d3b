"""LLM-as-judge: score a response against its reference with any OpenAI-compatible chat endpoint.

Raschka's chapter 7 asks a larger model for a 0-100 score of each response given the instruction
and the correct output. This module does that for any server that speaks `/v1/chat/completions`
(OpenAI, vLLM, llama.cpp, the local default judge of `llm.judge_server`), in one of two ways:
`yes_probability` (default) asks "is the candidate a correct answer? Yes or No" and scores
100 x P(Yes) from the first token's logprobs; `rubric` asks for the number itself. Either way,
with the care a judge needs to be trusted:

- Deterministic requests (temperature 0, fixed seed), so a judgement can be cached and replayed.
- Robust parsing: an answer that holds no clear score gets one stricter follow-up question; if that
  fails too the item is recorded as unscored, never given a made-up number.
- Bounded waiting: every request has a total deadline and a fixed number of retries. An endpoint
  that is down, slow or answers garbage ends in `JudgeUnavailable`, never a hang.
- A cache of raw answers keyed by (judge model, request), so re-running the judge costs nothing.
- Calibration: bootstrap intervals for means, the separation between reference answers and
  mismatched ones, and win rates, to measure the judge before trusting it.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import math
import os
import re
import socket
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

import numpy as np

SCORE_MIN, SCORE_MAX = 0.0, 100.0
SCORING_METHODS = ("yes_probability", "rubric")


class JudgeError(RuntimeError):
    """The judge cannot work as configured (bad URL, rejected key, unknown model). Retrying won't help."""


class JudgeUnavailable(JudgeError):
    """The endpoint stayed down, slow or unintelligible through every retry."""


# --- configuration ------------------------------------------------------------------------------

@dataclass(frozen=True)
class JudgeConfig:
    base_url: str                       # up to and including /v1, as OpenAI clients write it
    model: str                          # sent in each request and part of every cache key
    api_key_env: Optional[str] = None   # name of the environment variable holding the key, if any
    api_key: Optional[str] = None       # or the key itself (takes precedence; never logged)
    timeout_s: float = 60.0             # total time allowed for one HTTP request
    retries: int = 2                    # extra attempts after a transient failure
    backoff_s: float = 1.0              # first pause between attempts; doubles each time
    max_tokens: int = 64                # a score needs a few tokens; a chatty judge gets room for one sentence
    scoring: str = "yes_probability"    # or "rubric": ask for a 0-100 number (see VERDICT below)
    seed: int = 1337
    cache_path: Optional[str] = None    # JSONL file of past judgements; None = no cache

    def __post_init__(self) -> None:
        if self.scoring not in SCORING_METHODS:
            raise ValueError(f"scoring must be one of {SCORING_METHODS}, got {self.scoring!r}")

    def resolved_api_key(self) -> Optional[str]:
        if self.api_key:
            return self.api_key
        if not self.api_key_env:
            return None
        key = os.environ.get(self.api_key_env)
        if not key:
            raise JudgeError(f"the judge's API key is read from ${self.api_key_env}, which is not set")
        return key


# --- the rubric ---------------------------------------------------------------------------------

# scoring "rubric", for endpoints without logprobs. Chosen by measurement with the default 1.5B
# judge on 10 hand-picked items (mean score of reference answers / of mismatched answers): this
# prompt 100 / 35 (on 40 default Alpaca items, though: 100 / 78; see VERDICT). Without the "scores 0, however well written"
# sentence: 100 / 55; with the response shown before the reference: 100 / 75; asking for one
# sentence of reasoning before the score: 40 / 0 (it argued itself out of correct answers).
SYSTEM_PROMPT = "You are a strict grader."

RUBRIC = """You will grade a response to an instruction by comparing it with the correct reference answer.

Instruction: {instruction}{input_line}
Reference answer: {reference}
Response to grade: {response}

A response that does not answer this instruction, or that contradicts the reference, scores 0, however well written it is.
Score from 0 to 100:
100 = says the same as the reference (wording may differ)
75 = mostly the same, small errors or omissions
50 = partly correct
25 = mostly wrong but on topic
0 = wrong, off-topic or empty

Reply with the score only: one integer from 0 to 100."""

STRICT_FOLLOW_UP = ("Your reply could not be read as a score. Reply with nothing but one integer "
                    "from 0 to 100, for example: 40")


MAX_FIELD_CHARS = 3000  # keeps every prompt inside a small judge's context window (HTTP 400 otherwise)


def _clip(text: str) -> str:
    text = (text or "").strip()
    return text if len(text) <= MAX_FIELD_CHARS else text[:MAX_FIELD_CHARS] + " [...truncated]"


def rubric_messages(instruction: str, input_text: str, reference: str, response: str) -> list[dict]:
    input_line = f"\nInput: {_clip(input_text)}" if input_text and input_text.strip() else ""
    prompt = RUBRIC.format(instruction=_clip(instruction), input_line=input_line,
                           reference=_clip(reference), response=_clip(response) or "(empty)")
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": prompt}]


def strict_messages(messages: list[dict], first_answer: str) -> list[dict]:
    """The same conversation, plus the unreadable answer and a demand for a bare number."""
    return [*messages, {"role": "assistant", "content": first_answer},
            {"role": "user", "content": STRICT_FOLLOW_UP}]


# --- the yes/no verdict (the default) ------------------------------------------------------------

# Measured with the default 1.5B judge on 40 default items: asked for a 0-100 number (RUBRIC and
# two other phrasings), it gave the references of *other* items 67-78 on average, references 100:
# it cannot write a calibrated number. Asked "Yes or No", its probability of "Yes" (x 100) gave
# mismatched answers 26 and references 91 (12 and 6 items). So the default score is that
# probability, read from the first token's top logprobs (max_tokens 1, hence also fast).
VERDICT = """Instruction: {instruction}{input_line}

Correct answer: {reference}

Candidate answer: {response}

Is the candidate answer a correct answer to this instruction, saying what the correct answer says? Reply Yes or No."""

STRICT_VERDICT = "Reply with one word: Yes or No."
VERDICT_TOP_LOGPROBS = 10
MIN_VERDICT_MASS = 0.5   # less probability than this on Yes + No: the judge meant something else


def verdict_messages(instruction: str, input_text: str, reference: str, response: str) -> list[dict]:
    input_line = f"\nInput: {_clip(input_text)}" if input_text and input_text.strip() else ""
    prompt = VERDICT.format(instruction=_clip(instruction), input_line=input_line,
                            reference=_clip(reference), response=_clip(response) or "(empty)")
    return [{"role": "user", "content": prompt}]


def yes_probability(answer: str) -> Optional[float]:
    """100 x P(yes) / (P(yes) + P(no)) from the first token's top logprobs (the JSON list of
    [token, logprob] the endpoint returned); None when Yes and No hold too little probability."""
    yes = no = 0.0
    for token, logprob in json.loads(answer):
        word = token.strip().lower()
        if word == "yes":
            yes += math.exp(logprob)
        elif word == "no":
            no += math.exp(logprob)
    if yes + no < MIN_VERDICT_MASS:
        return None
    return round(SCORE_MAX * yes / (yes + no), 2)


def strict_verdict_messages(messages: list[dict], first_answer: str) -> list[dict]:
    """The same conversation, plus the judge's likeliest first token and a demand for Yes or No."""
    top = max(json.loads(first_answer), key=lambda pair: pair[1], default=["", 0.0])[0]
    return [*messages, {"role": "assistant", "content": top or "(nothing)"},
            {"role": "user", "content": STRICT_VERDICT}]


# --- reading a score out of an answer -----------------------------------------------------------

_NUMBER = r"[-+]?\d+(?:\.\d+)?"
_SCALED = re.compile(rf"({_NUMBER})\s*(?:/|out\s+of)\s*(5|10|100)(?!\d|\.\d)")
_LABELLED = re.compile(rf"(final\s+)?(?:score|rating|grade)\s*(?:is|of|:|=|-)?\s*({_NUMBER})"
                       rf"(?:\s*(?:/|out\s+of)\s*(5|10|100)(?!\d|\.\d))?")
_ANY_NUMBER = re.compile(rf"(?<![\w.]){_NUMBER}(?![\w]|\.\d)")


def parse_score(answer: str) -> Optional[float]:
    """The 0-100 score an answer states, or None when it states none or is ambiguous.

    Accepts "85", "Score: 85", "**85/100**", "8/10" (scaled to 80), "85%", '{"score": 85}',
    and a score followed by an explanation. Refuses out-of-range numbers and answers with several
    different numbers and no label saying which one is the score: a guess would be a silent score.
    """
    text = re.sub(r"[*_`#]", "", answer or "").strip().lower()
    if not text:
        return None
    for reader in (_from_json, _from_label, _from_scaled, _from_lone_number):
        found = reader(text)
        if found is not None:
            return found if SCORE_MIN <= found <= SCORE_MAX and math.isfinite(found) else None
    return None


def _scaled(value: str, scale: Optional[str]) -> float:
    return float(value) * (100.0 / float(scale)) if scale else float(value)


def _from_json(text: str) -> Optional[float]:
    match = re.search(r"\{.*\}", text, re.S)
    if not match:
        return None
    try:
        data = json.loads(match.group(0))
    except ValueError:
        return None
    if isinstance(data, dict):
        for key in ("score", "rating", "grade"):
            if isinstance(data.get(key), (int, float)) and not isinstance(data.get(key), bool):
                return float(data[key])
    return None


def _from_label(text: str) -> Optional[float]:
    matches = list(_LABELLED.finditer(text))
    if not matches:
        return None
    # A "final score" outranks earlier mentions; otherwise the first labelled number is the answer
    # (later ones tend to be part of an explanation: "a score of 100 would need ...").
    final = [m for m in matches if m.group(1)]
    chosen = (final or matches)[-1 if final else 0]
    return _scaled(chosen.group(2), chosen.group(3))


def _from_scaled(text: str) -> Optional[float]:
    values = {_scaled(m.group(1), m.group(2)) for m in _SCALED.finditer(text)}
    return values.pop() if len(values) == 1 else None


def _from_lone_number(text: str) -> Optional[float]:
    values = {float(m.group(0)) for m in _ANY_NUMBER.finditer(text)}
    return values.pop() if len(values) == 1 else None


# --- talking to the endpoint --------------------------------------------------------------------

class _Transient(Exception):
    """A failure worth another attempt: refused connection, timeout, 5xx/429, unreadable body."""


def chat_completion(config: JudgeConfig, messages: list[dict], logprobs: bool = False) -> str:
    """The assistant text the endpoint returns (with logprobs: the JSON list of the first token's
    top [token, logprob] pairs), after up to `config.retries` retries."""
    body = request_body(config, messages, logprobs)
    last: Exception | None = None
    for attempt in range(config.retries + 1):
        if attempt:
            time.sleep(config.backoff_s * 2 ** (attempt - 1))
        try:
            return _post_once(config, body)
        except _Transient as err:
            last = err
    raise JudgeUnavailable(f"judge endpoint {config.base_url} (model {config.model!r}) failed "
                           f"{config.retries + 1} times; last error: {last}")


def request_body(config: JudgeConfig, messages: list[dict], logprobs: bool = False) -> dict:
    body = {"model": config.model, "messages": messages, "temperature": 0, "seed": config.seed,
            "max_tokens": config.max_tokens, "stream": False}
    if logprobs:
        body.update(max_tokens=1, logprobs=True, top_logprobs=VERDICT_TOP_LOGPROBS)
    return body


def _post_once(config: JudgeConfig, body: dict) -> str:
    url = urllib.parse.urlsplit(config.base_url.rstrip("/") + "/chat/completions")
    if url.scheme not in ("http", "https") or not url.hostname:
        raise JudgeError(f"judge base_url {config.base_url!r} is not an http(s) URL")
    headers = {"Content-Type": "application/json", "Accept": "application/json"}
    if key := config.resolved_api_key():
        headers["Authorization"] = f"Bearer {key}"
    status, raw = _http_post(url, json.dumps(body).encode(), headers, config.timeout_s)
    if status == 429 or status >= 500:
        raise _Transient(f"HTTP {status}: {_snippet(raw)}")
    if status != 200:
        # 400/401/403/404: the request itself is wrong (model name, key, URL). Retrying won't help.
        raise JudgeError(f"judge endpoint {config.base_url} answered HTTP {status}: {_snippet(raw)}")
    return _first_token_logprobs(raw, config) if body.get("logprobs") else _assistant_text(raw)


def _http_post(url: urllib.parse.SplitResult, payload: bytes, headers: dict,
               timeout_s: float) -> tuple[int, bytes]:
    """POST and read the whole answer within `timeout_s` (after connecting), or raise _Transient.

    A socket timeout bounds each read, not the total: a server that trickles a byte every few
    seconds would never time out. A timer that shuts the socket down at the deadline bounds it.
    """
    connection_class = http.client.HTTPSConnection if url.scheme == "https" else http.client.HTTPConnection
    connection = connection_class(url.hostname, url.port, timeout=timeout_s)
    expired = threading.Event()
    timer = None
    try:
        connection.connect()
        timer = threading.Timer(timeout_s, _abort, (connection.sock, expired))
        timer.daemon = True
        timer.start()
        connection.request("POST", url.path + (f"?{url.query}" if url.query else ""), payload, headers)
        response = connection.getresponse()
        raw = response.read()
    except (OSError, http.client.HTTPException) as err:  # refused, reset, timed out, broken HTTP
        raise _Transient(f"no answer within {timeout_s:g} s" if expired.is_set()
                         else f"{type(err).__name__}: {err}") from None
    finally:
        if timer is not None:
            timer.cancel()
        connection.close()
    if expired.is_set():  # the shutdown can look like a normal end of a truncated body
        raise _Transient(f"no complete answer within {timeout_s:g} s")
    return response.status, raw


def _abort(sock: socket.socket, expired: threading.Event) -> None:
    expired.set()
    try:
        sock.shutdown(socket.SHUT_RDWR)  # wakes up the blocked read at once
    except OSError:
        pass


def _assistant_text(raw: bytes) -> str:
    try:
        content = json.loads(raw)["choices"][0]["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError):
        raise _Transient(f"not a chat completion: {_snippet(raw)}") from None
    if not isinstance(content, str):
        raise _Transient(f"no text in the chat completion: {_snippet(raw)}")
    return content


def _first_token_logprobs(raw: bytes, config: JudgeConfig) -> str:
    try:
        choice = json.loads(raw)["choices"][0]
    except (ValueError, KeyError, IndexError, TypeError):
        raise _Transient(f"not a chat completion: {_snippet(raw)}") from None
    try:
        top = choice["logprobs"]["content"][0]["top_logprobs"]
        pairs = [[entry["token"], float(entry["logprob"])] for entry in top]
    except (KeyError, IndexError, TypeError, ValueError):
        raise JudgeError(f"judge endpoint {config.base_url} (model {config.model!r}) returned no top logprobs, "
                         "which judge scoring 'yes_probability' reads; set judge.scoring: rubric for this "
                         f"endpoint. Its answer: {_snippet(raw)}") from None
    return json.dumps(pairs)


def _snippet(raw: bytes, limit: int = 200) -> str:
    text = raw.decode("utf-8", "replace").strip()
    return text if len(text) <= limit else text[:limit] + "..."


# --- the cache of judgements --------------------------------------------------------------------

class JudgementCache:
    """Raw judge answers keyed by (judge model, request), one JSON object a line.

    Raw answers are kept, not scores, so a better parser re-reads old judgements for free. Each
    answer is appended and flushed as soon as it arrives: a run that dies half-way keeps what it
    paid for. A torn last line (a crash mid-write) is skipped on load.
    """

    def __init__(self, path: Optional[str | Path]):
        self.path = Path(path) if path else None
        self._answers: dict[str, str] = {}
        if self.path and self.path.exists():
            self._load()

    @staticmethod
    def key(body: dict) -> str:
        return hashlib.sha256(json.dumps(body, sort_keys=True, ensure_ascii=False).encode()).hexdigest()

    def get(self, body: dict) -> Optional[str]:
        return self._answers.get(self.key(body))

    def put(self, body: dict, answer: str) -> None:
        key = self.key(body)
        self._answers[key] = answer
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        line = json.dumps({"key": key, "model": body["model"], "answer": answer}, ensure_ascii=False)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())

    def __len__(self) -> int:
        return len(self._answers)

    def _load(self) -> None:
        with open(self.path, encoding="utf-8") as f:
            for line in f:
                try:
                    entry = json.loads(line)
                    self._answers[entry["key"]] = entry["answer"]
                except (ValueError, KeyError, TypeError):
                    continue


# --- judging ------------------------------------------------------------------------------------

@dataclass
class Judge:
    """A configured judge with its cache; `score` judges one response, `score_items` many."""

    config: JudgeConfig
    cache: JudgementCache = field(init=False)
    requests_sent: int = field(default=0, init=False)  # answers fetched from the endpoint, not the cache

    def __post_init__(self) -> None:
        self.cache = JudgementCache(self.config.cache_path)

    def ask(self, messages: list[dict], logprobs: bool = False) -> tuple[str, bool]:
        """The judge's answer to these messages and whether it came from the cache."""
        body = request_body(self.config, messages, logprobs)
        cached = self.cache.get(body)
        if cached is not None:
            return cached, True
        answer = chat_completion(self.config, messages, logprobs)
        self.requests_sent += 1
        self.cache.put(body, answer)
        return answer, False

    def score(self, instruction: str, input_text: str, reference: str, response: str) -> dict:
        """One judgement: score (None when unscored), the raw answers and how many were asked."""
        verdict = self.config.scoring == "yes_probability"
        ask_messages, read, follow_up = ((verdict_messages, yes_probability, strict_verdict_messages) if verdict
                                         else (rubric_messages, parse_score, strict_messages))
        messages = ask_messages(instruction, input_text, reference, response)
        answer, cached = self.ask(messages, logprobs=verdict)
        answers = [answer]
        score = read(answer)
        if score is None:
            answer, cached_again = self.ask(follow_up(messages, answer), logprobs=verdict)
            answers.append(answer)
            cached = cached and cached_again
            score = read(answer)
        return {"score": score, "status": "scored" if score is not None else "unscored",
                "judge_answers": answers, "cached": cached}

    def score_items(self, items: Iterable[dict],
                    progress: Optional[Callable[[int, dict], None]] = None) -> list[dict]:
        """Judge each {instruction, input, reference, response} item; one record per item, in order.

        Records carry the item's fields, the score (None if unscored) and the judge's raw answers.
        An endpoint that stays unavailable raises JudgeUnavailable; answers received before that
        are in the cache, so a re-run resumes where this one stopped.
        """
        records = []
        for index, item in enumerate(items):
            judgement = self.score(item["instruction"], item.get("input", "") or "",
                                   item["reference"], item["response"])
            record = {**item, "judge_model": self.config.model, **judgement}
            records.append(record)
            if progress:
                progress(index, record)
        return records


def mismatched(items: Sequence[dict], seed: int) -> list[dict]:
    """The items with each response replaced by the reference of another item (calibration).

    A random cycle over the items, so no item keeps its own reference, whatever the seed.
    """
    if len(items) < 2:
        raise ValueError("mismatched answers need at least two items")
    order = np.random.default_rng(seed).permutation(len(items))
    shuffled = [dict(item) for item in items]
    for position, index in enumerate(order):
        donor = items[order[(position + 1) % len(order)]]
        shuffled[index]["response"] = donor["reference"]
    return shuffled


# --- calibration statistics ---------------------------------------------------------------------

@dataclass(frozen=True)
class Interval:
    value: float  # the statistic on the data itself
    low: float    # bootstrap percentile interval
    high: float
    n: int        # items it rests on (unscored ones left out)

    def as_dict(self) -> dict:
        """JSON-ready: NaN (nothing scored) becomes null, which metrics files can hold."""
        return {"value": _finite(self.value), "low": _finite(self.low), "high": _finite(self.high),
                "n": self.n}


def _finite(value: float) -> Optional[float]:
    return None if value is None or not math.isfinite(value) else round(float(value), 4)


def _bootstrap(statistic: Callable[[np.ndarray], float], n: int, n_boot: int, seed: int,
               level: float) -> tuple[float, float]:
    """Percentile interval of `statistic(indices)` over resampled item indices."""
    rng = np.random.default_rng(seed)
    draws = np.array([statistic(rng.integers(0, n, n)) for _ in range(n_boot)])
    tail = (1.0 - level) / 2.0 * 100.0
    return float(np.percentile(draws, tail)), float(np.percentile(draws, 100.0 - tail))


def _scored(values: Sequence[Optional[float]]) -> np.ndarray:
    return np.array([v for v in values if v is not None], dtype=float)


def _pairs(a: Sequence[Optional[float]], b: Sequence[Optional[float]]) -> tuple[np.ndarray, np.ndarray]:
    """Aligned scores of the same items where both are scored."""
    if len(a) != len(b):
        raise ValueError(f"paired scores need equal lengths, got {len(a)} and {len(b)}")
    kept = [(x, y) for x, y in zip(a, b) if x is not None and y is not None]
    return np.array([x for x, _ in kept], dtype=float), np.array([y for _, y in kept], dtype=float)


def mean_interval(scores: Sequence[Optional[float]], n_boot: int = 2000, seed: int = 0,
                  level: float = 0.95) -> Interval:
    """Mean of the scored values with a bootstrap interval; NaN when nothing was scored."""
    values = _scored(scores)
    if len(values) == 0:
        return Interval(math.nan, math.nan, math.nan, 0)
    low, high = _bootstrap(lambda idx: values[idx].mean(), len(values), n_boot, seed, level)
    return Interval(float(values.mean()), low, high, len(values))


def separation(reference_scores: Sequence[Optional[float]], mismatched_scores: Sequence[Optional[float]],
               n_boot: int = 2000, seed: int = 0, level: float = 0.95) -> Interval:
    """Mean score of reference answers minus that of mismatched ones, on the same items.

    Paired bootstrap over items: both scores of an item travel together, which is what makes the
    interval honest when some items are simply easier to score high.
    """
    ref, mis = _pairs(reference_scores, mismatched_scores)
    if len(ref) == 0:
        return Interval(math.nan, math.nan, math.nan, 0)
    low, high = _bootstrap(lambda idx: ref[idx].mean() - mis[idx].mean(), len(ref), n_boot, seed, level)
    return Interval(float(ref.mean() - mis.mean()), low, high, len(ref))


def win_rate(a_scores: Sequence[Optional[float]], b_scores: Sequence[Optional[float]],
             n_boot: int = 2000, seed: int = 0, level: float = 0.95) -> dict:
    """How often A scores above B on the same item (ties count half), with a bootstrap interval."""
    a, b = _pairs(a_scores, b_scores)
    outcome = np.where(a > b, 1.0, np.where(a == b, 0.5, 0.0))
    counts = {"wins": int((a > b).sum()), "ties": int((a == b).sum()), "losses": int((a < b).sum())}
    if len(outcome) == 0:
        return {"rate": None, "low": None, "high": None, "n": 0, **counts}
    low, high = _bootstrap(lambda idx: outcome[idx].mean(), len(outcome), n_boot, seed, level)
    return {"rate": _finite(outcome.mean()), "low": _finite(low), "high": _finite(high),
            "n": len(outcome), **counts}


def calibration(reference_scores: Sequence[Optional[float]], mismatched_scores: Sequence[Optional[float]],
                min_separation: float, seed: int = 0) -> dict:
    """The judge's own report card: can it tell a correct answer from a wrong one, on these items?

    `reliable` is False when the separation is below `min_separation` or nothing could be paired;
    the interval is reported beside it, so a reader sees how firm that verdict is.
    """
    reference = mean_interval(reference_scores, seed=seed)
    wrong = mean_interval(mismatched_scores, seed=seed)
    gap = separation(reference_scores, mismatched_scores, seed=seed)
    ratio = reference.value / wrong.value if wrong.n and reference.n and wrong.value > 0 else None
    return {"reference_mean": reference.as_dict(), "mismatched_mean": wrong.as_dict(),
            "separation": gap.as_dict(), "ratio": _finite(ratio) if ratio is not None else None,
            "min_separation": min_separation,
            "reliable": bool(gap.n > 0 and gap.value >= min_separation)}
