"""The stages: each a torchdata.nodes ``BaseNode`` with explicit, resumable state."""

from s3pipes.stages.base import SOURCE_KEY, Stage, ThroughStage
from s3pipes.stages.group import GroupByKey, split_key
from s3pipes.stages.open import ObjectStream, OpenObject
from s3pipes.stages.parallel import ParallelMap
from s3pipes.stages.shards import Consumer, ShardPlan, Shards, TooFewShards
from s3pipes.stages.shuffle import ShuffleBuffer
from s3pipes.stages.sink import CheckpointSink
from s3pipes.stages.tar import TarMember, Untar
from s3pipes.stages.transform import Batch, Filter, Map

__all__ = [
    "SOURCE_KEY",
    "Batch",
    "CheckpointSink",
    "Consumer",
    "Filter",
    "GroupByKey",
    "Map",
    "ObjectStream",
    "OpenObject",
    "ParallelMap",
    "ShardPlan",
    "Shards",
    "ShuffleBuffer",
    "Stage",
    "TarMember",
    "ThroughStage",
    "TooFewShards",
    "Untar",
    "split_key",
]
