"""Training files clients upload for fine-tuning jobs (OpenAI's ``/v1/files``, purpose ``fine-tune``).

A file is one of graytune's data formats (``graytune.data.catalog.load_splits``): a ``.csv`` or ``.jsonl`` of
``text,label``, ``image,label`` or ``image,caption`` rows, a ``.jsonl`` of prompt/completion (or chat) rows, or a
``.zip`` / ``.tar`` holding one such file and the images it names. Each upload is bounded before it is kept
(``--max-file-mb``; an archive also unpacked, with no links, devices or paths leaving its folder), read with the
same readers a job will use, and refused with the reader's message (the client's file name in place of the
server's path) when it does not parse. Files live under ``JOBS/files/<client digest>/<file id>/``; a client sees
only its own (another client's id is unknown: 404), within ``--client-files`` and ``--client-files-mb``.

Example:
    >>> store = FileStore(Path("jobs"), ServeConfig(jobs="jobs"))
    >>> record = store.save("alice", "train.csv", "fine-tune", data)    # the OpenAI file object, with graytune's
    >>> store.data_path("alice", record["id"])                          # what a job trains on
"""

from __future__ import annotations

import hashlib
import json
import secrets
import shutil
import tarfile
import threading
import time
import zipfile
from pathlib import Path, PurePosixPath
from typing import Any

from graytune.artifact_files import replace_atomically
from graytune.data.catalog import load_splits
from graytune.errors import GraytuneError
from graytune.serve.admission import HTTPProblem
from graytune.serve.config import ServeConfig

__all__ = ["DATA_SUFFIXES", "FileStore", "client_folder", "write_json"]

#: the data files a job trains on, alone or inside an archive
DATA_SUFFIXES = (".csv", ".jsonl")
ARCHIVES = (".zip", ".tar")
#: most members an uploaded archive may hold
MAX_MEMBERS = 20000


def client_folder(root: Path, client: str) -> Path:
    """A client's folder under ``root``: named by a digest, so no client name can reach outside it."""
    return root / hashlib.sha256(client.encode()).hexdigest()[:24]


