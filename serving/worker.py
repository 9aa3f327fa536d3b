"""The generation worker: a LitServe worker process whose loop is our continuous batching engine.

LitServe runs each LitAPI in worker processes and feeds them from a request queue through a
"loop". Its batching loops either finish a whole batch before taking newcomers (static
batching) or, for its ContinuousBatchingLoop, spin on an empty queue (91% of a core idle,
measured). EngineLoop replaces them:

    idle:     block until a request arrives (no busy-spinning)
    running:  take waiting requests into free batch rows (one padded prefill for all of them),
              then decode one token for every row; rows leave the moment they finish
    always:   drop requests whose client went away (cancellation queue, one per worker)

Each job's tokens become text in a TextStream (stop strings, UTF-8, logprob entries). Updates go
back through LitServe's transport: streams at most every `stream_interval` (the first token at
once), non-streamed requests once, when finished.

LitServe's queues live in a multiprocessing manager process: every get and put is a round trip
to it (~60 us on an idle machine, milliseconds on a busy one; 17% of the loop's time at 32
clients, measured). Two threads take those waits off the decoding loop: an inbox fetching
requests ahead (a bounded number, so other workers keep their share) and an outbox sending
updates in order.
"""

from __future__ import annotations

import ctypes
import logging
import os
import queue
import signal
import threading
import time
import traceback
from dataclasses import dataclass, replace

import litserve as ls
import torch
from litserve.loops.base import LitLoop
from litserve.utils import LitAPIStatus, LoopResponseType

from llm.chat import stop_token_ids
from llm.generate import Engine, Sequence, room_for_new_tokens
from serving.loading import load_model_dir
from serving.options import ServeOptions
from serving.schemas import Job
from serving.text import TextStream

logger = logging.getLogger(__name__)

CANCELLED_MEMORY_S = 600.0  # how long a cancellation is remembered for a job not seen yet


def die_with_parent() -> None:
    """Have the kernel stop this worker if the server process dies, however it dies (Linux)."""
    parent = os.getppid()
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return  # not Linux: the server's own shutdown is the only guard
    if os.getppid() != parent:  # it died before prctl took effect
        os._exit(1)


