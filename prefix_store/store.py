"""The durable store: the source of truth for prefix files (architecture.md invariants 5 and 6).

A local directory by default, any fsspec URL (`s3://bucket/prefixes`, `memory://...`) as an option.
One file per prefix, `<id>.safetensors`; the metadata lives inside the file, so the store needs no
index. Ids are checked against a strict pattern before they become paths. Local writes are atomic:
temp file in the same directory, fsync, then a hard link to the final name (which fails rather than
overwrite), then the directory is fsynced; an id is visible only once its file is complete.
Object stores publish an object atomically on upload.

A full disk or an exhausted quota (ENOSPC, EDQUOT) raises `InsufficientStorage` (HTTP 507) and leaves
nothing behind: the temp file is removed and nothing is linked. Temp files left by a process that died
mid-write are swept (`sweep_temp`) when a server or worker starts.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import logging
import os
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import fsspec
from fsspec.implementations.local import LocalFileSystem

from .errors import PrefixNotFound, PrefixServeError
from .format import PREFIX_ID, check_prefix_id

log = logging.getLogger(__name__)

SUFFIX = ".safetensors"
TEMP = ".tmp-"
NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


class PrefixExists(PrefixServeError):
    kind = "conflict"
    status = 409


class InsufficientStorage(PrefixServeError):
    """The durable store's disk is full or its quota is spent (HTTP 507); nothing was published."""

    kind = "insufficient_storage"
    status = 507

    def __init__(self, what: str, exc: OSError) -> None:
        code = errno.errorcode.get(exc.errno or 0, str(exc.errno))
        super().__init__(
            f"the durable store has no space left for {what} ({code}: {exc.strerror or exc});"
            " nothing was published"
        )


@contextmanager
def _space_checked(what: str) -> Iterator[None]:
    """ENOSPC / EDQUOT from the filesystem -> InsufficientStorage naming what was being written."""
    try:
        yield
    except OSError as exc:
        if exc.errno in NO_SPACE:
            raise InsufficientStorage(what, exc) from exc
        raise


class StoreUnavailable(PrefixServeError):
    """A remote durable store (S3, ...) did not answer or failed (HTTP 503 with Retry-After): nothing was
    published, and what is already resident or cached keeps serving."""

    kind = "unavailable"
    status = 503
    retry_after = 5

    def __init__(self, what: str, exc: BaseException) -> None:
        super().__init__(f"the durable store is unavailable ({what}: {type(exc).__name__}); retry shortly")


_PASS = (PrefixServeError, FileNotFoundError, FileExistsError)


def _remote_guard(method: Callable) -> Callable:
    """On a remote store, an error that is not an answer (not found, exists, ours) -> StoreUnavailable."""

    @functools.wraps(method)
    def guarded(self: DurableStore, *args, **kwargs):
        if self.local:
            return method(self, *args, **kwargs)
        try:
            return method(self, *args, **kwargs)
        except _PASS:
            raise
        except Exception as exc:
            log.warning("the durable store failed (%s): %s", method.__name__, exc)
            raise StoreUnavailable(method.__name__.replace("_", " "), exc) from exc

    return guarded


