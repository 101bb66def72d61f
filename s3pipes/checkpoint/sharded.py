"""Sharded checkpoints: ``torch.distributed.checkpoint`` (DCP) inside the step layout of :mod:`.core`.

The DCP half of :meth:`CheckpointStore.save_sharded`, :meth:`CheckpointStore.load_sharded` and of
``CheckpointStore.load(step)`` for a step saved that way; steps, markers, the pointer and retention
stay in :mod:`.core`. A sharded step::

    <run>/step-000000123/dcp/__0_0.distcp    each rank's share of the state (DCP's own names)
    <run>/step-000000123/dcp/.metadata       DCP's index of the shares, written by DCP after them
    <run>/step-000000123/COMMITTED.json      marker, written LAST by rank 0: "kind": "dcp", every file's size

DCP moves the bytes through torch's fsspec writer and reader, built with the Store's resolved
options for the URL (endpoint, credentials, path-style addressing), so the ranks reach the same
store as everything else does. Rank 0 (the *coordinator*, or the only process when there is no
process group) lists, writes the marker and the pointer, and applies retention; what it decides
or raises is broadcast, so every rank returns the same step or raises the same error, and no rank
is left waiting in a collective another rank has abandoned. Errors a rank raised inside DCP come
out as that error (DCP wraps them in a ``CheckpointException``), backend ones translated into
:mod:`s3pipes.errors` and naming the step's URL.

Guarantees and non-guarantees:

- A step is committed once its marker exists, and the marker is written only after rank 0 has
  checked that every file DCP wrote is listed, at least as long as DCP wrote into it. Loading
  checks every file against the marker's sizes first (a missing or resized file is a
  :class:`~s3pipes.errors.CorruptCheckpoint` naming it). Sizes, not sha256: hashing would mean
  reading every shard back.
- ``weights_only=True`` (the default of the loads) covers DCP's own pickles too: its
  ``.metadata`` is unpickled allowing only DCP's metadata classes, torch dtypes and sizes, and
  every non-tensor value is checked with ``torch.load(weights_only=True)``. DCP reads tensors
  with ``weights_only=True`` itself.
- A whole load (``load(step)``) assembles full tensors on one process: it needs the memory of
  the whole state. DCP does not store empty dicts, so they are missing from what it returns.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import pickle
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeVar, cast

import torch
import torch.distributed as dist
from fsspec.core import split_protocol

from s3pipes import errors
from s3pipes.errors import CorruptCheckpoint, WeightsOnlyRefused
from s3pipes.store import Store

if TYPE_CHECKING:  # importing torch.distributed.checkpoint takes ~1 s: only the functions that use it do
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
    from torch.distributed.checkpoint.metadata import Metadata
    from torch.distributed.checkpoint.storage import StorageReader

__all__ = [
    "KIND",
    "PAYLOAD_DIR",
    "LoadValue",
    "check_files",
    "is_distributed",
    "listed_files",
    "load_into",
    "load_whole",
    "mismatch",
    "on_coordinator",
    "open_step",
    "save",
    "valid_marker",
    "world_size",
    "written_files",
]

KIND = "dcp"
"""``marker["kind"]`` of a sharded step; markers without a kind are ``torch.save`` payloads."""

PAYLOAD_DIR = "dcp"
"""The directory under the step that DCP writes into (``marker["payload"]``)."""

_METADATA_NAME = ".metadata"  # DCP's
_NO_DIST_WARNING = r"torch\.distributed is disabled, unavailable or uninitialized"
_LOCAL_PROTOCOLS = ("file", "local")
# What DCP's .metadata may name in a weights-only load, besides torch dtypes and the classes of
# torch.distributed.checkpoint.metadata: what torch 2.13's saves name (plain and DTensor state, see
# the tests). A torch that pickles more fails with WeightsOnlyRefused, whose message gives the way out.
_METADATA_GLOBALS = frozenset(
    {
        ("torch", "Size"),
        ("torch.serialization", "_get_layout"),
        ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    }
)
_METADATA_MODULE = "torch.distributed.checkpoint.metadata"

_T = TypeVar("_T")

LoadValue = Callable[[bytes, str], Any]
"""``torch.load`` of one non-tensor value's bytes, its failures named after the str (a URL)."""


# -- ranks ----------------------------------------------------------------------------------------


