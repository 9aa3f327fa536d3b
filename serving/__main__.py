"""`python -m serving`: serve a model over HTTP (OpenAI-compatible generation, introspection).

    python -m serving                                   # the instruct stage's model, on 127.0.0.1:8000
    python -m serving --model data/pretrain/model --port 8001
    python -m serving --model models:/tinyllm-instruct@champion

Then, with any OpenAI client:

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused")
    client.chat.completions.create(model="<id from GET /v1/models>", messages=[...])

Ctrl-C (or SIGTERM) stops the server and every process it started.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time
import urllib.request
from dataclasses import fields
from pathlib import Path

from serving.loading import DEFAULT_MODEL, ModelNotFound, default_name, is_registry_uri, resolve_model
from serving.options import TOKENIZERS_DIR, Limits, ServeOptions

# name -> (flag help); every Limits field is a flag, with its default shown.
LIMIT_HELP = {
    "max_tokens": "most tokens one request may generate",
    "max_prompt_tokens": "most prompt tokens (0 = the model's context length)",
    "max_body_bytes": "largest request body, bytes (413 above)",
    "max_batch_size": "requests decoded together by one worker (continuous batching)",
    "max_queue": "requests that may wait for a batch row; more get 429 with Retry-After",
    "max_messages": "most messages in one chat request",
    "max_stop_chars": "most characters in one stop string",
    "introspect_max_tokens": "most tokens one /v1/introspect request may analyse (0 = the context length)",
    "introspect_max_top_k": "largest top_k for /v1/introspect (0 = the vocabulary size)",
    "introspect_max_values": "most numbers in one introspection table (tokens x top_k, "
                             "layers x heads x tokens^2, ...)",
    "introspect_queue": "introspection requests in flight; more get 429",
    "patching_max_token_passes": "most (layers + 1) x tokens^2 of one /v1/patching request",
    "stream_interval": "seconds between a stream's updates (the first token is sent at once)",
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m serving", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"a model folder (model.safetensors, config.json, tokenizer/) or an MLflow registry "
                        f"URI models:/NAME@ALIAS or models:/NAME/VERSION (default: {DEFAULT_MODEL})")
    p.add_argument("--name", help="the model id clients pass as `model` (default: NAME@ALIAS for a registry "
                                  "URI, else the folder's name, or its parent's for .../model)")
    p.add_argument("--tracking-uri", help="MLflow tracking/registry URI for models:/ (default: $MLFLOW_TRACKING_URI, "
                                          "else sqlite:///<cwd>/mlflow.db)")
    p.add_argument("--host", default="127.0.0.1", choices=["127.0.0.1", "0.0.0.0", "::"],
                   help="interface to listen on (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port, 1024-65535 (default: 8000)")
    p.add_argument("--workers", type=int, default=1, help="generation worker processes, each with its own copy "
                                                          "of the model and its own batch (default: 1)")
    p.add_argument("--threads", type=int, default=0, help="torch threads per generation worker "
                                                          "(default: cores / (workers + 1), at least 1)")
    p.add_argument("--accelerator", default="auto", choices=["auto", "cpu", "cuda", "mps"],
                   help="where the model runs (default: auto)")
    p.add_argument("--seed", type=int, help="seed for requests without one (default: random)")
    p.add_argument("--tokenizers", default=str(TOKENIZERS_DIR),
                   help="folder of the tokenizer stage's comparison tokenizers, one subfolder each, shown side "
                        f"by side on the page (default: {TOKENIZERS_DIR})")
    p.add_argument("--log-level", default="warning", choices=["critical", "error", "warning", "info", "debug"])
    limits = p.add_argument_group("limits (each enforced before any work, with a 4xx answer)")
    for f in fields(Limits):
        limits.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default), default=f.default,
                            help=f"{LIMIT_HELP[f.name]} (default: {f.default})")
    args = p.parse_args(argv)
    if not 1024 <= args.port <= 65535:
        p.error(f"--port must be within 1024-65535, got {args.port}")
    if args.workers < 1 or args.max_batch_size < 1 or args.max_tokens < 1:
        p.error("--workers, --max-batch-size and --max-tokens must be at least 1")
    return args


def options_from(args: argparse.Namespace) -> ServeOptions:
    folder = resolve_model(args.model, args.tracking_uri)
    limits = Limits(**{f.name: getattr(args, f.name) for f in fields(Limits)})
    return ServeOptions(model_dir=folder.resolve(), model_name=args.name or default_name(args.model, folder),
                        model_source=args.model, host=args.host, port=args.port, workers=args.workers,
                        threads=args.threads, accelerator=args.accelerator, seed=args.seed, limits=limits,
                        tokenizers_dir=Path(args.tokenizers).resolve())


def announce_when_ready(url: str, name: str, timeout_s: float = 600) -> None:
    """Print the URL once /health answers 200 (from a thread: LitServer.run blocks)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    print(f"Serving {name} at {url}  (OpenAI base URL {url}/v1, docs {url}/docs; "
                          "Ctrl-C to stop)", flush=True)
                    return
        except OSError:
            pass
        time.sleep(0.25)


def stop_once_on_ctrl_c_or_sigterm() -> None:
    """The first Ctrl-C or SIGTERM starts LitServe's shutdown (it reacts to KeyboardInterrupt);
    later ones are ignored, because a second KeyboardInterrupt inside that shutdown aborts it and
    leaves workers running (seen with a double Ctrl-C). LitServe alone also ignores SIGTERM,
    leaving its workers behind. Processes forked from this one keep the default behaviour."""
    main_pid = os.getpid()

    def handler(signum, frame):
        if os.getpid() != main_pid:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    try:
        options = options_from(args)
    except ModelNotFound as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    from serving.app import build_server  # after argument checks: imports torch and litserve (slow)

    where = "the MLflow registry" if is_registry_uri(args.model) else str(options.model_dir)
    print(f"Loading {options.model_name} from {where} ...", flush=True)
    server = build_server(options)
    shown = "127.0.0.1" if options.host in ("0.0.0.0", "::") else options.host
    url = f"http://{shown}:{options.port}"
    threading.Thread(target=announce_when_ready, args=(url, options.model_name), daemon=True).start()
    stop_once_on_ctrl_c_or_sigterm()
    server.run(host=options.host, port=options.port, num_api_servers=1, generate_client_file=False,
               log_level=args.log_level)
    print("Stopped.", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
