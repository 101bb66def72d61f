"""Keep a local checkpoint directory in sync with a store prefix, the way SageMaker does it.

A SageMaker job trains with a local directory (``/opt/ml/checkpoints``) tied to an S3 URI:
on start the URI's objects are restored into the empty directory, and while the job runs
files written there are uploaded. :func:`sync_checkpoints` does one such pass;
:func:`watch_checkpoints` does it and then keeps uploading from a background thread.

- **Restore** happens only into a directory with no files (or one whose previous restore was
  killed: a ``.s3pipes-restore-incomplete`` marker stays there until a restore finishes). Each
  object is downloaded to a temporary name next to its final one and renamed on success, so a
  killed restore never leaves a partial file under a real name; the file gets the object's
  modification time, so the next start sees it as unchanged.
- **Upload** sends files that are new or changed, each through ``Store.open(url, "wb")``: an
  object is replaced whole or not at all. "Changed" means, for files seen in this process,
  another ``(size, mtime_ns)`` than at their last upload or restore; at start, a different size
  than the object, no object, or a local mtime newer than the object's (at the store's
  resolution: S3 keeps whole seconds).
- **Never deleted**: neither remote objects (a file deleted locally stays in the store, as on
  SageMaker) nor local files.

Non-guarantees: one sync per directory and prefix at a time. A file rewritten in place is read
while it is written only if the writer pauses longer than the watcher's ``interval`` (a file is
uploaded once its size and mtime were the same on two consecutive polls, and uploaded again if
they changed during the upload); write to an excluded temporary name and ``os.replace`` it to be
exact. Objects changed in the store by someone else are not downloaded after the start. At start,
timestamps are compared across clocks: a local clock ahead of the store's re-uploads unchanged
files, one behind it misses a same-size edit made after the upload by less than the skew.
Symlinked directories are not followed.
"""

from __future__ import annotations

import calendar
import datetime
import fnmatch
import logging
import os
import stat
import sys
import threading
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, replace
from pathlib import Path
from types import TracebackType
from typing import Any

from s3pipes import errors
from s3pipes._units import human_bytes
from s3pipes.store import PART_SUFFIX, Store, _parse_timestamp

__all__ = ["DEFAULT_EXCLUDE", "CheckpointWatcher", "SyncResult", "sync_checkpoints", "watch_checkpoints"]

DEFAULT_EXCLUDE = ("*.tmp", "*.part", "*.swp", "*~")
"""Patterns never synced: temporary files of writers that save to a temp name and rename."""

_MARKER = ".s3pipes-restore-incomplete"
_CHUNK = 8 << 20
_ROUNDS = 3  # one-shot / final passes re-run while files change during their upload
_log = logging.getLogger(__name__)
_Stat = tuple[int, int]  # (size, mtime_ns)


@dataclass(frozen=True)
class SyncResult:
    """What a sync did; totals of files and bytes.

    Attributes:
        restored, restored_bytes: downloaded into an empty local directory.
        uploaded, uploaded_bytes: new or changed files uploaded (a file uploaded twice counts twice).
        unchanged: files found in the store as they are locally, at the last pass.
        skipped: files deleted locally before they could be uploaded (each logged).

    Example:
        >>> first = SyncResult(uploaded=2, uploaded_bytes=1000, unchanged=5)
        >>> later = SyncResult(uploaded=1, uploaded_bytes=24, unchanged=7)
        >>> first + later  # totals, with the later pass's unchanged
        SyncResult(restored=0 (0 B), uploaded=3 (1.0 KiB), unchanged=7, skipped=0)
    """

    restored: int = 0
    restored_bytes: int = 0
    uploaded: int = 0
    uploaded_bytes: int = 0
    unchanged: int = 0
    skipped: int = 0

    def __add__(self, other: SyncResult) -> SyncResult:
        """Totals of two passes, with ``other``'s ``unchanged`` (the later pass)."""
        return SyncResult(
            self.restored + other.restored,
            self.restored_bytes + other.restored_bytes,
            self.uploaded + other.uploaded,
            self.uploaded_bytes + other.uploaded_bytes,
            other.unchanged,
            self.skipped + other.skipped,
        )

    def __repr__(self) -> str:
        return (
            f"SyncResult(restored={self.restored} ({human_bytes(self.restored_bytes)}), uploaded={self.uploaded} "
            f"({human_bytes(self.uploaded_bytes)}), unchanged={self.unchanged}, skipped={self.skipped})"
        )


