"""Checkpoints in the store: atomic steps (:mod:`.core`), streamed transfers, local-dir sync, sharded (DCP) saves."""

from s3pipes.checkpoint.core import (
    CheckpointNotFound,
    CheckpointStore,
    CorruptCheckpoint,
    ObjectVersion,
    WeightsOnlyRefused,
)
from s3pipes.checkpoint.sync import CheckpointWatcher, SyncResult, sync_checkpoints, watch_checkpoints

__all__ = [
    "CheckpointNotFound",
    "CheckpointStore",
    "CheckpointWatcher",
    "CorruptCheckpoint",
    "ObjectVersion",
    "SyncResult",
    "WeightsOnlyRefused",
    "sync_checkpoints",
    "watch_checkpoints",
]
