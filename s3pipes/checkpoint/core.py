"""Checkpoints of PyTorch state dicts in the store: payload first, marker last, old steps retained or not.

Layout under a run prefix such as ``s3://ckpts/project/experiment/run``::

    <run>/step-000000123/state.pt          payload: torch.save of the state, streamed in parts
    <run>/step-000000123/COMMITTED.json    marker, written LAST: step, payload name, size, sha256, ...
    <run>/latest.json                      pointer to the step saved last, written after its marker
    <run>/<name>                           anything else: writer(name) / reader(name) / save(key=name)

A step saved with ``save_sharded`` (torch.distributed.checkpoint, every rank writing its
share; see :mod:`.sharded`) holds DCP's files instead of ``state.pt``::

    <run>/step-000000124/dcp/__0_0.distcp  one file per rank (DCP's names), then dcp/.metadata (DCP's index)
    <run>/step-000000124/COMMITTED.json    marker, written LAST by rank 0: "kind": "dcp", "files": {name: size}

``steps()``, ``latest_step()``, ``load()`` and retention treat both kinds alike (``keep_last``
counts them together); ``load(step)`` of a sharded step assembles the whole state in one
process, ``load_sharded`` loads it in place on every rank.

A step is *committed* once its marker exists. ``save`` publishes the payload (an object
appears whole or not at all), then the marker, then ``latest.json``, then applies
retention; a process killed at any moment leaves at most an uncommitted step (a payload
without a marker, ignored), a payload its step's marker does not name (a re-save's,
ignored) or a stale pointer (``load`` falls back to the newest committed step). ``load``
checks the payload's size against the marker before reading it, and its sha256 as it
streams into ``torch.load`` (:mod:`s3pipes.transfer`); a mismatch is a
:class:`CorruptCheckpoint` whatever torch made of the bytes, so a partial or replaced
payload is never returned. The digest is known only once the payload is read: a
damaged payload is unpickled before it is refused, which with ``weights_only=False``
means any global it names may be imported (the marker guards integrity, not
authenticity: whoever can replace a payload can replace its marker).

Guarantees and non-guarantees:

- One writer per run. Readers may run concurrently; a step that retention deletes
  while it is being read fails that read (``load()`` then tries the next newest).
- ``latest.json`` wins over the step numbers: after ``load(step=3)`` and a new
  ``save(step=4)``, ``load()`` returns step 4 even if steps 5.. from an earlier
  timeline are still there. Without a valid pointer the highest committed step wins.
- Retention (``keep_last``) deletes, after the new step is committed, every older step
  beyond the ``keep_last`` highest ones (marker first, then payload), and leftovers of
  killed saves below the new step. On a versioned bucket deletes leave noncurrent
  versions behind: expire them with a lifecycle rule. Multipart uploads of a killed
  save are not aborted here either (a lifecycle rule again).
- Fixed-key mode (``save(state, key="model.pt")``) writes one object per save with no
  marker: the object is atomic by itself, and on a versioned bucket every save stays
  readable as a version (:meth:`CheckpointStore.versions`, ``load(key=, version_id=)``).

Errors (in the :mod:`s3pipes.errors` tree)::

    ObjectNotFound(FileNotFoundError)
    └── CheckpointNotFound      no such committed step, or none at all (lists the ones there are)
    DataError(ValueError)
    ├── CorruptCheckpoint       payload (or a DCP file) does not match its marker, or is unreadable
    └── WeightsOnlyRefused      torch.load(weights_only=True) refused an object (also UnpicklingError)
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import pickle
import re
import secrets
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import IO, TYPE_CHECKING, Any, TypeVar, cast

import torch
from fsspec.core import split_protocol
from torch.serialization import MAP_LOCATION

from s3pipes import errors
from s3pipes.checkpoint import sharded
from s3pipes.errors import CheckpointNotFound, CorruptCheckpoint, WeightsOnlyRefused
from s3pipes.store import Store
from s3pipes.transfer import open_download, open_upload

if TYPE_CHECKING:
    from torch.distributed.checkpoint.metadata import Metadata

__all__ = ["CheckpointNotFound", "CheckpointStore", "CorruptCheckpoint", "ObjectVersion", "WeightsOnlyRefused"]

_FORMAT = "s3pipes.checkpoint/1"
_T = TypeVar("_T")
_STEP_DIR = re.compile(r"^step-(\d{9,})$")
_S3_PROTOCOLS = ("s3", "s3a")
_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ObjectVersion:
    """One version of an object in a versioned bucket, as :meth:`CheckpointStore.versions` lists them.

    Attributes:
        url: the object (without version).
        version_id: pass to ``load(key=..., version_id=...)``; ``"null"`` in an unversioned bucket.
        size: bytes. last_modified: when this version was written. is_latest: the current version.
    """

    url: str
    version_id: str
    size: int
    last_modified: datetime
    is_latest: bool


class _HashingWriter:
    """What ``torch.save`` writes to: counts (and with ``sha256``, hashes) the bytes on their way to the store file.

    torch turns an exception raised by ``write`` into a bare RuntimeError; the original (a
    translated store error) is kept in ``error`` and re-raised by the caller.
    """

    def __init__(self, file: IO[bytes], *, sha256: bool) -> None:
        self._file, self.size = file, 0
        self.sha256 = hashlib.sha256() if sha256 else None
        self.error: BaseException | None = None

    def write(self, data: bytes) -> int:
        try:
            written = self._file.write(data)
        except BaseException as exc:
            self.error = exc
            raise
        if self.sha256 is not None:
            self.sha256.update(data)
        self.size += memoryview(data).nbytes
        return written

    def flush(self) -> None:
        try:
            self._file.flush()
        except BaseException as exc:
            self.error = exc
            raise


def _is_s3(url: str) -> bool:
    return split_protocol(url)[0] in _S3_PROTOCOLS


def _check_step(step: int) -> int:
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"{step=} must be an int >= 0")
    return step


def _torch_load(
    data: bytes | IO[bytes] | io.RawIOBase, url: str, map_location: MAP_LOCATION, weights_only: bool
) -> Any:
    """``torch.load`` of ``data`` (bytes or a seekable file), with its failures named after ``url``."""
    file = io.BytesIO(data) if isinstance(data, bytes) else cast(IO[bytes], data)  # torch reads any binary file
    try:
        return torch.load(file, map_location=map_location, weights_only=weights_only)
    except Exception as exc:
        failed = getattr(file, "error", None)  # a ParallelReader's store error, which torch wraps
        if failed is not None:
            raise failed from failed.__cause__  # the backend's exception stays its cause
        named = _load_error(exc, url, weights_only, _head(file))
        if named is exc:
            raise
        raise named from exc


# How every torch.save file begins: a zip's local header (the format since torch 1.6), or, in
# the legacy format, a pickle whose first object is torch's magic number (after the protocol
# and, from protocol 4, a frame header: within the first 32 bytes).
_ZIP_HEAD = b"PK\x03\x04"
_LEGACY_MAGIC = pickle.dumps(torch.serialization.MAGIC_NUMBER, protocol=2)[2:-1]  # the LONG1 opcode and number


def _is_torch_save(head: bytes) -> bool:
    return head.startswith(_ZIP_HEAD) or (head.startswith(b"\x80") and _LEGACY_MAGIC in head)


def _head(file: IO[bytes]) -> bytes | None:
    """The first 32 bytes of ``file`` (None if it cannot be read again)."""
    try:
        file.seek(0)
        return file.read(32)
    except Exception:
        return None


def _load_error(exc: Exception, url: str, weights_only: bool, head: bytes | None = None) -> Exception:
    """Why ``torch.load`` failed on ``url``: a refused object, a damaged file, or ``exc`` itself (neither).

    ``head``, the file's first bytes, tells a file that is no torch.save at all (text, JSON, a
    plain pickle, random bytes) from one whose object the weights-only unpickler refused.
    """
    if head is not None and not _is_torch_save(head):
        what = "empty" if not head else f"it begins {head[:8]!r}"
        return CorruptCheckpoint(url, f"not a torch.save file ({what}; torch.load: {type(exc).__name__}: {exc})")
    if isinstance(exc, pickle.UnpicklingError):
        if weights_only and "weights only" in str(exc).lower():
            reason = str(exc).partition("WeightsUnpickler error:")[2].strip().split("\n\n")[0].strip()
            return WeightsOnlyRefused(
                url,
                f"torch.load(weights_only=True) refused an object in it ({reason or 'see the cause'}). "
                "If you trust the file, "
                "load it with weights_only=False, or allow the type with torch.serialization.add_safe_globals",
            )
        return CorruptCheckpoint(url, f"not a readable torch.save file: {exc}")
    about_the_file = not isinstance(exc, RuntimeError) or any(
        clue in str(exc) for clue in ("zip archive", "PytorchStreamReader", "inline_container", "magic number")
    )
    if isinstance(exc, (EOFError, RuntimeError, ValueError)) and about_the_file:
        return CorruptCheckpoint(url, f"not a readable torch.save file ({type(exc).__name__}: {exc})")
    return exc  # e.g. a map_location that names a device this machine lacks: not the file's fault


class CheckpointStore:
    """Save and load state dicts under one run prefix, atomically (see the module docstring for the layout).

    Args:
        url: the run prefix, e.g. ``"s3://ckpts/project/experiment/run"`` (any fsspec URL).
        keep_last: after each committed save keep only this many highest steps; None keeps all.
        store: the :class:`~s3pipes.Store` to go through; ``Store.from_env()`` when None.

    Raises:
        ValueError: ``keep_last`` is not a positive int, or ``url`` is empty.

    Example:
        >>> ckpt = CheckpointStore("memory://doc-ckpt/run", keep_last=2, store=Store())
        >>> for epoch in range(3):
        ...     _ = ckpt.save({"w": torch.full((2,), float(epoch))}, step=epoch)
        >>> ckpt.steps(), ckpt.load()["w"].tolist()
        ([1, 2], [2.0, 2.0])
    """

    STEP_FORMAT = "step-{:09d}"
    PAYLOAD_NAME = "state.pt"
    MARKER_NAME = "COMMITTED.json"
    LATEST_NAME = "latest.json"

    def __init__(self, url: str, *, keep_last: int | None = None, store: Store | None = None) -> None:
        if keep_last is not None and (isinstance(keep_last, bool) or not isinstance(keep_last, int) or keep_last < 1):
            raise ValueError(f"{keep_last=} must be a positive int, or None to keep every step")
        self.url = url.rstrip("/")
        if not self.url or self.url.endswith("://"):
            raise ValueError(f"{url=} must name a run prefix, e.g. 's3://bucket/project/experiment/run'")
        self.keep_last = keep_last
        self.store = store if store is not None else Store.from_env()

    def __repr__(self) -> str:
        return f"CheckpointStore({self.url!r}, keep_last={self.keep_last})"

    # -- names ----------------------------------------------------------------------------------

    def step_url(self, step: int) -> str:
        """The directory of ``step``: ``<run>/step-000000123``.

        Example:
            >>> CheckpointStore("memory://doc-step-url/run", store=Store()).step_url(123)
            'memory://doc-step-url/run/step-000000123'
        """
        return f"{self.url}/{self.STEP_FORMAT.format(_check_step(step))}"

    def object_url(self, name: str) -> str:
        """The URL of ``name`` under the run, for raw objects and fixed-key saves.

        Raises:
            ValueError: ``name`` is absolute, has empty/``.``/``..`` parts, or is one of the
                names the step layout owns (``latest.json``, ``step-*``).

        Example:
            >>> ckpt = CheckpointStore("memory://doc-object-url/run", store=Store())
            >>> ckpt.object_url("models/model.pt")
            'memory://doc-object-url/run/models/model.pt'
            >>> ckpt.object_url("latest.json")
            Traceback (most recent call last):
            ...
            ValueError: name='latest.json' is reserved for the step layout (latest.json, step-*/); pick another
        """
        parts = name.split("/") if isinstance(name, str) else [""]
        if any(part in ("", ".", "..") for part in parts):
            raise ValueError(f"{name=} must be a relative object name like 'extra.pt' or 'models/model.pt'")
        if name == self.LATEST_NAME or _STEP_DIR.match(parts[0]):
            raise ValueError(f"{name=} is reserved for the step layout ({self.LATEST_NAME}, step-*/); pick another")
        return f"{self.url}/{name}"

    # -- saving ---------------------------------------------------------------------------------

    def save(self, state: Mapping[str, Any], *, step: int | None = None, key: str | None = None) -> str:
        """Save ``state`` as ``step`` (committed by its marker), or to the fixed object ``key``.

        Args:
            state: what ``torch.save`` takes, typically ``{"model": ..., "optim": ..., "data": ...}``.
            step: the step number (an int >= 0). Saving a step again replaces it: the new payload
                goes beside the old one (``state-<random>.pt``), the new marker names it, then the
                old payload is deleted; until the marker is written the step is the old one, so a
                failed or killed save leaves it as it was.
            key: instead of ``step``: one object under the run (``"model.pt"``), replaced on each
                save; on a versioned bucket every save stays as a version. No marker, no retention.

        Returns:
            The URL of the payload object.

        Raises:
            ValueError: neither or both of ``step`` and ``key``.
            StoreError: the store refused (``BucketNotFound``, ``CredentialsRejected``, ...);
                nothing is committed then.

        Example:
            >>> ckpt = CheckpointStore("memory://doc-save/run", store=Store())
            >>> ckpt.save({"w": torch.ones(2)}, step=10)
            'memory://doc-save/run/step-000000010/state.pt'
            >>> ckpt.save({"w": torch.ones(2)}, key="model.pt")
            'memory://doc-save/run/model.pt'
            >>> ckpt.steps()
            [10]
        """
        if (step is None) == (key is None):
            raise ValueError(
                f"save needs exactly one of step= or key=, got {step=}, {key=}: step= for the step layout, "
                "key= for one fixed object (keep the epoch inside the state)"
            )
        if key is not None:
            url = self.object_url(key)
            self._write_payload(url, state, sha256=False)  # no marker to record a digest in
            return url
        assert step is not None
        step_url = self.step_url(step)
        replaced = self._read_marker(step)  # one GET; a missing bucket fails here, early
        name = self.PAYLOAD_NAME
        if replaced is not None and replaced["payload"] == name:  # keep the committed payload until the new one is
            name = f"state-{secrets.token_hex(4)}.pt"
        payload_url = f"{step_url}/{name}"
        size, sha256 = self._write_payload(payload_url, state, sha256=True)
        marker = {
            "format": _FORMAT,
            "step": step,
            "payload": name,
            "size": size,
            "sha256": sha256,
            "created": time.time(),
            "torch": torch.__version__,
        }
        self._commit(step, marker, replaced)
        return payload_url

    def _commit(self, step: int, marker: dict[str, Any], replaced: dict[str, Any] | None = None) -> None:
        """Write the marker of ``step`` (its payload is complete), then the pointer, then delete the
        payload of the ``replaced`` marker (a plain one), then apply retention."""
        marker_url = f"{self.step_url(step)}/{self.MARKER_NAME}"
        self.store.write_bytes(marker_url, json.dumps(marker, indent=1).encode())
        latest = {"format": _FORMAT, "step": step, "marker": f"{self.STEP_FORMAT.format(step)}/{self.MARKER_NAME}"}
        self.store.write_bytes(f"{self.url}/{self.LATEST_NAME}", json.dumps(latest).encode())
        if replaced is not None and "kind" not in replaced and replaced["payload"] != marker["payload"]:
            with contextlib.suppress(errors.ObjectNotFound):
                self.store.delete(f"{self.step_url(step)}/{replaced['payload']}")
        if self.keep_last is not None:
            self._retain(step)

    def _write_payload(self, url: str, state: object, *, sha256: bool) -> tuple[int, str]:
        """``torch.save`` streamed to ``url``, published on success only; returns (size, sha256 or "").

        The digest costs ~0.22 s of CPU per 256 MiB here: only a step's marker records it.
        """
        with open_upload(self.store, url) as file:
            writer = _HashingWriter(file, sha256=sha256)
            try:
                torch.save(state, writer)  # type: ignore[arg-type]  # torch wants IO[bytes]; write/flush suffice
            except Exception:
                if writer.error is not None:
                    raise writer.error from writer.error.__cause__  # the backend's exception stays its cause
                raise
        return writer.size, writer.sha256.hexdigest() if writer.sha256 is not None else ""

    def _retain(self, saved: int) -> None:
        """Delete steps beyond ``keep_last`` (never ``saved``) and killed saves' leftovers below ``saved``."""
        assert self.keep_last is not None
        layout = self._scan()
        committed = sorted(step for step, files in layout.items() if self.MARKER_NAME in files)
        keep = set(committed[-self.keep_last :]) | {saved}
        doomed = [s for s in committed if s not in keep] + [s for s in layout if s < saved and s not in committed]
        for step in sorted(doomed):
            names = sorted(layout[step], key=lambda name: name != self.MARKER_NAME)  # the marker first
            for name in names:
                with contextlib.suppress(errors.ObjectNotFound):
                    self.store.delete(f"{self.step_url(step)}/{name}")

    # -- sharded steps (torch.distributed.checkpoint, see .sharded) -----------------------------

    def save_sharded(self, state_dict: dict[str, Any], *, step: int) -> str:
        """Save ``state_dict`` as ``step`` with ``torch.distributed.checkpoint``; every rank calls it.

        Each rank writes its own share (the local shards of DTensors; a value every rank holds
        alike is written once). Rank 0 (or the only process, without a process group) first
        uncommits and clears an existing ``step``; after DCP, once every file DCP wrote is
        listed, it writes the marker (``"kind": "dcp"``), then ``latest.json``, then applies
        retention. No rank returns before the step is committed, and if any rank fails, every
        rank raises.

        Args:
            state_dict: what ``dcp.save`` takes: nested dicts and lists of tensors, DTensors,
                ``Stateful`` objects, and other picklable values.
            step: the step number (an int >= 0).

        Returns:
            The URL of the step's DCP directory (``<run>/step-NNNNNNNNN/dcp``).

        Raises:
            StoreError: the store refused (``BucketNotFound``, ``CredentialsRejected``, ...) on
                any rank; nothing is committed then.
            CorruptCheckpoint: a file DCP wrote is not listed whole afterwards; nothing is committed.

        Example:
            >>> ckpt = CheckpointStore("memory://doc-sharded/run", store=Store())
            >>> ckpt.save_sharded({"w": torch.ones(2), "epoch": 3}, step=7)
            'memory://doc-sharded/run/step-000000007/dcp'
            >>> state = {"w": torch.zeros(2), "epoch": 0}
            >>> ckpt.load_sharded(state), state["w"].tolist(), state["epoch"]
            (7, [1.0, 1.0], 3)
        """
        step_url = self.step_url(step)
        sharded.on_coordinator(lambda: self._clear_step(step))
        metadata = sharded.save(self.store, f"{step_url}/{sharded.PAYLOAD_DIR}", state_dict)
        sharded.on_coordinator(lambda: self._commit_sharded(step, metadata))
        return f"{step_url}/{sharded.PAYLOAD_DIR}"

    def _clear_step(self, step: int) -> None:
        """Uncommit ``step`` (its marker first), then delete the rest of it: a new save starts from nothing."""
        step_url = self.step_url(step)
        files = sharded.listed_files(self.store, step_url)  # one listing; a missing bucket fails here, early
        for name in sorted(files, key=lambda name: name != self.MARKER_NAME):
            with contextlib.suppress(errors.ObjectNotFound):
                self.store.delete(f"{step_url}/{name}")

    def _commit_sharded(self, step: int, metadata: Metadata) -> None:
        files = sharded.written_files(self.store, self.step_url(step), metadata)
        marker = {
            "format": _FORMAT,
            "kind": sharded.KIND,
            "step": step,
            "payload": sharded.PAYLOAD_DIR,
            "files": files,
            "size": sum(files.values()),
            "ranks": sharded.world_size(),
            "created": time.time(),
            "torch": torch.__version__,
        }
        self._commit(step, marker)

    def load_sharded(self, state_dict: dict[str, Any], *, step: int | None = None, weights_only: bool = True) -> int:
        """Load a step saved by :meth:`save_sharded` into ``state_dict``, in place; every rank calls it.

        Each rank reads what its own tensors need (a DTensor gets its local shards, resharded if
        the ranks differ from the save's); other values replace those in ``state_dict``, as
        ``dcp.load`` does. Rank 0 picks the step and checks its files against the marker.

        Args:
            state_dict: the structure to fill, as ``dcp.load`` takes it (the keys that were saved).
            step: a committed sharded step; None for the latest: the pointer's step if it is
                sharded, else the highest committed sharded step (an older one if it fails its check).
            weights_only: as for :meth:`load`; it covers DCP's metadata and non-tensor values too.

        Returns:
            The step loaded (the same on every rank).

        Raises:
            CheckpointNotFound: ``step`` is not committed (the message lists the sharded steps
                there are), or the run has no committed sharded step.
            ConfigError: ``step`` was saved with :meth:`save`: load it with ``load(step)``.
            CorruptCheckpoint: a file of the step is missing or does not match its marker.
            WeightsOnlyRefused: the step holds objects ``weights_only=True`` does not allow.
            StoreError: the store refused (``BucketNotFound``, ``CredentialsRejected``, ...).

        Example:
            >>> ckpt = CheckpointStore("memory://doc-load-sharded/run", store=Store())
            >>> for step in (1, 2):
            ...     _ = ckpt.save_sharded({"w": torch.full((2,), float(step))}, step=step)
            >>> state = {"w": torch.zeros(2)}
            >>> ckpt.load_sharded(state, step=1), state["w"].tolist()
            (1, [1.0, 1.0])

            In one process, without a process group, as here. Under ``torchrun`` every rank
            makes the same call with its own (DTensor) ``state_dict``; that needs several processes,
            so it is not run here::

                model_state = {"model": get_model_state_dict(model)}  # DTensors sharded by FSDP
                step = ckpt.load_sharded(model_state)                 # each rank reads its own shards
        """
        if step is not None:
            _check_step(step)
        chosen, metadata = sharded.on_coordinator(lambda: self._sharded_source(step, weights_only))
        check = (lambda data, url: _torch_load(data, url, None, True)) if weights_only else None
        payload_url = f"{self.step_url(chosen)}/{sharded.PAYLOAD_DIR}"
        sharded.load_into(self.store, payload_url, state_dict, metadata, check_value=check)
        return chosen

    def _sharded_source(self, step: int | None, weights_only: bool) -> tuple[int, Metadata]:
        """On rank 0: the sharded step to load, and its DCP metadata once its files match the marker."""
        if step is not None:
            marker = self._read_marker(step)
            if marker is None:
                available = sorted(s for s, m in self._committed().items() if m.get("kind") == sharded.KIND)
                raise CheckpointNotFound(self.step_url(step), self.store.endpoint(self.url), step, available)
            if marker.get("kind") != sharded.KIND:
                raise errors.ConfigError(
                    f"{self.step_url(step)}: step {step} was saved with save() (one torch.save payload), "
                    f"not save_sharded(): load it with load(step={step})"
                )
            return step, sharded.open_step(self.store, self.step_url(step), marker, weights_only=weights_only)
        candidates = {s: m for s, m in self._committed().items() if m.get("kind") == sharded.KIND}
        pointed = self._read_latest()
        return self._first_loadable(
            sorted(candidates, key=lambda s: (s == pointed, s), reverse=True),
            lambda s: sharded.open_step(self.store, self.step_url(s), candidates[s], weights_only=weights_only),
        )

    def _first_loadable(self, steps: Iterable[int], open_step: Callable[[int], _T]) -> tuple[int, _T]:
        """The first of ``steps`` that ``open_step`` opens, and what it made; corrupt or vanished steps are
        passed over (logged). Raises the last CorruptCheckpoint, or CheckpointNotFound if no step was there."""
        failure: CorruptCheckpoint | None = None
        for step in steps:
            try:
                return step, open_step(step)
            except (CorruptCheckpoint, errors.ObjectNotFound) as exc:
                _log.warning("%s: falling back to an older step: %s", self.url, exc)
                failure = exc if isinstance(exc, CorruptCheckpoint) else failure
        if failure is not None:
            raise failure
        raise CheckpointNotFound(self.url, self.store.endpoint(self.url), None, [])

    def _load_committed(self, step: int, marker: dict[str, Any], map_location: MAP_LOCATION, weights_only: bool) -> Any:
        """The state of a committed step: a sharded one assembled whole here, else its torch.save payload."""
        if marker.get("kind") != sharded.KIND:
            return self._load_step(step, marker, map_location, weights_only)
        if map_location is not None and not isinstance(map_location, (str, torch.device)):
            raise ValueError(f"{map_location=}: step {step} is sharded and loads to one device; pass it or its name")
        step_url = self.step_url(step)
        metadata = sharded.open_step(self.store, step_url, marker, weights_only=weights_only)
        return sharded.load_whole(
            self.store,
            f"{step_url}/{sharded.PAYLOAD_DIR}",
            metadata,
            device=torch.device(map_location if map_location is not None else "cpu"),
            load_value=lambda data, url: _torch_load(data, url, map_location, weights_only),
        )

    @staticmethod
    def _payload_listed(marker: dict[str, Any], files: dict[str, int]) -> bool:
        """Whether the listing ``files`` of a step has its payload as the marker recorded it."""
        if marker.get("kind") == sharded.KIND:
            return sharded.mismatch(marker, files) is None
        return bool(files.get(marker["payload"]) == marker["size"])

    # -- listing --------------------------------------------------------------------------------

    def _scan(self) -> dict[int, dict[str, int]]:
        """``{step: {file name: size}}`` for every step directory under the run, from one listing."""
        try:
            listing = self.store.list_info(self.url + "/")
        except errors.ObjectNotFound:  # no such directory (memory://, file://): an empty run
            return {}
        root = self.url + "/"
        layout: dict[int, dict[str, int]] = {}
        for url, info in listing.items():
            if info.get("type") == "directory":
                continue  # SeaweedFS lists a prefix emptied by retention as a directory entry
            first, _, rest = url[len(root) :].partition("/") if url.startswith(root) else ("", "", "")
            match = _STEP_DIR.match(first)
            if match and rest:
                layout.setdefault(int(match[1]), {})[rest] = int(info.get("size") or 0)
        return layout

    def _committed(self, layout: dict[int, dict[str, int]] | None = None) -> dict[int, dict[str, Any]]:
        """``{step: marker}`` for every committed step whose payload is there with the recorded size.

        ``layout`` is a :meth:`_scan` already made; None lists the run here.
        """
        layout = self._scan() if layout is None else layout
        steps = sorted(step for step, files in layout.items() if self.MARKER_NAME in files)
        if not steps:
            return {}
        urls = [f"{self.step_url(step)}/{self.MARKER_NAME}" for step in steps]
        bodies: list[bytes | None]
        try:
            bodies = list(self.store.read_ranges(urls))
        except errors.ObjectNotFound:  # a marker deleted since the listing: read them one by one
            bodies = [self._read_bytes_or_none(url) for url in urls]
        result: dict[int, dict[str, Any]] = {}
        for step, url, body in zip(steps, urls, bodies, strict=True):
            marker = self._parse_marker(body, step, url) if body is not None else None
            if marker is not None and self._payload_listed(marker, layout[step]):
                result[step] = marker
        return result

    def steps(self) -> list[int]:
        """The committed steps, sorted (one listing, plus one small GET per step, run concurrently).

        Example:
            >>> CheckpointStore("memory://doc-empty/run", store=Store()).steps()
            []
        """
        return sorted(self._committed())

    def latest_step(self) -> int | None:
        """The step ``load()`` returns (the pointer's, if committed; else the highest committed), or None.

        Example:
            >>> ckpt = CheckpointStore("memory://doc-latest-step/run", store=Store())
            >>> print(ckpt.latest_step())
            None
            >>> for step in (5, 9):
            ...     _ = ckpt.save({"step": step}, step=step)
            >>> ckpt.latest_step()
            9
        """
        pointed = self._read_latest()
        committed = self._committed()
        if pointed is not None and pointed in committed:
            return pointed
        return max(committed, default=None)

    def markers(self) -> dict[int, dict[str, Any]]:
        """The marker of every committed step, by step in ascending order (the steps :meth:`steps` lists).

        A marker is the JSON document that commits its step: ``step``, ``payload``, ``size``,
        ``created`` (Unix time), ``torch`` (the version that saved it), and ``sha256`` for a
        ``torch.save`` step or ``"kind": "dcp"`` and ``files`` (name -> size) for a sharded one.
        Costs one listing plus one small GET per step.

        Example:
            >>> ckpt = CheckpointStore("memory://doc-markers/run", store=Store())
            >>> _ = ckpt.save({"w": torch.zeros(2)}, step=3)
            >>> {step: marker["payload"] for step, marker in ckpt.markers().items()}
            {3: 'state.pt'}
        """
        return dict(sorted(self._committed().items()))

    def uncommitted(self) -> dict[int, dict[str, int]]:
        """The step directories that are not committed steps: ``{step: {file name: size}}``, by step.

        These are leftovers of saves killed before their marker (or of a marker whose payload
        went missing); :meth:`load` ignores them and the next save's retention deletes those
        below it. Costs one listing plus one small GET per marker found.

        Example:
            >>> ckpt = CheckpointStore("memory://doc-uncommitted/run", store=Store())
            >>> ckpt.store.write_bytes(ckpt.step_url(5) + "/state.pt", b"half a payload")
            >>> ckpt.uncommitted()
            {5: {'state.pt': 14}}
        """
        layout = self._scan()
        committed = self._committed(layout)
        return {step: files for step, files in sorted(layout.items()) if step not in committed}

    def marker(self, step: int | None = None) -> dict[str, Any]:
        """The marker of the committed ``step`` (see :meth:`markers`); None for the step :meth:`load` picks.

        Raises:
            CheckpointNotFound: ``step`` is not committed (the message lists the committed
                steps), or the run has no committed step at all.
            ValueError: ``step`` is not an int >= 0.
            StoreError: the store refused (``BucketNotFound``, ``CredentialsRejected``, ...).

        Example:
            >>> ckpt = CheckpointStore("memory://doc-marker/run", store=Store())
            >>> _ = ckpt.save({"w": torch.zeros(2)}, step=3)
            >>> ckpt.marker()["step"], ckpt.marker(3)["payload"]
            (3, 'state.pt')
        """
        chosen = self.latest_step() if step is None else _check_step(step)
        marker = self._read_marker(chosen) if chosen is not None else None
        if marker is None:
            url = self.url if step is None else self.step_url(step)
            raise CheckpointNotFound(url, self.store.endpoint(self.url), step, self.steps())
        return marker

    def describe(self, step: int | None = None) -> dict[str, str]:
        """A one-line description of each top-level value of the state saved at ``step`` (default: the latest).

        Tensors show shape and dtype, dicts and lists their length (and the tensors inside),
        small values themselves. The state is loaded whole, on the CPU, with
        ``weights_only=True``: this costs as much as :meth:`load`. A state that is not a dict
        is described under the one key ``"<state>"``.

        Raises:
            CheckpointNotFound, CorruptCheckpoint, WeightsOnlyRefused, StoreError: as :meth:`load`.

        Example:
            >>> ckpt = CheckpointStore("memory://doc-describe/run", store=Store())
            >>> _ = ckpt.save({"model": {"w": torch.zeros(2, 3)}, "epoch": 4}, step=1)
            >>> ckpt.describe()
            {'model': 'dict of 1 entry: 1 tensor, 6 values', 'epoch': '4'}
        """
        state = self.load(step, map_location="cpu", weights_only=True)
        if not isinstance(state, Mapping):
            return {"<state>": _describe_value(state)}
        return {str(key): _describe_value(value) for key, value in state.items()}

    # -- loading --------------------------------------------------------------------------------

    def load(
        self,
        step: int | None = None,
        *,
        key: str | None = None,
        version_id: str | None = None,
        map_location: MAP_LOCATION = None,
        weights_only: bool = True,
    ) -> Any:
        """The state saved at ``step`` (default: the latest committed one), or the object ``key``.

        Args:
            step: a committed step; None for the latest (see the module docstring for which).
            key: load the object ``<run>/<key>`` instead (fixed-key saves, plain ``torch.save`` files).
            version_id: with ``key``: that version of it (versioned S3 buckets).
            map_location: as for ``torch.load``.
            weights_only: as for ``torch.load``; True refuses arbitrary pickled objects.

        Raises:
            CheckpointNotFound: ``step`` is not committed (the message lists the committed
                steps), or the run has no committed step at all.
            CorruptCheckpoint: the payload of ``step`` does not match its marker, or no
                committed step (when loading the latest) has a readable payload.
            WeightsOnlyRefused: the payload holds objects ``weights_only=True`` does not allow.
            StoreError: the store refused (``BucketNotFound``, ``CredentialsRejected``, ...).

        Example:
            >>> ckpt = CheckpointStore("memory://doc-load/run", store=Store())
            >>> for step in (1, 2):
            ...     _ = ckpt.save({"epoch": step, "w": torch.full((2,), float(step))}, step=step)
            >>> ckpt.load()["epoch"], ckpt.load(1)["w"].tolist()
            (2, [1.0, 1.0])
            >>> _ = ckpt.save({"best": 0.9}, key="best.pt")
            >>> ckpt.load(key="best.pt")
            {'best': 0.9}
        """
        if key is not None:
            if step is not None:
                raise ValueError(f"load takes step= or key=, not both: got {step=}, {key=}")
            return self.load_url(
                self.object_url(key),
                store=self.store,
                version_id=version_id,
                map_location=map_location,
                weights_only=weights_only,
            )
        if version_id is not None:
            raise ValueError(f"{version_id=} needs key=: versions belong to a fixed object, e.g. load(key='model.pt')")
        if step is not None:
            marker = self._read_marker(_check_step(step))
            if marker is None:
                raise CheckpointNotFound(self.step_url(step), self.store.endpoint(self.url), step, self.steps())
            return self._load_committed(step, marker, map_location, weights_only)
        return self._load_latest(map_location, weights_only)

    def _load_latest(self, map_location: MAP_LOCATION, weights_only: bool) -> Any:
        pointed = self._read_latest()
        markers: dict[int, dict[str, Any]] = {}
        marker = self._read_marker(pointed) if pointed is not None else None
        if pointed is not None and marker is not None:
            markers[pointed] = marker

        def steps() -> Iterator[int]:
            if pointed is not None and pointed in markers:
                yield pointed  # the pointer's step, if committed: no listing when it loads
            committed = self._committed()
            markers.update(committed)
            yield from sorted(set(committed) - {pointed}, reverse=True)

        return self._first_loadable(steps(), lambda s: self._load_committed(s, markers[s], map_location, weights_only))[
            1
        ]

    def _load_step(self, step: int, marker: dict[str, Any], map_location: MAP_LOCATION, weights_only: bool) -> Any:
        url = f"{self.step_url(step)}/{marker['payload']}"
        size = int(self.store.info(url)["size"])  # one HEAD: a missing payload fails here, a short one below
        if size != marker["size"]:
            raise CorruptCheckpoint(url, f"{size} bytes, but its marker recorded {marker['size']}")
        with open_download(self.store, url, size=size, sha256=True) as file:
            try:
                state = _torch_load(file, url, map_location, weights_only)
            except Exception as exc:  # torch fails in many ways on damaged bytes: the digest tells which this is
                if file.error is None and file.finish() != marker["sha256"]:
                    raise CorruptCheckpoint(url, "sha256 differs from the one its marker recorded") from exc
                raise
            digest = file.finish()
        if digest != marker["sha256"]:
            raise CorruptCheckpoint(url, "sha256 differs from the one its marker recorded")
        return state

    def _read_bytes_or_none(self, url: str) -> bytes | None:
        try:
            return self.store.read_bytes(url)
        except errors.ObjectNotFound:
            return None

    def _read_json(self, url: str) -> dict[str, Any] | None:
        """The JSON object at ``url``; None if it does not exist or is not one of ours."""
        body = self._read_bytes_or_none(url)
        if body is None:
            return None
        try:
            document = json.loads(body)
        except ValueError:
            document = None
        if not isinstance(document, dict) or document.get("format") != _FORMAT:
            _log.warning("%s: ignored: not an %s document", url, _FORMAT)
            return None
        return document

    def _parse_marker(self, body: bytes, step: int, url: str) -> dict[str, Any] | None:
        try:
            marker = json.loads(body)
        except ValueError:
            marker = None
        valid = (
            isinstance(marker, dict)
            and marker.get("format") == _FORMAT
            and marker.get("step") == step
            and isinstance(marker.get("payload"), str)
            and "/" not in marker["payload"]
            and isinstance(marker.get("size"), int)
            and (sharded.valid_marker(marker) if "kind" in marker else isinstance(marker.get("sha256"), str))
        )
        if not valid:
            _log.warning("%s: ignored: not a valid marker for step %d", url, step)
            return None
        assert isinstance(marker, dict)
        return marker

    def _read_marker(self, step: int) -> dict[str, Any] | None:
        url = f"{self.step_url(step)}/{self.MARKER_NAME}"
        body = self._read_bytes_or_none(url)
        return self._parse_marker(body, step, url) if body is not None else None

    def _read_latest(self) -> int | None:
        document = self._read_json(f"{self.url}/{self.LATEST_NAME}")
        step = document.get("step") if document is not None else None
        return step if isinstance(step, int) and not isinstance(step, bool) and step >= 0 else None

    @staticmethod
    def load_url(
        url: str,
        *,
        store: Store | None = None,
        version_id: str | None = None,
        map_location: MAP_LOCATION = None,
        weights_only: bool = True,
    ) -> Any:
        """``torch.load`` of any object URL, e.g. one written by plain ``torch.save`` through fsspec.

        Args:
            url: the object.
            store: the Store to read through; ``Store.from_env()`` when None.
            version_id: that version of the object (S3 only).
            map_location, weights_only: as for ``torch.load``.

        Raises:
            ObjectNotFound, BucketNotFound, CredentialsRejected, ...: as the Store raises them.
            CorruptCheckpoint: not a torch.save file. WeightsOnlyRefused: see :meth:`load`.

        Example:
            >>> store = Store()
            >>> with store.open("memory://doc-load-url/model.pt", "wb") as f:
            ...     torch.save({"w": torch.arange(3)}, f)
            >>> CheckpointStore.load_url("memory://doc-load-url/model.pt", store=store)["w"].tolist()
            [0, 1, 2]
        """
        store = store if store is not None else Store.from_env()
        if version_id is not None:
            return _torch_load(_read_version(store, url, version_id), url, map_location, weights_only)
        with open_download(store, url) as file:
            return _torch_load(file, url, map_location, weights_only)

    # -- raw access and versions ----------------------------------------------------------------

    def writer(self, name: str) -> IO[bytes]:
        """A file for ``<run>/<name>``, published when closed cleanly (discarded if the ``with`` raises).

        Example:
            >>> ckpt = CheckpointStore("memory://doc-raw/run", store=Store())
            >>> with ckpt.writer("extra.pt") as f:
            ...     torch.save({"lr": 0.1}, f)
            >>> with ckpt.reader("extra.pt") as f:
            ...     torch.load(f, weights_only=True)
            {'lr': 0.1}
        """
        return open_upload(self.store, self.object_url(name))

    def reader(self, name: str) -> IO[bytes]:
        """A seekable file reading ``<run>/<name>`` (what ``torch.load`` takes).

        Example:
            >>> ckpt = CheckpointStore("memory://doc-ckpt-reader/run", store=Store())
            >>> ckpt.store.write_bytes(ckpt.object_url("notes.txt"), b"lr=0.1")
            >>> with ckpt.reader("notes.txt") as f:
            ...     _ = f.seek(3)
            ...     f.read()
            b'0.1'
        """
        url = self.object_url(name)
        return self.store.open(url, "rb")

    def versions(self, name: str) -> list[ObjectVersion]:
        """Every version of ``<run>/<name>``, oldest first (the store's order); delete markers are skipped.

        Needs an S3 store; in an unversioned bucket the one version has ``version_id="null"``.

        Raises:
            ConfigError: the run is not on S3 (other stores keep one version).
            StoreError: ``BucketNotFound``, ``CredentialsRejected``, ...

        Example (not run: it needs an S3 bucket with versioning enabled)::

            ckpt = CheckpointStore("s3://ckpts/run", store=Store.from_env())
            for epoch in range(3):
                ckpt.save({"epoch": epoch}, key="model.pt")      # each save is kept as a version
            first = ckpt.versions("model.pt")[0]                 # ObjectVersion(url, version_id, size, ...)
            ckpt.load(key="model.pt", version_id=first.version_id)["epoch"]   # -> 0
        """
        url = self.object_url(name)
        fs, path = self.store.resolve(url)
        if not _is_s3(url):
            raise errors.ConfigError(f"{url}: object versions need S3 with bucket versioning; this store keeps one")
        bucket, _, key = path.partition("/")
        request: dict[str, Any] = {"Bucket": bucket, "Prefix": key}
        newest_first: list[ObjectVersion] = []
        with self.store.errors(url):
            while True:
                page = fs.call_s3("list_object_versions", **request)
                newest_first += [
                    ObjectVersion(url, str(v["VersionId"]), int(v["Size"]), v["LastModified"], bool(v["IsLatest"]))
                    for v in page.get("Versions", [])
                    if v["Key"] == key
                ]
                if not page.get("IsTruncated"):
                    break
                request["KeyMarker"] = page.get("NextKeyMarker", "")
                request["VersionIdMarker"] = page.get("NextVersionIdMarker", "")
        return newest_first[::-1]