class DurableStore:
    def __init__(self, url: str | Path) -> None:
        self.fs, root = fsspec.core.url_to_fs(str(url))
        self.root = root.rstrip("/")
        self.local = isinstance(self.fs, LocalFileSystem)
        self.fs.makedirs(self.root, exist_ok=True)

    def path(self, prefix_id: str) -> str:
        return f"{self.root}/{check_prefix_id(prefix_id)}{SUFFIX}"

    @_remote_guard
    def put(self, prefix_id: str, data: bytes) -> None:
        """Publish a new prefix file atomically; an existing id is never overwritten."""
        final = self.path(prefix_id)
        with _space_checked(f"prefix {prefix_id}"):
            self._write_once(final, data, f"prefix {prefix_id!r}")

    def training_path(self, job_id: str) -> str:
        return f"{self.root}/training/{check_prefix_id(job_id)}.jsonl"

    @_remote_guard
    def put_training_data(self, job_id: str, data: bytes) -> None:
        """A job's dataset (JSONL), written once, atomically, before the job is queued."""
        final = self.training_path(job_id)
        with _space_checked(f"the dataset of {job_id}"):
            self.fs.makedirs(f"{self.root}/training", exist_ok=True)
            if self.local:
                self._put_local(final, data)
            else:
                self.fs.pipe_file(final, data)

    @_remote_guard
    def get_training_data(self, job_id: str) -> bytes:
        return self._cat(self.training_path(job_id), job_id)

    @_remote_guard
    def delete_training_data(self, job_id: str) -> bool:
        return self._rm(self.training_path(job_id))

    # ---- training checkpoints: one file per job, replaced atomically each epoch -----------------
    def checkpoint_path(self, job_id: str) -> str:
        return f"{self.root}/checkpoints/{check_prefix_id(job_id)}{SUFFIX}"

    @_remote_guard
    def put_checkpoint(self, job_id: str, data: bytes) -> None:
        """Replace the job's checkpoint atomically (temp, fsync, rename): a reader sees the old one
        or the new one, never a mix."""
        final = self.checkpoint_path(job_id)
        with _space_checked(f"the checkpoint of {job_id}"):
            self.fs.makedirs(f"{self.root}/checkpoints", exist_ok=True)
            if self.local:
                self._put_local(final, data, replace=True)
            else:
                self.fs.pipe_file(final, data)

    @_remote_guard
    def get_checkpoint(self, job_id: str) -> bytes | None:
        try:
            return self.fs.cat_file(self.checkpoint_path(job_id))
        except FileNotFoundError:
            return None

    @_remote_guard
    def delete_checkpoint(self, job_id: str) -> bool:
        return self._rm(self.checkpoint_path(job_id))

    # ---- evaluation results: <root>/evaluations/<prefix id>/<tenant key>/<job id>.json, written once
    def evaluation_dir(self, prefix_id: str, tenant: str | None = None) -> str:
        """A prefix's evaluations, or one tenant's of them (each tenant reads only its own directory;
        a tenant's name is hashed into a file name)."""
        base = f"{self.root}/evaluations/{check_prefix_id(prefix_id)}"
        return base if tenant is None else f"{base}/t{hashlib.sha256(tenant.encode()).hexdigest()[:32]}"

    @_remote_guard
    def put_evaluation(self, prefix_id: str, tenant: str, job_id: str, data: bytes) -> None:
        """Store one evaluation of a prefix atomically; PrefixExists if that job already stored it."""
        directory = self.evaluation_dir(prefix_id, tenant)
        final = f"{directory}/{check_prefix_id(job_id)}.json"
        with _space_checked(f"the evaluation {job_id} of {prefix_id}"):
            self.fs.makedirs(directory, exist_ok=True)
            self._write_once(final, data, f"evaluation {job_id} of {prefix_id}")

    @_remote_guard
    def evaluations(self, prefix_id: str, tenant: str) -> list[bytes]:
        """One tenant's stored evaluations of a prefix (foreign files are ignored), unordered."""
        try:
            paths = self.fs.ls(self.evaluation_dir(prefix_id, tenant), detail=False)
        except FileNotFoundError:
            return []
        names = [(p, p.rstrip("/").rsplit("/", 1)[-1]) for p in paths]
        return [self.fs.cat_file(p) for p, n in names if n.endswith(".json") and PREFIX_ID.match(n[:-5])]

    @_remote_guard
    def delete_evaluations(self, prefix_id: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm(self.evaluation_dir(prefix_id), recursive=True)

    # ---- small JSON records (e.g. idempotency keys): <root>/<kind>/<name>.json, written once -----
    def record_path(self, kind: str, name: str) -> str:
        return f"{self.root}/{check_prefix_id(kind)}/{check_prefix_id(name)}.json"

    @_remote_guard
    def put_record(self, kind: str, name: str, data: bytes, replace: bool = False) -> None:
        """Write a record atomically: once (PrefixExists if it is already there), or with `replace` over
        the one there (a reader sees the old record or the new one, never a mix)."""
        final = self.record_path(kind, name)
        with _space_checked(f"the {kind} record {name}"):
            self.fs.makedirs(f"{self.root}/{kind}", exist_ok=True)
            if not replace:
                self._write_once(final, data, f"record {kind}/{name}")
            elif self.local:
                self._put_local(final, data, replace=True)
            else:
                self.fs.pipe_file(final, data)

    @_remote_guard
    def get_record(self, kind: str, name: str) -> bytes | None:
        try:
            return self.fs.cat_file(self.record_path(kind, name))
        except FileNotFoundError:
            return None

    @_remote_guard
    def delete_record(self, kind: str, name: str) -> bool:
        return self._rm(self.record_path(kind, name))

    @_remote_guard
    def record_names(self, kind: str) -> list[str]:
        """The names of every record of `kind` (foreign files are ignored)."""
        try:
            paths = self.fs.ls(f"{self.root}/{check_prefix_id(kind)}", detail=False)
        except FileNotFoundError:
            return []
        names = (p.rstrip("/").rsplit("/", 1)[-1] for p in paths)
        return sorted(n[:-5] for n in names if n.endswith(".json") and PREFIX_ID.match(n[:-5]))

    def sweep_temp(self, min_age_s: float, now: Callable[[], float] = time.time) -> list[str]:
        """Remove temp files older than `min_age_s` (left by a process that died mid-write; younger
        ones may belong to a write in progress on another replica). Returns the names removed."""
        if not self.local:
            return []  # object stores have no temp files: an upload is atomic
        removed = []
        for entry in os.scandir(self.root):
            if not entry.name.startswith(TEMP):
                continue
            try:
                if now() - entry.stat().st_mtime >= min_age_s:
                    os.unlink(entry.path)
                    removed.append(entry.name)
            except FileNotFoundError:  # another process swept or finished it
                continue
        if removed:
            log.info("swept %d leftover temp file(s) from %s", len(removed), self.root)
        return removed

    def _cat(self, path: str, name: str) -> bytes:
        try:
            return self.fs.cat_file(path)
        except FileNotFoundError:
            raise PrefixNotFound(name) from None

    def _write_once(self, final: str, data: bytes, what: str) -> None:
        """Write a new file atomically; PrefixExists (naming `what`) if it is already there. Exact on
        local disks (an atomic link); on object stores the existence check before the upload."""
        if self.local:
            self._put_local(final, data)
            return
        if self.fs.exists(final):
            raise PrefixExists(f"{what} already exists")
        self.fs.pipe_file(final, data)

    def _put_local(self, final: str, data: bytes, replace: bool = False) -> None:
        """Temp file, fsync, then link (no overwrite) or rename (`replace`), then fsync the directory.
        The temp file is removed whatever happens (a full disk included)."""
        tmp = f"{self.root}/{TEMP}{uuid.uuid4().hex}"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            if replace:
                os.replace(tmp, final)
            else:
                try:
                    os.link(tmp, final)  # atomic, and refuses to replace an existing file
                except FileExistsError:
                    raise PrefixExists(f"prefix file {Path(final).name} already exists") from None
        finally:
            with contextlib.suppress(FileNotFoundError):  # renamed, or never created
                os.unlink(tmp)
        dir_fd = os.open(os.path.dirname(final), os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    @_remote_guard
    def get(self, prefix_id: str) -> bytes:
        return self._cat(self.path(prefix_id), prefix_id)

    @_remote_guard
    def head(self, prefix_id: str, n: int) -> bytes:
        """The first n bytes (enough for the header, to list metadata without reading tensors)."""
        try:
            with self.fs.open(self.path(prefix_id), "rb") as f:
                return f.read(n)
        except FileNotFoundError:
            raise PrefixNotFound(prefix_id) from None

    @_remote_guard
    def exists(self, prefix_id: str) -> bool:
        return self.fs.exists(self.path(prefix_id))

    @_remote_guard
    def delete(self, prefix_id: str) -> bool:
        return self._rm(self.path(prefix_id))

    def _rm(self, path: str) -> bool:
        try:
            self.fs.rm_file(path)
        except FileNotFoundError:
            return False
        return True

    @_remote_guard
    def ids(self) -> list[str]:
        """Every published prefix id (temp files and foreign names are ignored)."""
        try:  # (an object store has no directories: no objects, no root)
            paths = self.fs.ls(self.root, detail=False)
        except FileNotFoundError:
            return []
        out = []
        for p in paths:
            name = p.rstrip("/").rsplit("/", 1)[-1]
            if name.endswith(SUFFIX) and PREFIX_ID.match(name[: -len(SUFFIX)]):
                out.append(name[: -len(SUFFIX)])
        return sorted(out)
