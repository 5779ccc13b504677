"""The durable store: the source of truth for prefix files (DESIGN.md invariants 5 and 6).

A local directory by default, any fsspec URL (`s3://bucket/prefixes`, `memory://...`) as an option.
One file per prefix, `<id>.safetensors`; the metadata lives inside the file, so the store needs no
index. Ids are checked against a strict pattern before they become paths. Local writes are atomic:
temp file in the same directory, fsync, then a hard link to the final name (which fails rather than
overwrite), then the directory is fsynced; an id is visible only once its file is complete.
Object stores publish an object atomically on upload.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import fsspec
from fsspec.implementations.local import LocalFileSystem

from prefixserve.errors import PrefixNotFound, PrefixServeError

from .format import PREFIX_ID, check_prefix_id

SUFFIX = ".safetensors"


class PrefixExists(PrefixServeError):
    kind = "conflict"


class DurableStore:
    def __init__(self, url: str | Path) -> None:
        self.fs, root = fsspec.core.url_to_fs(str(url))
        self.root = root.rstrip("/")
        self.local = isinstance(self.fs, LocalFileSystem)
        self.fs.makedirs(self.root, exist_ok=True)

    def path(self, prefix_id: str) -> str:
        return f"{self.root}/{check_prefix_id(prefix_id)}{SUFFIX}"

    def put(self, prefix_id: str, data: bytes) -> None:
        """Publish a new prefix file atomically; an existing id is never overwritten."""
        final = self.path(prefix_id)
        if self.local:
            self._put_local(final, data)
        else:
            if self.fs.exists(final):
                raise PrefixExists(f"prefix {prefix_id!r} already exists")
            self.fs.pipe_file(final, data)

    def training_path(self, job_id: str) -> str:
        return f"{self.root}/training/{check_prefix_id(job_id)}.jsonl"

    def put_training_data(self, job_id: str, data: bytes) -> None:
        """A job's dataset (JSONL), written once, atomically, before the job is queued."""
        final = self.training_path(job_id)
        self.fs.makedirs(f"{self.root}/training", exist_ok=True)
        if self.local:
            self._put_local(final, data)
        else:
            self.fs.pipe_file(final, data)

    def get_training_data(self, job_id: str) -> bytes:
        return self._cat(self.training_path(job_id), job_id)

    def _cat(self, path: str, name: str) -> bytes:
        try:
            return self.fs.cat_file(path)
        except FileNotFoundError:
            raise PrefixNotFound(name) from None

    def _put_local(self, final: str, data: bytes) -> None:
        tmp = f"{self.root}/.tmp-{uuid.uuid4().hex}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            try:
                os.link(tmp, final)  # atomic, and refuses to replace an existing file
            except FileExistsError:
                raise PrefixExists(f"prefix file {Path(final).name} already exists") from None
        finally:
            os.unlink(tmp)
        dir_fd = os.open(self.root, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    def get(self, prefix_id: str) -> bytes:
        return self._cat(self.path(prefix_id), prefix_id)

    def head(self, prefix_id: str, n: int) -> bytes:
        """The first n bytes (enough for the header, to list metadata without reading tensors)."""
        try:
            with self.fs.open(self.path(prefix_id), "rb") as f:
                return f.read(n)
        except FileNotFoundError:
            raise PrefixNotFound(prefix_id) from None

    def exists(self, prefix_id: str) -> bool:
        return self.fs.exists(self.path(prefix_id))

    def delete(self, prefix_id: str) -> bool:
        try:
            self.fs.rm_file(self.path(prefix_id))
        except FileNotFoundError:
            return False
        return True

    def ids(self) -> list[str]:
        """Every published prefix id (temp files and foreign names are ignored)."""
        out = []
        for p in self.fs.ls(self.root, detail=False):
            name = p.rstrip("/").rsplit("/", 1)[-1]
            if name.endswith(SUFFIX) and PREFIX_ID.match(name[: -len(SUFFIX)]):
                out.append(name[: -len(SUFFIX)])
        return sorted(out)
