"""Everything a running server is told: what model, where to listen, and the limits it enforces.

One frozen, picklable object: the HTTP process and the LitServe worker processes read the same
values, so a limit checked at the door is the limit the engine was sized for.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

TOKENIZERS_DIR = Path("data/tokenizer/comparison")   # where the tokenizer stage saves its comparison


@dataclass(frozen=True)
class Limits:
    """Caps on what one request may ask and on how much work may wait. Every cap is enforced
    before generation starts, with a 4xx answer naming it."""

    max_tokens: int = 512               # tokens one request may generate (also capped by the context)
    max_prompt_tokens: int = 0          # prompt tokens; 0 = the model's context length
    max_body_bytes: int = 1_000_000     # request body size (413 above)
    max_batch_size: int = 32            # requests decoded together by one worker
    max_queue: int = 256                # requests waiting for a free batch row; more get 429
    max_messages: int = 512             # messages in one chat request
    max_stop_chars: int = 64            # characters in one stop string
    # Introspection: a full attention map is tokens^2 numbers per head, so sizes are capped.
    introspect_max_tokens: int = 0      # 0 = the model's context length
    introspect_max_top_k: int = 0       # 0 = the vocabulary size
    introspect_max_values: int = 1_048_576   # numbers in one answer's biggest table (see serving/introspection.py)
    introspect_queue: int = 16          # introspection requests in flight; more get 429
    patching_max_token_passes: int = 32_768  # activation patching: (layers + 1) x tokens^2 (~6 s for "tiny" on 1 thread)
    stream_interval: float = 0.05       # seconds between a stream's updates from the engine (first token: at once)


@dataclass(frozen=True)
class ServeOptions:
    model_dir: Path                     # checkpoint (model.safetensors, config.json) + tokenizer/
    model_name: str                     # the id clients pass as `model`
    model_source: str = ""              # what --model said (a folder or a models:/ URI), for /v1/models
    host: str = "127.0.0.1"
    port: int = 8000
    workers: int = 1                    # LitServe worker processes for generation, each with its own batch
    accelerator: str = "auto"           # LitServe's: auto, cpu, cuda, mps
    threads: int = 0                    # torch threads per worker; 0 = cores / (workers + 1), at least 1
    seed: int | None = None             # the engine's generator, for requests without a seed
    limits: Limits = field(default_factory=Limits)
    tokenizers_dir: Path = TOKENIZERS_DIR  # the tokenizer stage's comparison tokenizers (one subfolder each)
