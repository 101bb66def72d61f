"""s3pipes: composable PyTorch data pipelines over object storage (S3, MinIO, any fsspec store).

The public surface is what ``__all__`` lists; everything else is private.
Importing s3pipes reads no environment variable and opens no connection.
"""

from s3pipes.checkpoint import CheckpointStore, CheckpointWatcher, SyncResult, sync_checkpoints, watch_checkpoints
from s3pipes.convert import ConvertResult, convert
from s3pipes.decode import Decoder
from s3pipes.errors import (
    AccessDenied,
    AuthError,
    BucketNotFound,
    CheckpointNotFound,
    ConfigError,
    ConnectionDropped,
    CorruptCheckpoint,
    CorruptShard,
    CredentialsMissing,
    CredentialsRejected,
    DataError,
    DecodeError,
    DuplicateField,
    EndpointError,
    EndpointNotS3,
    EndpointUnreachable,
    ExpiredCredentials,
    InvalidURL,
    MalformedEndpoint,
    NotFound,
    ObjectNotFound,
    S3PipesError,
    ServerError,
    SignatureMismatch,
    SourceError,
    StaleIndex,
    StoreError,
    StoreRequestError,
    StoreTimeout,
    UnknownAccessKey,
    WeightsOnlyRefused,
    WrongRegion,
)
from s3pipes.mapstyle import MapDataset, ObjectReader
from s3pipes.pipe import Pipe, from_urls, list_prefix, webdataset
from s3pipes.spec import from_spec
from s3pipes.store import Store, load_env
from s3pipes.writer import ShardInfo, ShardWriter

__version__ = "0.1.0"

__all__ = [
    "AccessDenied",
    "AuthError",
    "BucketNotFound",
    "CheckpointNotFound",
    "CheckpointStore",
    "CheckpointWatcher",
    "ConfigError",
    "ConnectionDropped",
    "ConvertResult",
    "CorruptCheckpoint",
    "CorruptShard",
    "CredentialsMissing",
    "CredentialsRejected",
    "DataError",
    "DecodeError",
    "Decoder",
    "DuplicateField",
    "EndpointError",
    "EndpointNotS3",
    "EndpointUnreachable",
    "ExpiredCredentials",
    "InvalidURL",
    "MalformedEndpoint",
    "MapDataset",
    "NotFound",
    "ObjectNotFound",
    "ObjectReader",
    "Pipe",
    "S3PipesError",
    "ServerError",
    "ShardInfo",
    "ShardWriter",
    "SignatureMismatch",
    "SourceError",
    "StaleIndex",
    "Store",
    "StoreError",
    "StoreRequestError",
    "StoreTimeout",
    "SyncResult",
    "UnknownAccessKey",
    "WeightsOnlyRefused",
    "WrongRegion",
    "convert",
    "from_spec",
    "from_urls",
    "list_prefix",
    "load_env",
    "sync_checkpoints",
    "watch_checkpoints",
    "webdataset",
]