def is_distributed() -> bool:
    """Whether a default process group is up (else DCP runs in this process alone)."""
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def on_coordinator(work: Callable[[], _T]) -> _T:
    """``work()`` on rank 0 only; every rank returns its result or raises its error.

    Collective when a process group is up (the other ranks wait for rank 0), plain ``work()``
    otherwise. The result reaches the other ranks pickled; an error that does not pickle
    reaches them as a RuntimeError carrying its text.
    """
    if not is_distributed():
        return work()
    error: Exception | None = None
    box: list[Any] = [None]
    if dist.get_rank() == 0:
        try:
            box[0] = (True, work())
        except Exception as exc:
            error = exc
            box[0] = (False, _picklable(exc))
    dist.broadcast_object_list(box, src=0)
    if error is not None:
        raise error
    succeeded, value = box[0]
    if not succeeded:
        raise value
    return cast(_T, value)


def _picklable(exc: Exception) -> Exception:
    try:
        pickle.loads(pickle.dumps(exc))
    except Exception:
        return RuntimeError(f"rank 0 raised {type(exc).__name__}: {exc}")
    return exc


# -- files and markers ----------------------------------------------------------------------------


def listed_files(store: Store, step_url: str) -> dict[str, int]:
    """``{name under the step: size}`` for every object under ``step_url``, from one listing."""
    try:
        listing = store.list_info(step_url + "/")
    except errors.ObjectNotFound:  # no such directory (memory://, file://)
        return {}
    start = len(step_url) + 1
    return {url[start:]: int(info.get("size") or 0) for url, info in listing.items() if info.get("type") != "directory"}


def written_files(store: Store, step_url: str, metadata: Metadata) -> dict[str, int]:
    """The files under the step's DCP directory with their listed sizes, once all DCP wrote is there.

    Raises:
        CorruptCheckpoint: a file DCP wrote (``.metadata``, or one its index points into) is not
            listed, or is shorter than the bytes DCP put in it; the step must not be committed.
    """
    prefix = f"{PAYLOAD_DIR}/"
    listed = {name: size for name, size in listed_files(store, step_url).items() if name.startswith(prefix)}
    least = {_METADATA_NAME: 1}
    for info in (metadata.storage_data or {}).values():  # MetadataIndex -> _StorageInfo(relative_path, offset, length)
        name = str(info.relative_path)
        least[name] = max(least.get(name, 0), int(info.offset) + int(info.length))
    for name, size in sorted(least.items()):
        found = listed.get(prefix + name)
        if found is None or found < size:
            state = "is not listed" if found is None else f"is listed with {found} bytes"
            raise CorruptCheckpoint(
                f"{step_url}/{prefix}{name}", f"DCP wrote {size}+ bytes to it but it {state}; the step is not committed"
            )
    return listed


def _inside_payload(name: object) -> bool:
    parts = name.split("/") if isinstance(name, str) else []
    return len(parts) > 1 and parts[0] == PAYLOAD_DIR and not any(part in ("", ".", "..") for part in parts)


def valid_marker(marker: Mapping[str, Any]) -> bool:
    """Whether ``marker`` (format and step already checked) is a well-formed sharded marker."""
    files = marker.get("files")
    return (
        marker.get("kind") == KIND
        and marker.get("payload") == PAYLOAD_DIR
        and isinstance(files, dict)
        and f"{PAYLOAD_DIR}/{_METADATA_NAME}" in files
        and all(
            _inside_payload(name) and isinstance(size, int) and not isinstance(size, bool) and size >= 0
            for name, size in files.items()
        )
        and marker.get("size") == sum(files.values())
    )


def mismatch(marker: Mapping[str, Any], listed: Mapping[str, int]) -> tuple[str, str] | None:
    """The first file of the marker that ``listed`` lacks or lists with another size: (name, problem)."""
    for name, size in sorted(marker["files"].items()):
        found = listed.get(name)
        if found is None:
            return name, f"missing, but its marker lists it ({size} bytes)"
        if found != size:
            return name, f"{found} bytes, but its marker recorded {size}"
    return None


def check_files(step_url: str, marker: Mapping[str, Any], listed: Mapping[str, int]) -> None:
    """Raise CorruptCheckpoint naming the first file of the step that does not match its marker."""
    problem = mismatch(marker, listed)
    if problem is not None:
        raise CorruptCheckpoint(f"{step_url}/{problem[0]}", problem[1])


# -- metadata ---------------------------------------------------------------------------------------


class _Refused(pickle.UnpicklingError):
    pass


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP's ``.metadata`` naming only its own classes, torch dtypes and ``torch.Size``."""

    def find_class(self, module: str, name: str) -> Any:
        dtype = module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        if dtype or (module, name) in _METADATA_GLOBALS:
            return super().find_class(module, name)
        if module == _METADATA_MODULE:
            found = super().find_class(module, name)
            if isinstance(found, type) and found.__module__ == module:
                return found
        raise _Refused(f"{module}.{name}")


