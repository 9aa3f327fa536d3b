"""The OpenAI-compatible generation routes: a LitServe spec that runs in the HTTP process.

A LitSpec is LitServe's hook for an API of one's own (its OpenAISpec is one): the server
registers the spec's routes and hands it its request queue and response buffer. Ours:

1. validates the whole request first (strict schema, model name, prompt and max_tokens against
   the context and the limits), so that every error is a 4xx JSON answer before any byte of a
   stream is sent (an error inside a stream reaches the openai client as nothing at all);
2. encodes the prompt with the training template (llm.chat), here, where the tokenizer is;
3. puts one typed Job on LitServe's request queue, which the generation worker's engine
   loop (serving/worker.py) drains into its running batch;
4. turns the worker's updates into OpenAI answers: one id per request, finish_reason 'stop' or
   'length', logprobs in chat or legacy shape, usage once with the true totals, `data: [DONE]`.

A client that goes away mid-stream has its request cancelled in the engine.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator

from fastapi.responses import StreamingResponse
from litserve.specs.base import LitSpec
from litserve.utils import LitAPIStatus, ResponseBufferItem

from llm.chat import encode_prompt
from llm.generate import Sampling, room_for_new_tokens
from llm.tokenizer import ENDOFTEXT
from serving import formats
from serving.errors import ApiError
from serving.loading import load_tokenizer_of, read_config
from serving.options import ServeOptions
from serving.schemas import ChatCompletion, ChatCompletionRequest, Completion, CompletionRequest, Job, SamplingFields

CHAT_PATH = "/v1/chat/completions"
TEXT_PATH = "/v1/completions"
TEXT_DEFAULT_MAX_TOKENS = 16   # OpenAI's default for /v1/completions


LONG_TEXT_CHARS = 20_000       # tokenizing more than this takes milliseconds: do it in a thread


async def _off_loop_if_long(chars: int, encode, *args):
    """Tokenize in a thread when the text is long, so that one big prompt does not stall every
    other connection of the event loop."""
    return await asyncio.to_thread(encode, *args) if chars > LONG_TEXT_CHARS else encode(*args)


class WorkerFailed(RuntimeError):
    """The generation worker reported an error for this request (a bug: requests are checked first)."""


class GenerationSpec(LitSpec):
    def __init__(self, options: ServeOptions):
        super().__init__()
        self.api_path = CHAT_PATH          # the LitServe request queue both routes feed
        self.options = options
        self.limits = options.limits
        self.config = read_config(options.model_dir)
        self.tokenizer = None              # loaded in setup(), in the server process only
        self.cancel_queues: list = []      # one per generation worker, set by serving.app
        self.add_endpoint(CHAT_PATH, self.chat_completions, ["POST"])
        self.add_endpoint(TEXT_PATH, self.completions, ["POST"])

    @property
    def stream(self) -> bool:
        return True  # the worker answers with a stream of updates, whatever the client asked

    def setup(self, server) -> None:
        super().setup(server)
        self.tokenizer = load_tokenizer_of(self.options.model_dir)

    def __getstate__(self):
        # The spec travels to the worker processes inside the LitAPI; they need none of this.
        state = super().__getstate__()
        for name in ("tokenizer", "response_buffer", "data_streamer"):
            state.pop(name, None)
        return state

    def decode_request(self, request, context_kwargs=None):
        return request

    def encode_response(self, output, context_kwargs=None):
        return output

    # --- routes ---

    async def chat_completions(self, request: ChatCompletionRequest) -> ChatCompletion:
        self._check_model(request.model)
        if len(request.messages) > self.limits.max_messages:
            raise ApiError(400, f"{len(request.messages)} messages; this server takes at most "
                                f"{self.limits.max_messages}", param="messages")
        messages = [{"role": m.role, "content": m.text()} for m in request.messages]
        prompt = await _off_loop_if_long(sum(len(m["content"]) for m in messages),
                                         encode_prompt, self.tokenizer, messages)
        reply = formats.Reply("chat", self.options.model_name, logprobs=bool(request.logprobs),
                              top_logprobs=request.top_logprobs or 0,
                              include_usage=bool(request.stream_options and request.stream_options.include_usage))
        job = self._job(prompt, request, request.token_budget(), default_budget=None,
                        logprobs=bool(request.logprobs), top_logprobs=request.top_logprobs or 0)
        return await self._answer(job, reply, bool(request.stream))

    async def completions(self, request: CompletionRequest) -> Completion:
        self._check_model(request.model)
        if isinstance(request.prompt, str):
            # An empty prompt starts a new document, as with GPT-2: the model writes from scratch.
            prompt = (await _off_loop_if_long(len(request.prompt), self.tokenizer.encode, request.prompt)
                      or [self.tokenizer.special_tokens[ENDOFTEXT]])
            prompt_text = request.prompt
        else:
            prompt = list(request.prompt)
            bad = [t for t in prompt if t >= self.tokenizer.vocab_size]
            if bad:
                raise ApiError(400, f"prompt token ids must be below the vocabulary size "
                                    f"{self.tokenizer.vocab_size}; got {bad[:5]}", param="prompt")
            prompt_text = self.tokenizer.decode(prompt)
        want_logprobs = request.logprobs is not None
        reply = formats.Reply("text", self.options.model_name, logprobs=want_logprobs,
                              top_logprobs=request.logprobs or 0, prompt_chars=len(prompt_text),
                              include_usage=bool(request.stream_options and request.stream_options.include_usage))
        job = self._job(prompt, request, request.token_budget(), default_budget=TEXT_DEFAULT_MAX_TOKENS,
                        logprobs=want_logprobs, top_logprobs=request.logprobs or 0)
        return await self._answer(job, reply, bool(request.stream))

    # --- checks ---

    def _check_model(self, name: str) -> None:
        if name != self.options.model_name:
            raise ApiError(404, f"the model '{name}' does not exist here; this server serves "
                                f"'{self.options.model_name}' (GET /v1/models)", param="model",
                           code="model_not_found")

    def _job(self, prompt: list[int], request: SamplingFields, budget: int | None, default_budget: int | None,
             logprobs: bool, top_logprobs: int) -> Job:
        """Check the request against the model and the limits; the job for the worker."""
        context = self.config.context_length
        max_prompt = min(self.limits.max_prompt_tokens or context, context)
        n = len(prompt)
        if n > max_prompt:
            raise ApiError(400, f"the prompt has {n} tokens; this model's context is {context} tokens and "
                                f"this server takes prompts of at most {max_prompt}",
                           param="messages" if isinstance(request, ChatCompletionRequest) else "prompt",
                           code="context_length_exceeded")
        room = room_for_new_tokens(n, context)
        if budget is not None and budget > self.limits.max_tokens:
            raise ApiError(400, f"max_tokens is {budget}; this server generates at most "
                                f"{self.limits.max_tokens} tokens per request", param="max_tokens")
        if budget is not None and budget > room:
            raise ApiError(400, f"the prompt ({n} tokens) plus max_tokens ({budget}) is over this model's "
                                f"context of {context} tokens", param="max_tokens", code="context_length_exceeded")
        if budget is None:
            budget = min(default_budget or self.limits.max_tokens, self.limits.max_tokens, room)
        stops = request.stop_list()
        if any(len(s) > self.limits.max_stop_chars for s in stops):
            raise ApiError(400, f"stop strings may have at most {self.limits.max_stop_chars} characters",
                           param="stop")
        sampling = Sampling(max_tokens=budget, temperature=1.0 if request.temperature is None else request.temperature,
                            top_p=1.0 if request.top_p is None else request.top_p, seed=request.seed,
                            logprobs=logprobs, top_logprobs=top_logprobs)
        return Job(prompt=prompt, sampling=sampling, stop=stops, stream=bool(request.stream))

    # --- answering ---

    async def _answer(self, job: Job, reply: formats.Reply, stream: bool):
        updates = self._submit(job)
        try:
            first = await anext(updates)  # the first token (or a failure) before any byte is sent
        except WorkerFailed as error:
            await updates.aclose()
            raise ApiError(503, f"generation failed: {error}") from None
        if stream:
            return StreamingResponse(self._events(reply, first, updates), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        texts, entries, update = [first["text"]], list(first["tokens"]), first
        try:
            while update["finish_reason"] is None:
                update = await anext(updates)
                texts.append(update["text"])
                entries.extend(update["tokens"])
        except WorkerFailed as error:
            raise ApiError(503, f"generation failed: {error}") from None
        finally:
            await updates.aclose()
        return formats.whole(reply, "".join(texts), entries, update["finish_reason"], update["usage"])

    async def _events(self, reply: formats.Reply, first: dict, updates: AsyncIterator[dict]):
        """The SSE body: OpenAI's chunks, then [DONE]."""
        try:
            if reply.kind == "chat":
                yield formats.sse(formats.chunk(reply, None, [], None, role=True))
            update = first
            while True:
                if update["text"] or update["tokens"]:
                    yield formats.sse(formats.chunk(reply, update["text"], update["tokens"], None))
                if update["finish_reason"] is not None:
                    break
                update = await anext(updates)
            yield formats.sse(formats.chunk(reply, None, [], update["finish_reason"], usage=update["usage"]))
            if reply.include_usage:
                yield formats.sse(formats.usage_chunk(reply, update["usage"]))
            yield formats.DONE
        except WorkerFailed as error:  # headers are gone: all we can do is say so in the stream
            yield formats.sse({"error": {"message": f"generation failed: {error}", "type": "server_error"}})
        finally:
            await updates.aclose()

    async def _submit(self, job: Job) -> AsyncIterator[dict]:
        """Put a job on LitServe's queue; yield the worker's updates until the last one."""
        uid = uuid.uuid4().hex
        updates, arrived = deque(), asyncio.Event()
        self.response_buffer[uid] = ResponseBufferItem(event=arrived, response_queue=updates)
        # A call into the multiprocessing manager's process: off the event loop, which must keep
        # serving the other connections meanwhile.
        await asyncio.to_thread(self.request_queue.put, (self.response_queue_id, uid, time.monotonic(), job))
        done = False
        try:
            while True:
                await arrived.wait()
                while updates:  # no await between the last check and clear(): no lost wake-up
                    data, status = updates.popleft()
                    if status == LitAPIStatus.ERROR or (isinstance(data, dict) and "error" in data):
                        done = True
                        raise WorkerFailed(data.get("error") if isinstance(data, dict) else "worker error")
                    done = data["finish_reason"] is not None
                    yield data
                    if done:
                        return
                arrived.clear()
        finally:
            self.response_buffer.pop(uid, None)
            if not done:
                self._cancel(uid)

    def _cancel(self, uid: str) -> None:
        """Tell every generation worker to drop uid (only the one running it will find it)."""
        for queue in self.cancel_queues:
            queue.cancel_join_thread()  # never block this process's exit on an undelivered message
            queue.put_nowait(uid)