def _remote_mtime_ns(info: Mapping[str, Any]) -> int | None:
    """An object's modification time in ns, from S3 (``LastModified``), file:// (``mtime``) or memory://."""
    for key in ("LastModified", "last_modified", "mtime", "updated", "created"):
        value = info.get(key)
        if value is None or value == "" or isinstance(value, bool):
            continue
        if isinstance(value, int | float):
            return round(value * 1e9)
        moment = value if isinstance(value, datetime.datetime) else _parse_timestamp(value)
        moment = moment if moment.tzinfo else moment.replace(tzinfo=datetime.timezone.utc)
        return calendar.timegm(moment.utctimetuple()) * 10**9 + moment.microsecond * 1000
    return None


def _newer(local_ns: int, remote_ns: int) -> bool:
    """Whether a local mtime is newer than a remote one, at the remote's resolution.

    Example:
        >>> _newer(10_700_000_000, 10_000_000_000), _newer(11_000_000_000, 10_000_000_000)
        (False, True)
    """
    if remote_ns % 10**9 == 0:  # a store of whole seconds (S3) truncates: so do we
        local_ns -= local_ns % 10**9
    return local_ns > remote_ns


class _Bar:
    """A bytes progress bar (tqdm) shared by transfer threads, or nothing."""

    def __init__(self, enabled: bool, total: int, desc: str) -> None:
        self._lock = threading.Lock()
        self._bar: Any = None
        if enabled and total:
            from tqdm import tqdm

            self._bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc)

    def update(self, size: int) -> None:
        if self._bar is not None:
            with self._lock:
                self._bar.update(size)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