def _unpickle_metadata(data: bytes, url: str, weights_only: bool) -> Metadata:
    from torch.distributed.checkpoint.metadata import Metadata

    file = io.BytesIO(data)
    try:
        metadata = _MetadataUnpickler(file).load() if weights_only else pickle.load(file)
    except _Refused as exc:
        raise WeightsOnlyRefused(
            url,
            f"DCP's metadata names {exc}, which weights_only=True does not allow. "
            "If you trust the checkpoint, load it with weights_only=False",
        ) from None
    except Exception as exc:  # UnpicklingError, EOFError, ImportError, ...: not DCP metadata
        raise CorruptCheckpoint(url, f"not readable as DCP metadata ({type(exc).__name__}: {exc})") from exc
    if not isinstance(metadata, Metadata):
        raise CorruptCheckpoint(url, f"holds a {type(metadata).__name__}, not DCP metadata")
    return metadata


def open_step(store: Store, step_url: str, marker: Mapping[str, Any], *, weights_only: bool) -> Metadata:
    """DCP's metadata of a committed sharded step, after checking every file against the marker.

    Raises:
        CorruptCheckpoint: a file is missing or resized, or the metadata is not DCP's.
        WeightsOnlyRefused: ``weights_only`` and the metadata names other objects.
        StoreError: the store refused (``BucketNotFound``, ``CredentialsRejected``, ...).
    """
    check_files(step_url, marker, listed_files(store, step_url))
    url = f"{step_url}/{PAYLOAD_DIR}/{_METADATA_NAME}"
    return _unpickle_metadata(store.read_bytes(url), url, weights_only)


# -- DCP --------------------------------------------------------------------------------------------


def _fs_options(store: Store, url: str) -> dict[str, Any]:
    # skip_instance_cache: fsspec would otherwise hand one cached client to every caller in the process.
    return {**store.resolved_options(url), "skip_instance_cache": True}


def _first_failure(wrapped: CheckpointException) -> BaseException | None:
    """This rank's own exception from DCP's CheckpointException, else the lowest failing rank's."""
    failures = wrapped.failures
    if not failures:
        return None
    own = dist.get_rank() if is_distributed() else 0
    return failures.get(own, failures[min(failures)])[0]


@contextlib.contextmanager
def _dcp_call(store: Store, url: str, *, no_dist: bool) -> Iterator[None]:
    """Around one ``dcp.save``/``dcp.load``: unwrap DCP's CheckpointException, translate backend errors.

    Without a process group DCP warns that it assumes a single process: that is what we asked
    for, so that one warning is ignored (only then, and only it).
    """
    from torch.distributed.checkpoint.api import CheckpointException

    with warnings.catch_warnings() if no_dist else contextlib.nullcontext():
        if no_dist:
            warnings.filterwarnings("ignore", message=_NO_DIST_WARNING, category=UserWarning)
        try:
            yield
        except CheckpointException as wrapped:
            cause = _first_failure(wrapped)
            if cause is None:
                raise
            if isinstance(cause, Exception) and errors.classify(cause) is not None:
                with store.errors(url):  # a backend error becomes ours; ours pass through
                    raise cause  # noqa: B904  # its own __cause__ (the backend's error) is the one to keep
            raise cause  # noqa: B904


def save(store: Store, url: str, state_dict: dict[str, Any]) -> Metadata:
    """``dcp.save(state_dict)`` into the directory ``url``; every rank calls it. Returns DCP's metadata."""
    from torch.distributed.checkpoint._fsspec_filesystem import FsspecWriter
    from torch.distributed.checkpoint.state_dict_saver import save as dcp_save

    no_dist = not is_distributed()
    with _dcp_call(store, url, no_dist=no_dist):
        # sync_files: fsync where there is a file to sync; elsewhere DCP would fall back to os.sync().
        local = (split_protocol(url)[0] or "file") in _LOCAL_PROTOCOLS
        writer = FsspecWriter(url, sync_files=local, **_fs_options(store, url))
        metadata: Metadata = dcp_save(state_dict, storage_writer=writer, no_dist=no_dist)
    return metadata


def _reader(store: Store, url: str, metadata: Metadata) -> StorageReader:
    """torch's fsspec reader for ``url``, handed the metadata we read (and checked) ourselves."""
    from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class _Reader(FsspecReader):
        def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
            if metadata.storage_meta is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = getattr(self, "load_id", None)  # as FileSystemReader does
            return metadata

    return _Reader(url, **_fs_options(store, url))