def worker_threads(options: ServeOptions) -> int:
    """torch threads per worker: leave a core to the HTTP process."""
    return options.threads or max(1, (os.cpu_count() or 1) // (options.workers + 1))


class GenerationAPI(ls.LitAPI):
    """Holds, in each worker process, the model, the tokenizer and the engine."""

    def __init__(self, options: ServeOptions, spec, cancel_queues: list):
        super().__init__(spec=spec, loop=EngineLoop(), max_batch_size=options.limits.max_batch_size)
        self.options = options
        self.cancel_queues = cancel_queues

    def setup(self, device):
        # Ctrl-C reaches the whole process group; the main process then stops the workers itself.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        die_with_parent()
        torch.set_num_threads(worker_threads(self.options))
        model, self.tokenizer = load_model_dir(self.options.model_dir, device)
        self.engine = Engine(model, self.options.limits.max_batch_size, seed=self.options.seed,
                             vocab_limit=self.tokenizer.vocab_size)
        self.stop_ids = frozenset(stop_token_ids(self.tokenizer))

    def predict(self, x):  # pragma: no cover - EngineLoop drives the engine directly
        raise NotImplementedError


@dataclass
class _Job:
    uid: str
    consumer: int               # which HTTP process's response queue answers it
    stream: bool
    text: TextStream
    prompt_tokens: int
    last_sent: float = 0.0
    sent_any: bool = False


class _Inbox:
    """Requests from LitServe's queue, fetched by a thread, at most `ahead` not yet taken."""

    def __init__(self, source, ahead: int):
        self.items: queue.SimpleQueue = queue.SimpleQueue()
        self.room = threading.Semaphore(ahead)
        self.closed = False  # LitServe's queue is gone: the server is stopping
        threading.Thread(target=self._fetch, args=(source,), name="inbox", daemon=True).start()

    def _fetch(self, source) -> None:
        while True:
            self.room.acquire()
            while True:
                try:
                    item = source.get(timeout=1.0)
                    break
                except queue.Empty:
                    continue
                except (EOFError, OSError):
                    self.closed = True
                    return
            self.items.put(item)

    def get(self, wait_s: float | None = None):
        """The next request; queue.Empty if none (after waiting up to wait_s)."""
        item = self.items.get(timeout=wait_s) if wait_s else self.items.get_nowait()
        self.room.release()
        return item


class _Outbox:
    """Updates to the HTTP process, sent in order by a thread."""

    def __init__(self, send):
        self.items: queue.SimpleQueue = queue.SimpleQueue()
        threading.Thread(target=self._send, args=(send,), name="outbox", daemon=True).start()

    def _send(self, send) -> None:
        while True:
            consumer, uid, data = self.items.get()
            try:
                send(consumer, uid, data)
            except (EOFError, OSError):
                return

    def put(self, consumer: int, uid: str, data: dict) -> None:
        self.items.put((consumer, uid, data))


class EngineLoop(LitLoop):
    """LitServe calls run() in the worker process; it serves until the process is stopped."""

    def pre_setup(self, lit_api, spec=None):
        if not isinstance(lit_api, GenerationAPI):
            raise ValueError("EngineLoop drives a GenerationAPI")

    def run(self, lit_api, device, worker_id, request_queue, transport, workers_setup_status, callback_runner):
        _Serving(self, lit_api, worker_id, request_queue, transport).forever()
        raise SystemExit(0)  # the server is gone (LitServe would call run() again)


class _Serving:
    """The state of one worker's loop."""

    def __init__(self, loop: EngineLoop, api: GenerationAPI, worker_id: int, request_queue, transport):
        self.api, self.engine = api, api.engine
        self.inbox = _Inbox(request_queue, ahead=api.options.limits.max_batch_size)
        self.outbox = _Outbox(lambda consumer, uid, data: loop.put_response(
            transport, consumer, uid, data, LitAPIStatus.OK, LoopResponseType.STREAMING))
        self.cancels = api.cancel_queues[worker_id] if worker_id < len(api.cancel_queues) else None
        self.interval = api.options.limits.stream_interval
        self.jobs: dict[str, _Job] = {}
        self.cancelled: dict[str, float] = {}     # uid -> when; for jobs not pulled yet

    def forever(self) -> None:
        while not (self.inbox.closed and len(self.engine) == 0):
            if self.engine.free:
                self._admit(block=len(self.engine) == 0)
            self._drop_cancelled()
            if len(self.engine):
                self._guarded(self.engine.step)
            self._flush()

    # --- taking jobs ---

    def _admit(self, block: bool) -> None:
        """Waiting requests into free rows; block (idle) waits up to 1 s for the first one."""
        new = []
        try:
            item = self.inbox.get(wait_s=1.0 if block else None)
            while True:
                job = self._accept(item)
                if job is not None:
                    new.append(job)
                if len(new) >= self.engine.free:
                    break
                item = self.inbox.get()
        except queue.Empty:
            pass
        if new:
            self._guarded(lambda: self.engine.add(new))

    def _accept(self, item) -> Sequence | None:
        """A job from the HTTP side as an engine Sequence (None for a cancelled or bad one)."""
        if item is None or item[0] is None:   # LitServe's shutdown sentinel
            return None
        consumer, uid, _, job = item
        if self.cancelled.pop(uid, None) is not None:
            return None
        problem = self._problem(job)
        if problem:
            self._send(consumer, uid, {"error": problem})
            return None
        sampling = job.sampling
        text = TextStream(self.api.tokenizer, job.stop, logprobs=sampling.logprobs or sampling.top_logprobs > 0)
        self.jobs[uid] = _Job(uid, consumer, job.stream, text, len(job.prompt))
        return Sequence(uid, job.prompt, replace(sampling, stop_ids=self.api.stop_ids))

    def _problem(self, job: Job) -> str | None:
        """The HTTP side checked everything; this only keeps a malformed job from breaking a batch."""
        config = self.engine.config
        if not isinstance(job, Job):
            return f"not a generation job: {type(job).__name__}"
        if room_for_new_tokens(len(job.prompt), config.context_length) < 1 or not job.prompt \
                or not all(0 <= t < config.vocab_size for t in job.prompt):
            return "invalid prompt"
        try:
            job.sampling.check(config.vocab_size)
        except ValueError as error:
            return str(error)
        return None

    def _drop_cancelled(self) -> None:
        if self.cancels is None:
            return
        now = time.monotonic()
        while True:
            try:
                uid = self.cancels.get_nowait()
            except (queue.Empty, OSError, ValueError):
                break
            if self.jobs.pop(uid, None) is not None:
                self.engine.cancel(uid)
            else:
                self.cancelled[uid] = now
        if self.cancelled:
            self.cancelled = {u: t for u, t in self.cancelled.items() if now - t < CANCELLED_MEMORY_S}

    # --- running and answering ---

    def _guarded(self, work) -> None:
        """Run an engine call; route its events. If it fails (a bug), fail its jobs, not the worker."""
        try:
            events = work()
        except Exception as error:  # noqa: BLE001 - the worker must survive to serve the next request
            logger.error("engine failure: %s\n%s", error, traceback.format_exc())
            for job in self.jobs.values():
                self._send(job.consumer, job.uid, {"error": f"{type(error).__name__}: {error}"})
            self.jobs.clear()
            self.engine.reset()
            return
        for event in events:
            job = self.jobs.get(event.uid)
            if job is None:
                continue
            job.text.add(event.token, event.logprob, event.top, event.finish_reason)
            if job.text.finished and event.finish_reason is None:
                self.engine.cancel(event.uid)  # a stop string ended it

    def _flush(self) -> None:
        now = time.monotonic()
        for uid in list(self.jobs):
            job = self.jobs[uid]
            due = job.stream and (not job.sent_any or now - job.last_sent >= self.interval)
            if not (job.text.finished or due):
                continue
            delta = job.text.take()
            if not (delta.text or delta.tokens or delta.finish_reason):
                continue
            update = {"text": delta.text, "tokens": delta.tokens, "finish_reason": delta.finish_reason,
                      "usage": None}
            if delta.finish_reason is not None:
                completion = job.text.completion_tokens
                update["usage"] = {"prompt_tokens": job.prompt_tokens, "completion_tokens": completion,
                                   "total_tokens": job.prompt_tokens + completion}
                del self.jobs[uid]
            self._send(job.consumer, uid, update)
            job.sent_any, job.last_sent = True, now

    def _send(self, consumer: int, uid: str, data: dict) -> None:
        self.outbox.put(consumer, uid, data)