def _tensors(value: object) -> Iterator[torch.Tensor]:
    """Every tensor in ``value``, through nested dicts, lists and tuples."""
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, Mapping):
        for item in value.values():
            yield from _tensors(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors(item)


def _describe_value(value: object) -> str:
    """One line about a state value: containers by length and the tensors inside, the rest by preview's describe."""
    from s3pipes.preview import describe

    if isinstance(value, Mapping):
        text = f"dict of {len(value)} entr{'y' if len(value) == 1 else 'ies'}"
    elif isinstance(value, (list, tuple)):
        text = f"{type(value).__name__} of {len(value)} item{'' if len(value) == 1 else 's'}"
    else:
        return describe(value)
    tensors = list(_tensors(value))
    if tensors:
        count, values = len(tensors), sum(tensor.numel() for tensor in tensors)
        text += f": {count} tensor{'' if count == 1 else 's'}, {values:,} value{'' if values == 1 else 's'}"
    return text


def _read_version(store: Store, url: str, version_id: str) -> bytes:
    """The bytes of one version of ``url`` (S3 only)."""
    fs, path = store.resolve(url)
    if not _is_s3(url):
        raise errors.ConfigError(f"{url}: {version_id=} needs an S3 store; this one keeps one version")
    with store.errors(url):
        # max_concurrency=1: one GET. Otherwise s3fs sizes the read by the *current* version.
        return bytes(fs.cat_file(path, version_id=version_id, max_concurrency=1))