class _Syncer:
    """The state (what was uploaded or restored, at which size and mtime) and the passes over it."""

    def __init__(
        self, local_dir: Path, url: str, store: Store, exclude: tuple[str, ...], progress: bool, workers: int
    ) -> None:
        self.local, self.url, self.store = local_dir, url, store
        self._exclude, self._progress, self._workers = exclude, progress, workers
        self._known: dict[str, _Stat] = {}  # rel -> stat at its last upload or restore
        self._last_look: dict[str, _Stat] = {}  # rel -> stat at the previous settle pass
        self._lock = threading.Lock()  # one pass at a time

    def _excluded(self, rel: str) -> bool:
        name = rel.rpartition("/")[2]
        if name == _MARKER or name.endswith(PART_SUFFIX):  # our downloads in flight, as Store's writes
            return True
        return any(fnmatch.fnmatchcase(rel, p) or fnmatch.fnmatchcase(name, p) for p in self._exclude)

    def _scan(self) -> dict[str, _Stat]:
        found: dict[str, _Stat] = {}
        for top, dirs, files in os.walk(self.local):
            dirs.sort()
            for name in sorted(files):
                rel = os.path.relpath(os.path.join(top, name), self.local).replace(os.sep, "/")
                try:
                    st = os.stat(os.path.join(top, name))
                except FileNotFoundError:  # deleted since the walk (or a dangling symlink)
                    continue
                if stat.S_ISREG(st.st_mode) and not self._excluded(rel):
                    found[rel] = (st.st_size, st.st_mtime_ns)
        return found

    def list_remote(self) -> dict[str, dict[str, Any]]:
        try:
            listing = self.store.list_info(self.url + "/")
        except errors.ObjectNotFound:  # nothing there yet (file://, memory://); a missing bucket still raises
            return {}
        remote = {}
        for key, info in listing.items():
            rel = key[len(self.url) + 1 :] if key.startswith(self.url + "/") else ""
            if not rel or any(part in ("", ".", "..") for part in rel.split("/")):
                continue  # a "directory" marker, or a key that would escape local_dir
            if not self._excluded(rel):
                remote[rel] = info
        return self._one_kind_per_name(remote)

    def _one_kind_per_name(self, remote: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        """``remote`` without the older side of each name that is both an object and a "directory"
        of others (``ckpt`` and ``ckpt/model.pt``: a synced file later replaced by a directory,
        or the reverse, both kept since sync never deletes). A local directory holds one of them.
        """
        under: dict[str, list[str]] = {}
        for rel in remote:
            parts = rel.split("/")
            for depth in range(1, len(parts)):
                if (prefix := "/".join(parts[:depth])) in remote:
                    under.setdefault(prefix, []).append(rel)
        left_out: set[str] = set()
        for name in sorted(under):
            if name in left_out:
                continue
            children = under[name]
            as_file = _remote_mtime_ns(remote[name]) or 0
            as_directory = max(_remote_mtime_ns(remote[child]) or 0 for child in children)
            newer, older = ("object", "directory") if as_file > as_directory else ("directory", "object")
            left_out.update(children if as_file > as_directory else [name])
            _log.warning(
                "%s/%s is both an object and a directory of %d object(s) in the store; a local directory "
                "holds one: restoring the newer %s, leaving out the %s (delete it from the store to keep this quiet)",
                self.url, name, len(children), newer, older,
            )  # fmt: skip
        return {rel: info for rel, info in remote.items() if rel not in left_out}

    def _transfer(
        self, label: str, jobs: Iterable[tuple[str, Callable[[_Bar], Any]]], total: int
    ) -> tuple[list[Any], Exception | None]:
        """Run ``jobs`` on the pool: the results of those that succeeded, and the first error."""
        results: list[Any] = []
        failure: Exception | None = None
        bar = _Bar(self._progress, total, f"{label} {self.url}")
        try:
            with ThreadPoolExecutor(self._workers, thread_name_prefix="s3pipes-sync") as pool:
                futures = {pool.submit(job, bar): rel for rel, job in jobs}
                for future in as_completed(futures):
                    try:
                        results.append(future.result())
                    except Exception as exc:
                        failure = failure or exc
        finally:
            bar.close()
        return results, failure

    # -- restore --------------------------------------------------------------------------------

    def restore_needed(self) -> bool:
        if self.local.exists() and not self.local.is_dir():
            raise NotADirectoryError(f"local_dir={str(self.local)!r} is a file; sync needs a directory")
        return (self.local / _MARKER).exists() or not self._scan()

    def restore(self, remote: Mapping[str, Mapping[str, Any]]) -> SyncResult:
        marker = self.local / _MARKER
        self.local.mkdir(parents=True, exist_ok=True)
        marker.touch()
        for leftover in self.local.rglob(f"*{PART_SUFFIX}"):  # of a killed restore
            leftover.unlink(missing_ok=True)
        todo = {rel: info for rel, info in remote.items() if not self._restored_already(rel, info)}
        total = sum(int(info.get("size") or 0) for info in todo.values())
        jobs = [(rel, self._downloader(rel, info)) for rel, info in todo.items()]
        done, failure = self._transfer("restore", jobs, total)
        self._known.update(done)
        if failure is not None:
            raise failure  # the marker stays: the next start finishes the restore
        marker.unlink()
        _log.info("restored %d file(s) (%s) from %s into %s", len(done), human_bytes(total), self.url, self.local)
        return SyncResult(restored=len(done), restored_bytes=sum(st[0] for _, st in done))

    def _restored_already(self, rel: str, info: Mapping[str, Any]) -> bool:
        path = self.local / rel  # by an earlier, killed restore: only restores write under real names then
        return path.is_file() and path.stat().st_size == int(info.get("size") or 0)

    def _downloader(self, rel: str, info: Mapping[str, Any]) -> Callable[[_Bar], tuple[str, _Stat]]:
        def download(bar: _Bar) -> tuple[str, _Stat]:
            dest = self.local / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            part = dest.with_name(f".{dest.name}.{uuid.uuid4().hex[:8]}{PART_SUFFIX}")
            try:
                with self.store.open(f"{self.url}/{rel}", "rb") as src, open(part, "wb") as dst:
                    while chunk := src.read(_CHUNK):
                        dst.write(chunk)
                        bar.update(len(chunk))
                mtime_ns = _remote_mtime_ns(info)
                if mtime_ns is not None:
                    os.utime(part, ns=(mtime_ns, mtime_ns))
                os.replace(part, dest)
            except BaseException:
                part.unlink(missing_ok=True)
                raise
            st = dest.stat()
            return rel, (st.st_size, st.st_mtime_ns)

        return download

    # -- upload ---------------------------------------------------------------------------------

    def upload_pass(self, *, settle: bool, remote: Mapping[str, Mapping[str, Any]] | None = None) -> _Pass:
        """Upload what differs from the last upload (or, first, from ``remote``).

        With ``settle``, a file is uploaded only if it looked the same at the previous settle pass.
        """
        with self._lock:
            current = self._scan()
            todo, unchanged = [], 0
            for rel, st in current.items():
                if self._known.get(rel) == st or (rel not in self._known and remote and _same(st, remote.get(rel))):
                    self._known[rel] = st
                    unchanged += 1
                elif not settle or self._last_look.get(rel) == st:
                    todo.append(rel)
            self._last_look = current
            self._known = {rel: st for rel, st in self._known.items() if rel in current}
            total = sum(current[rel][0] for rel in todo)
            done, failure = self._transfer("upload", [(rel, self._uploader(rel)) for rel in todo], total)
            uploaded = [(rel, st) for rel, st, _ in done if st is not None]
            self._known.update(uploaded)
            if failure is not None:
                raise failure
            result = SyncResult(
                uploaded=len(uploaded),
                uploaded_bytes=sum(st[0] for _, st in uploaded),
                unchanged=unchanged,
                skipped=len(done) - len(uploaded),
            )
            if uploaded:
                _log.info(
                    "uploaded %d file(s) (%s) from %s to %s", len(uploaded), human_bytes(total), self.local, self.url
                )
            return _Pass(result, [rel for rel, _, changed in done if changed])

    def final_pass(self, remote: Mapping[str, Mapping[str, Any]] | None = None) -> SyncResult:
        """Upload everything that differs, again while files change during their upload."""
        total: SyncResult | None = None
        for _ in range(_ROUNDS):
            outcome = self.upload_pass(settle=False, remote=remote)
            remote = None  # later rounds compare with what this process uploaded
            total = outcome.result if total is None else replace(total + outcome.result, unchanged=total.unchanged)
            if not outcome.changed:
                return total
        _log.warning("%s kept changing during their uploads; the stored copies may be torn", outcome.changed)
        return total or SyncResult()

    def _uploader(self, rel: str) -> Callable[[_Bar], tuple[str, _Stat | None, bool]]:
        def upload(bar: _Bar) -> tuple[str, _Stat | None, bool]:
            path = self.local / rel
            try:
                src = open(path, "rb")  # noqa: SIM115 (closed by the with below; a missing file is skipped)
            except FileNotFoundError:
                _log.info("skipped %s: deleted before it could be uploaded to %s", path, self.url)
                return rel, None, False
            with src:
                before = os.fstat(src.fileno())
                with self.store.open(f"{self.url}/{rel}", "wb") as dst:
                    while chunk := src.read(_CHUNK):
                        dst.write(chunk)
                        bar.update(len(chunk))
            try:
                after = os.stat(path)
            except FileNotFoundError:
                after = before  # deleted since: what was uploaded is its last version
            sent: _Stat = (before.st_size, before.st_mtime_ns)
            return rel, sent, (after.st_size, after.st_mtime_ns, after.st_ino) != (*sent, before.st_ino)

        return upload


@dataclass(frozen=True)
class _Pass:
    result: SyncResult
    changed: list[str]  # files that changed while they were uploaded


def _same(local: _Stat, info: Mapping[str, Any] | None) -> bool:
    """Whether an object matches a local file not seen in this process: same size, not older."""
    if info is None or int(info.get("size") or 0) != local[0]:
        return False
    remote_ns = _remote_mtime_ns(info)
    return remote_ns is not None and not _newer(local[1], remote_ns)


def _syncer(
    local_dir: str | os.PathLike[str],
    url: str,
    store: Store | None,
    exclude: Sequence[str],
    progress: bool | None,
    workers: int,
) -> _Syncer:
    if not isinstance(url, str) or not url.rstrip("/") or url.rstrip("/").endswith(":"):
        raise ValueError(f"{url=} must name a prefix, e.g. 's3://bucket/project/run/checkpoints'")
    if isinstance(exclude, str):
        raise ValueError(f"{exclude=} must be a sequence of patterns, e.g. ({exclude!r},)")
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"{workers=} must be a positive int")
    if progress is None:
        progress = sys.stderr is not None and sys.stderr.isatty()
    store = store if store is not None else Store.from_env()
    return _Syncer(Path(local_dir), url.rstrip("/"), store, tuple(exclude), progress, workers)