class FileStore:
    """Uploaded training files, by client; every method takes the caller's name and sees only its files."""

    def __init__(self, root: Path, config: ServeConfig) -> None:
        self.root = root / "files"
        self.root.mkdir(parents=True, exist_ok=True)
        self.max_bytes = int(config.max_file_mb * 2**20)
        self.client_bytes, self.client_files = int(config.client_files_mb * 2**20), config.client_files
        self._lock = threading.Lock()  # quota checks and writes of one client's files, one at a time

    def save(self, client: str, filename: str, purpose: str, data: bytes) -> dict[str, Any]:
        """Check, keep and describe an upload; 400 (what is wrong, what to send), 413 or 429 otherwise."""
        name = PurePosixPath(filename.replace("\\", "/")).name or "upload"
        suffix = _suffix(name)
        if purpose != "fine-tune":
            raise HTTPProblem(400, "invalid_input", f"purpose is {purpose!r}; this server keeps files for "
                              "purpose 'fine-tune' only (training and validation files of fine-tuning jobs)")
        if suffix not in DATA_SUFFIXES + ARCHIVES:
            raise HTTPProblem(400, "invalid_input", f"{name}: a {suffix or 'file without a suffix'} is not a "
                              "training file here; send a .csv or .jsonl (text,label, image,label, image,caption, "
                              "or prompt/completion rows), or a .zip/.tar holding one and its images")
        if len(data) > self.max_bytes:
            raise HTTPProblem(413, "too_large", f"{name} has {len(data):,} bytes; the server takes files of at most "
                              f"{self.max_bytes:,} (--max-file-mb): split it or ask the owner for more")
        with self._lock:
            self._check_quota(client, len(data))
            file_id = "file-" + secrets.token_hex(12)
            folder = client_folder(self.root, client) / file_id
            staging = folder.with_name(f".{file_id}.tmp")
            staging.mkdir(parents=True)
            try:
                (staging / f"upload{suffix}").write_bytes(data)
                data_file = _unpack(staging, suffix, self.max_bytes) if suffix in ARCHIVES else \
                    staging / f"upload{suffix}"
                described = _described(data_file, name, staging)
                record = {"id": file_id, "object": "file", "bytes": len(data), "created_at": int(time.time()),
                          "filename": name, "purpose": purpose, "status": "processed", "status_details": None,
                          "expires_at": None, "graytune": {**described, "client": client,
                                                           "data": str(data_file.relative_to(staging))}}
                write_json(staging / "file.json", record)
                staging.rename(folder)  # whole or absent: a crash leaves a dot folder, never half a file
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)
                raise
        return record

    def get(self, client: str, file_id: str) -> dict[str, Any]:
        """The caller's file ``file_id`` (404 for an unknown id or another client's)."""
        path = client_folder(self.root, client) / _safe_id(file_id, "file-") / "file.json"
        if not path.is_file():
            raise HTTPProblem(404, "not_found", f"no file {file_id!r} among yours; GET /v1/files lists them")
        record: dict[str, Any] = json.loads(path.read_text())
        return record

    def data_path(self, client: str, file_id: str) -> Path:
        """The data file a job trains on (inside the upload's folder)."""
        record = self.get(client, file_id)
        return client_folder(self.root, client) / file_id / record["graytune"]["data"]

    def content(self, client: str, file_id: str) -> tuple[str, bytes]:
        """The file's name and bytes as uploaded."""
        record = self.get(client, file_id)
        folder = client_folder(self.root, client) / file_id
        return record["filename"], next(folder.glob("upload.*")).read_bytes()

    def listing(self, client: str) -> list[dict[str, Any]]:
        """The caller's files, newest first."""
        folder = client_folder(self.root, client)
        records = [json.loads(p.read_text()) for p in folder.glob("file-*/file.json")] if folder.is_dir() else []
        return sorted(records, key=lambda r: (r["created_at"], r["id"]), reverse=True)

    def clients(self) -> set[str]:
        """The clients that keep files here (read from the files' records)."""
        return {json.loads(p.read_text())["graytune"]["client"] for p in self.root.glob("*/file-*/file.json")}

    def delete(self, client: str, file_id: str) -> dict[str, Any]:
        self.get(client, file_id)
        with self._lock:
            shutil.rmtree(client_folder(self.root, client) / file_id)
        return {"id": file_id, "object": "file", "deleted": True}

    def _check_quota(self, client: str, size: int) -> None:
        records = self.listing(client)
        used = sum(r["bytes"] for r in records)
        if len(records) >= self.client_files:
            raise HTTPProblem(429, "quota", f"you keep {len(records)} files, the most this server allows "
                              f"(--client-files {self.client_files}); delete some (DELETE /v1/files/ID)")
        if used + size > self.client_bytes:
            raise HTTPProblem(429, "quota", f"your files hold {used:,} bytes and this one {size:,}; the server keeps "
                              f"at most {self.client_bytes:,} per client (--client-files-mb): delete some first")


def _suffix(name: str) -> str:
    return "." + name.rsplit(".", 1)[1].lower() if "." in name else ""


def _safe_id(value: str, prefix: str) -> str:
    if not value.startswith(prefix) or not value[len(prefix):].isalnum():
        raise HTTPProblem(404, "not_found", f"no {prefix.rstrip('-')} {value!r}: ids look like {prefix}0123abcd…")
    return value


def write_json(path: Path, value: Any) -> None:
    """``value`` as JSON in ``path``, atomically (a reader sees the old file or the new one); values JSON does not
    know are written as their ``str``."""
    replace_atomically(path, lambda tmp: tmp.write_text(json.dumps(value, indent=1, default=str)))