def load_into(
    store: Store, url: str, state_dict: dict[str, Any], metadata: Metadata, *, check_value: LoadValue | None
) -> None:
    """``dcp.load`` into ``state_dict`` (in place) from ``url``; every rank calls it.

    Args:
        check_value: when given, each non-tensor value's bytes go through it before DCP
            unpickles them (weights-only loads: it raises on what it refuses).
    """
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
    from torch.distributed.checkpoint.planner import ReadItem
    from torch.distributed.checkpoint.state_dict_loader import load as dcp_load

    class _CheckingLoadPlanner(DefaultLoadPlanner):
        def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
            assert check_value is not None
            check_value(value.getvalue(), f"{url} (value {read_item.dest_index.fqn!r})")
            value.seek(0)
            super().load_bytes(read_item, value)

    no_dist = not is_distributed()
    planner = _CheckingLoadPlanner() if check_value is not None else DefaultLoadPlanner()
    with _dcp_call(store, url, no_dist=no_dist):
        dcp_load(state_dict, storage_reader=_reader(store, url, metadata), planner=planner, no_dist=no_dist)


def load_whole(
    store: Store, url: str, metadata: Metadata, *, device: torch.device, load_value: LoadValue
) -> dict[str, Any]:
    """The whole state saved at ``url``, in this process alone: full tensors on ``device``, values as saved.

    Args:
        load_value: loads each non-tensor value from its bytes (``torch.load``, weights-only or not).
    """
    from torch.distributed.checkpoint.state_dict_loader import load as dcp_load

    planner = _whole_planner(url, device, load_value)
    with _dcp_call(store, url, no_dist=True):
        # The planner fills its own flat dict from the metadata: dcp.load only copies back keys it was given.
        dcp_load({}, storage_reader=_reader(store, url, metadata), planner=planner, no_dist=True)
    return _unflatten(planner.state_dict, metadata.planner_data or {})


def _whole_planner(url: str, device: torch.device, load_value: LoadValue) -> DefaultLoadPlanner:
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata
    from torch.distributed.checkpoint.planner import ReadItem

    class _WholeLoadPlanner(DefaultLoadPlanner):
        """Loads every value of the checkpoint under DCP's flat keys, into tensors allocated from its metadata."""

        def __init__(self) -> None:
            super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)

        def set_up_planner(
            self, state_dict: dict[str, Any], metadata: Metadata | None = None, is_coordinator: bool = False
        ) -> None:
            assert metadata is not None, "DCP passes the metadata to load planners"
            for fqn, item in metadata.state_dict_metadata.items():
                if isinstance(item, TensorStorageMetadata):
                    state_dict[fqn] = torch.empty(item.size, dtype=item.properties.dtype, device=device)
                else:
                    state_dict[fqn] = None  # a non-tensor value: load_bytes puts it here
            super().set_up_planner(state_dict, metadata, is_coordinator)

        def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
            fqn = read_item.dest_index.fqn
            self.state_dict[fqn] = load_value(value.getvalue(), f"{url} (value {fqn!r})")

    return _WholeLoadPlanner()


def _unflatten(flat: Mapping[str, Any], paths: Mapping[str, Sequence[str | int]]) -> dict[str, Any]:
    """DCP's flat ``{"model.w": v, "f.0": t}`` back into the nesting ``paths`` (DCP's planner_data) records.

    Example:
        >>> _unflatten({"m.w": 1, "f.1": 2, "e": 3}, {"m.w": ("m", "w"), "f.1": ("f", 1)})
        {'m': {'w': 1}, 'f': [None, 2], 'e': 3}
    """
    root: dict[str, Any] = {}
    for fqn, value in flat.items():
        path = tuple(paths.get(fqn, (fqn,)))
        node: Any = root
        for key, following in itertools.pairwise(path):
            child = _get(node, key)
            node = child if child is not None else _set(node, key, [] if isinstance(following, int) else {})
        _set(node, path[-1], value)
    return root


def _get(node: dict[Any, Any] | list[Any], key: str | int) -> Any:
    if isinstance(node, list):
        return node[int(key)] if int(key) < len(node) else None
    return node.get(key)


def _set(node: dict[Any, Any] | list[Any], key: str | int, value: Any) -> Any:
    """``node[key] = value``, a list first grown to hold it; returns ``value``."""
    if isinstance(node, list):
        node.extend([None] * (int(key) + 1 - len(node)))
        node[int(key)] = value
    else:
        node[key] = value
    return value