def _first_pass(syncer: _Syncer) -> SyncResult:
    restore = syncer.restore_needed()
    remote = syncer.list_remote()
    restored = syncer.restore(remote) if restore else SyncResult()
    return restored + syncer.final_pass(remote)


def sync_checkpoints(
    local_dir: str | os.PathLike[str],
    url: str,
    *,
    store: Store | None = None,
    exclude: Sequence[str] = DEFAULT_EXCLUDE,
    progress: bool | None = None,
    workers: int = 4,
) -> SyncResult:
    """One sync pass: restore ``url`` into an empty ``local_dir``, then upload new and changed files.

    Never deletes anything, here or in the store (see the module docstring for what "changed" means).

    Args:
        local_dir: the local checkpoint directory (created if missing), e.g. ``/opt/ml/checkpoints``.
        url: the prefix it mirrors, e.g. ``"s3://bucket/project/run/checkpoints"`` (any URL the store opens).
        store: the :class:`~s3pipes.Store` to go through; ``Store.from_env()`` when None.
        exclude: ``fnmatch`` patterns, matched against the relative path and the file name, of files
            neither uploaded nor restored.
        progress: a bytes progress bar on stderr; None shows it when stderr is a terminal.
        workers: concurrent transfers.

    Returns:
        What was restored, uploaded, found unchanged, and skipped (files deleted during the pass).

    Raises:
        StoreError: e.g. ``BucketNotFound``, ``AccessDenied`` (naming the URL); files transferred
            before the error are kept, and a restore interrupted by it is finished by the next call.
        NotADirectoryError: ``local_dir`` is a file.
        ValueError: an invalid argument, named.

    Example:
        >>> import tempfile
        >>> tmp = tempfile.TemporaryDirectory()
        >>> training, fresh = Path(tmp.name, "a"), Path(tmp.name, "b")
        >>> training.mkdir()
        >>> _ = (training / "step-1.pt").write_bytes(b"weights")
        >>> sync_checkpoints(training, "memory://doc-sync/run", store=Store(), progress=False)
        SyncResult(restored=0 (0 B), uploaded=1 (7 B), unchanged=0, skipped=0)
        >>> sync_checkpoints(fresh, "memory://doc-sync/run", store=Store(), progress=False)
        SyncResult(restored=1 (7 B), uploaded=0 (0 B), unchanged=1, skipped=0)
        >>> (fresh / "step-1.pt").read_bytes()
        b'weights'
        >>> tmp.cleanup()
    """
    return _first_pass(_syncer(local_dir, url, store, exclude, progress, workers))