def _described(data_file: Path, name: str, folder: Path) -> dict[str, Any]:
    """What the readers make of ``data_file``: its task and rows; 400 with their message (paths as the client
    knows them) when they refuse it."""
    try:
        splits = load_splits(None, train=str(data_file))
    except (GraytuneError, OSError, ValueError) as err:
        detail = str(err).replace(str(folder) + "/", "").replace(f"upload{_suffix(name)}", name)
        raise HTTPProblem(400, "invalid_input", f"{name} is not a training file graytune can read: {detail}") \
            from None
    rows = len(splits.train) + (len(splits.val) if splits.val is not None else 0)
    return {"task": splits.task, "rows": rows, "classes": list(getattr(splits.train, "class_names", []) or [])}


def _unpack(folder: Path, suffix: str, max_bytes: int) -> Path:
    """Unpack ``folder/upload.zip|tar`` into ``folder/data`` within bounds; the one data file it holds."""
    target, limit = folder / "data", 4 * max_bytes
    target.mkdir()
    archive = folder / f"upload{suffix}"
    members = _zip_members(archive) if suffix == ".zip" else _tar_members(archive)
    if len(members) > MAX_MEMBERS:
        raise _bad_archive(f"holds {len(members):,} members; at most {MAX_MEMBERS:,} are unpacked")
    total = sum(size for _, size, _ in members)
    if total > limit:
        raise _bad_archive(f"unpacks to {total:,} bytes; at most {limit:,} (4 x --max-file-mb)")
    for name, size, read in members:
        path = target.joinpath(*_inside(name))
        path.parent.mkdir(parents=True, exist_ok=True)
        content = read()
        if len(content) != size:
            raise _bad_archive(f"member {name} declares {size:,} bytes and holds {len(content):,}")
        path.write_bytes(content)
    found = sorted((p for p in target.rglob("*") if p.suffix.lower() in DATA_SUFFIXES),
                   key=lambda p: (len(p.relative_to(target).parts), str(p)))
    if not found:
        raise _bad_archive("holds no .csv or .jsonl; put the rows file beside the images it names")
    top = [p for p in found if len(p.parts) == len(found[0].parts)]
    if len(top) > 1:
        names = ", ".join(str(p.relative_to(target)) for p in top[:4])
        raise _bad_archive(f"holds several rows files at one level ({names}); keep one per upload")
    return found[0]


def _inside(name: str) -> tuple[str, ...]:
    parts = PurePosixPath(name).parts
    if not parts or name.startswith("/") or ".." in parts or any(":" in p or "\\" in p for p in parts):
        raise _bad_archive(f"member {name!r} would be written outside its folder; use relative paths")
    return parts


def _zip_members(path: Path) -> list[tuple[str, int, Any]]:
    try:
        archive = zipfile.ZipFile(path)
    except zipfile.BadZipFile:
        raise _bad_archive("is not a readable zip file") from None
    members = []
    for info in archive.infolist():
        if info.is_dir():
            continue
        if (info.external_attr >> 16) & 0o170000 not in (0, 0o100000):
            raise _bad_archive(f"member {info.filename} is a link or device; only plain files are unpacked")
        members.append((info.filename, info.file_size, lambda i=info: archive.read(i)))
    return members


def _tar_members(path: Path) -> list[tuple[str, int, Any]]:
    try:
        archive = tarfile.open(path)
    except tarfile.TarError:
        raise _bad_archive("is not a readable tar file") from None
    members = []
    for info in archive.getmembers():
        if info.isdir():
            continue
        if not info.isfile():
            raise _bad_archive(f"member {info.name} is a link or device; only plain files are unpacked")
        members.append((info.name, info.size, lambda i=info: _read_member(archive, i)))
    return members


def _read_member(archive: tarfile.TarFile, info: tarfile.TarInfo) -> bytes:
    handle = archive.extractfile(info)
    return handle.read() if handle is not None else b""


def _bad_archive(why: str) -> HTTPProblem:
    return HTTPProblem(400, "invalid_input", f"the archive {why}")
