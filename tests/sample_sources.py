"""Small local data sources of every URI scheme, built on the fly for tests (no network)."""

from __future__ import annotations

import contextlib
import http.server
import json
import threading
import time
import zipfile
from pathlib import Path

from llm.files import sha256_file, sha256_tree

NOVEL = "It was a bright cold day in April.\r\nThe clocks were striking thirteen.\n"
SPEECH = "\ufeffMr. Speaker, the state of our Union is strong.\n"
SMS_CSV = ",spam,text\n0,0,See you at lunch\n1,1,WIN a FREE prize now\n2,0,Running late\n"
ALPACA = [
    {"instruction": "Name a colour.", "input": "", "output": "Blue."},
    {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
    {"instruction": "Broken item without an output."},
]


def text_folder(root: Path) -> Path:
    folder = root / "texts"
    folder.mkdir(parents=True)
    (folder / "novel.txt").write_bytes(NOVEL.encode())
    (folder / "speech.txt").write_bytes(SPEECH.encode())
    (folder / "notes.bin").write_bytes(b"\x00\x01")  # excluded by the source's include glob
    return folder


def alpaca_zip(root: Path) -> Path:
    path = root / "alpaca.zip"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("data/alpaca.json", json.dumps(ALPACA))
        archive.writestr("README.md", "not data")
    return path


def tiny_wheel(root: Path, name: str = "tinydata", version: str = "0.1.0") -> Path:
    """A valid, installable-looking wheel that pip can `download` from a local --find-links."""
    folder = root / "wheels"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}-{version}-py3-none-any.whl"
    dist = f"{name}-{version}.dist-info"
    with zipfile.ZipFile(path, "w") as wheel:
        wheel.writestr(f"{name}/__init__.py", "")
        wheel.writestr(f"{name}/data/poem.txt", "Roses are red.\nViolets are blue.\n")
        wheel.writestr(f"{dist}/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        wheel.writestr(f"{dist}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        wheel.writestr(f"{dist}/RECORD", "")
    return path


def hf_folder(root: Path) -> Path:
    """A folder `datasets.load_dataset` reads as a dataset (one JSONL data file)."""
    folder = root / "hf-dataset"
    folder.mkdir(parents=True)
    rows = [{"sentence": "A local hub-style dataset.", "score": 1}, {"sentence": "Second row.", "score": 0}]
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


class _Handler(http.server.SimpleHTTPRequestHandler):
    slow_seconds = 0.0

    def log_message(self, *args):  # keep test output clean
        pass

    def do_GET(self):
        if self.path.startswith("/slow/"):
            # Send part of a body, then stall: lets a test kill the stage mid-download.
            self.send_response(200)
            self.send_header("Content-Length", "1000000")
            self.end_headers()
            self.wfile.write(b"x" * 1000)
            self.wfile.flush()
            time.sleep(self.slow_seconds)
            return
        super().do_GET()


@contextlib.contextmanager
def http_server(directory: Path, slow_seconds: float = 30.0):
    """Serve `directory` on 127.0.0.1 (a free port); yields the base URL."""
    handler = type("Handler", (_Handler,), {"slow_seconds": slow_seconds})

    def make(*args, **kwargs):
        return handler(*args, directory=str(directory), **kwargs)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), make)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def sources_yaml(root: Path, base_url: str) -> list[dict]:
    """Source entries covering every scheme, pointing at data built under `root`."""
    folder = text_folder(root)
    archive = alpaca_zip(root)
    wheel = tiny_wheel(root)
    served = root / "served"
    served.mkdir(exist_ok=True)
    (served / "sms.csv").write_text(SMS_CSV)
    return [
        {"name": "texts", "uri": f"file:{folder}", "sha256": sha256_tree(folder), "role": "pretrain",
         "include": ["*.txt"]},
        {"name": "poems", "uri": "pypi:tinydata==0.1.0", "sha256": sha256_file(wheel), "role": "pretrain",
         "include": ["tinydata/data/*.txt"]},
        {"name": "sms", "uri": f"{base_url}/sms.csv", "sha256": sha256_file(served / "sms.csv"), "role": "classify",
         "fields": {"text": "text", "label": "spam"}, "labels": {"0": "ham", "1": "spam"}},
        {"name": "alpaca", "uri": f"file:{archive}", "sha256": sha256_file(archive), "role": "instruct",
         "include": ["data/*.json"]},
        {"name": "hub", "uri": f"hf:{hf_folder(root)}?split=train", "role": "pretrain",
         "fields": {"text": "sentence"}},
    ]