def watch_checkpoints(
    local_dir: str | os.PathLike[str],
    url: str,
    *,
    store: Store | None = None,
    interval: float = 10.0,
    exclude: Sequence[str] = DEFAULT_EXCLUDE,
    progress: bool | None = None,
    workers: int = 4,
) -> CheckpointWatcher:
    """:func:`sync_checkpoints`, then keep uploading new and changed files until ``stop()``.

    Same as ``CheckpointWatcher(local_dir, url, ...)``; the arguments are described there.

    Example:
        >>> import tempfile
        >>> tmp = tempfile.TemporaryDirectory()
        >>> with watch_checkpoints(tmp.name, "memory://doc-watch/run", store=Store(), progress=False) as sync:
        ...     _ = Path(tmp.name, "step-1.pt").write_bytes(b"weights")
        >>> sync.result
        SyncResult(restored=0 (0 B), uploaded=1 (7 B), unchanged=0, skipped=0)
        >>> tmp.cleanup()
    """
    return CheckpointWatcher(
        local_dir, url, store=store, interval=interval, exclude=exclude, progress=progress, workers=workers
    )


class CheckpointWatcher:
    """A local checkpoint directory uploaded to ``url`` as it changes, by a daemon thread.

    Constructing one runs :func:`sync_checkpoints` (restore into an empty directory, upload what
    differs) in the caller's thread, then polls ``local_dir`` every ``interval`` seconds. A new or
    changed file is uploaded once its size and mtime were the same on two consecutive polls (so a
    file being written is not published half-written as if final), and again later if it changed
    during its upload. :meth:`stop` (or leaving the ``with`` block) uploads everything that still
    differs, without waiting for files to settle. Without ``stop()``, files written after the last
    poll are not uploaded when the process exits.

    Args:
        local_dir: as for :func:`sync_checkpoints`.
        url: as for :func:`sync_checkpoints`.
        store: as for :func:`sync_checkpoints`.
        interval: seconds between polls, and how long a file must stay unchanged before its upload.
        exclude: as for :func:`sync_checkpoints`.
        progress: as for :func:`sync_checkpoints`.
        workers: as for :func:`sync_checkpoints`.

    Raises:
        As :func:`sync_checkpoints`, for the first pass. A store that cannot be reached during a
        poll is retried at the next one; any other error ends the polling (logged at once) and is
        raised by :meth:`stop`.

    Example:
        >>> import tempfile
        >>> tmp = tempfile.TemporaryDirectory()
        >>> watcher = CheckpointWatcher(tmp.name, "memory://doc-watcher/run", store=Store(), progress=False)
        >>> watcher.running
        True
        >>> _ = Path(tmp.name, "step-1.pt").write_bytes(b"weights")
        >>> watcher.stop()
        SyncResult(restored=0 (0 B), uploaded=1 (7 B), unchanged=0, skipped=0)
        >>> watcher.running, Store().read_bytes("memory://doc-watcher/run/step-1.pt")
        (False, b'weights')
        >>> tmp.cleanup()
    """

    def __init__(
        self,
        local_dir: str | os.PathLike[str],
        url: str,
        *,
        store: Store | None = None,
        interval: float = 10.0,
        exclude: Sequence[str] = DEFAULT_EXCLUDE,
        progress: bool | None = None,
        workers: int = 4,
    ) -> None:
        if isinstance(interval, bool) or not isinstance(interval, int | float) or not interval > 0:
            raise ValueError(f"{interval=} must be a positive number of seconds")
        self.interval = float(interval)
        self._syncer = _syncer(local_dir, url, store, exclude, progress, workers)
        self._result = _first_pass(self._syncer)
        self._lock, self._stop_lock, self._wake = threading.Lock(), threading.Lock(), threading.Event()
        self._error: Exception | None = None
        self._outcome: SyncResult | Exception | None = None
        self._thread = threading.Thread(target=self._run, name="s3pipes-sync-watch", daemon=True)
        self._thread.start()

    @property
    def local_dir(self) -> Path:
        return self._syncer.local

    @property
    def url(self) -> str:
        return self._syncer.url

    @property
    def running(self) -> bool:
        """Whether the polling thread runs (False after ``stop()`` or an error)."""
        return self._thread.is_alive()

    @property
    def result(self) -> SyncResult:
        """Totals so far, the first pass included."""
        with self._lock:
            return self._result

    def _run(self) -> None:
        while not self._wake.wait(self.interval):
            try:
                outcome = self._syncer.upload_pass(settle=True)
            except errors.EndpointError as exc:
                _log.warning(
                    "could not upload %s to %s, will retry in %g s: %s", self.local_dir, self.url, self.interval, exc
                )
                continue
            except Exception as exc:
                self._error = exc
                _log.error("stopped uploading %s to %s (stop() raises this): %s", self.local_dir, self.url, exc)
                return
            with self._lock:
                self._result = self._result + outcome.result

    def stop(self) -> SyncResult:
        """Stop polling, upload what still differs, and return the totals. Idempotent.

        Raises:
            StoreError: the error that ended the polling, or one of this final pass.

        Example:
            >>> import tempfile
            >>> tmp = tempfile.TemporaryDirectory()
            >>> watcher = CheckpointWatcher(tmp.name, "memory://doc-watcher-stop/run", store=Store(), interval=60)
            >>> _ = Path(tmp.name, "a.pt").write_bytes(b"abc")  # written after the last poll
            >>> watcher.stop()  # uploaded now, without waiting for the next poll
            SyncResult(restored=0 (0 B), uploaded=1 (3 B), unchanged=0, skipped=0)
            >>> watcher.stop()  # again: the same totals, nothing more done
            SyncResult(restored=0 (0 B), uploaded=1 (3 B), unchanged=0, skipped=0)
            >>> tmp.cleanup()
        """
        with self._stop_lock:
            if self._outcome is None:
                self._wake.set()
                self._thread.join()
                try:
                    if self._error is not None:
                        raise self._error
                    final = self._syncer.final_pass()
                    with self._lock:
                        self._result = self._result + final
                    self._outcome = self._result
                except Exception as exc:
                    self._outcome = exc
            if isinstance(self._outcome, Exception):
                raise self._outcome
            return self._outcome

    def __enter__(self) -> CheckpointWatcher:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is None:
            self.stop()
            return
        try:  # still upload what is there; do not replace the exception on its way out
            self.stop()
        except Exception as error:
            _log.error(
                "sync of %s to %s failed while handling %s: %s", self.local_dir, self.url, exc_type.__name__, error
            )

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"CheckpointWatcher({str(self.local_dir)!r} -> {self.url!r}, interval={self.interval:g}, {state})"