def pip_offline_env(root: Path) -> dict:
    """Make `pip download` find tiny_wheel() locally instead of asking an index."""
    return {"PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(root / "wheels")}


WORDS = ("the state of our union is strong and the people have spoken about work, trade, "
         "schools, roads, farms, peace, war, money, taxes, children, families, freedom, justice, "
         "she walked to the window and looked at the grey sea while he read the letter again").split()
ARABIC = "السلام عليكم ورحمة الله وبركاته قال رسول الله صلى الله عليه وسلم إنما الأعمال بالنيات".split()


SYLLABLES = "ka lo mi ru se ta ven dor pli stra gon ber wil thu ish ent ock ard".split()


def english_corpus(root: Path, documents: int = 40, words: int = 400, seed: int = 0) -> Path:
    """A folder of small English-like documents, enough to train a few-hundred-piece tokenizer."""
    import random
    rng = random.Random(seed)
    folder = root / "corpus"
    folder.mkdir(parents=True)
    for d in range(documents):
        # Real words plus made-up ones, so a tokenizer has enough distinct material for its pieces.
        vocabulary = WORDS + ["".join(rng.choice(SYLLABLES) for _ in range(rng.randint(2, 3))) for _ in range(60)]
        sentences = [" ".join(rng.choice(vocabulary) for _ in range(rng.randint(5, 14))).capitalize() + "."
                     for _ in range(words // 9)]
        (folder / f"doc{d:03d}.txt").write_text(" ".join(sentences) + "\n")
    return folder


def parallel_jsonl(root: Path, items: int = 60, seed: int = 1) -> Path:
    """English/Arabic pairs (not translations, but the shape the tokenizer comparison reads)."""
    import random
    rng = random.Random(seed)
    path = root / "parallel.jsonl"
    with open(path, "w") as f:
        for _ in range(items):
            f.write(json.dumps({"en": " ".join(rng.choice(WORDS) for _ in range(20)),
                                "ar": " ".join(rng.choice(ARABIC) for _ in range(15))}, ensure_ascii=False) + "\n")
    return path


SPAM_WORDS = "free prize win cash call now claim urgent txt offer".split()


def labelled_jsonl(root: Path, items: int = 160, seed: int = 2) -> Path:
    """Messages labelled ham/spam; spam ones use spam words (learnable from a few examples)."""
    import random
    rng = random.Random(seed)
    path = root / "sms.jsonl"
    with open(path, "w") as f:
        for i in range(items):
            spam = i % 4 == 0
            words = SPAM_WORDS if spam else WORDS
            f.write(json.dumps({"text": " ".join(rng.choice(words) for _ in range(rng.randint(4, 12))),
                                "label": "spam" if spam else "ham"}) + "\n")
    return path


def alpaca_json(root: Path, items: int = 40, seed: int = 3) -> Path:
    """Instruction records in the Alpaca shape: repeat-after-me tasks a tiny model can learn a bit of."""
    import random
    rng = random.Random(seed)
    records = []
    for i in range(items):
        words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 5)))
        records.append({"instruction": "Repeat the words.", "input": words, "output": words}
                       if i % 2 else {"instruction": f"Say {words}.", "input": "", "output": words})
    path = root / "alpaca_demo.json"
    path.write_text(json.dumps(records))
    return path


def tiny_pipeline_params(root: Path, judge_gguf: Path | None = None) -> dict:
    """params.yaml for the whole pipeline on tiny local data: minutes on 2 cores, for e2e tests.

    With judge_gguf (the real default judge, assembled), the judge stage gets it as its one part.
    """
    corpus = english_corpus(root)
    params = {
        "project": {"name": "testllm", "experiment": "tests", "seed": 7},
        "download": {"retries": 0, "timeout_s": 10, "sources": [
            {"name": "corpus", "uri": f"file:{corpus}", "role": "pretrain", "include": ["*.txt"]},
            {"name": "parallel", "uri": f"file:{parallel_jsonl(root)}", "role": "tokenizer-eval"},
            {"name": "sms", "uri": f"file:{labelled_jsonl(root)}", "role": "classify"},
            {"name": "alpaca", "uri": f"file:{alpaca_json(root)}", "role": "instruct"},
        ]},
        "tokenizer": {"kind": "bpe", "vocab_size": 400, "max_sentences": 1000, "heldout_fraction": 0.1,
                      "eval_chars": 5000},
        "pack": {"val_fraction": 0.1, "workers": 2},
        "pretrain": {
            "model": {"preset": "tiny", "n_layer": 2, "d_model": 64, "n_head": 4, "context_length": 64},
            "train": {"max_steps": 30, "warmup_steps": 5, "batch_size": 8, "lr": 0.003, "min_lr": 0.0003,
                      "eval_every": 15, "eval_steps": 2, "checkpoint_every": 10, "sample_tokens": 8,
                      "threads": 1, "progress": False},
        },
        "classify": {"max_length": 32, "epochs": 6, "batch_size": 16, "lr": 0.003, "warmup_steps": 2, "pooling": "mean",
                     "patience": 0,
                     "threads": 1, "progress": False},
        "instruct": {"epochs": 2, "batch_size": 4, "lr": 0.002, "warmup_steps": 2, "threads": 1, "progress": False,
                     "val_fraction": 0.1, "test_fraction": 0.1, "max_new_tokens": 8, "generate_batch_size": 4},
    }
    if judge_gguf is not None:
        from judge_model import GGUF_SHA256
        params["download"]["sources"].append(
            {"name": "judge-part01", "uri": f"file:{judge_gguf}", "role": "asset", "sha256": GGUF_SHA256})
        params["judge"] = {"gguf_sha256": GGUF_SHA256, "max_items": 3, "min_separation": 30, "n_ctx": 2048}
    return params
