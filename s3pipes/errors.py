"""The s3pipes exception tree, and the one place where backend errors become it.

Every error s3pipes raises is an :class:`S3PipesError`. Each leaf also inherits
the builtin a caller would catch without knowing s3pipes, so
``except FileNotFoundError`` keeps working::

    S3PipesError
    ├── StoreError                      names .url and .endpoint; never a secret
    │   ├── NotFound(FileNotFoundError)
    │   │   ├── BucketNotFound
    │   │   └── ObjectNotFound
    │   │       └── CheckpointNotFound  no committed checkpoint at that step (lists the ones there are)
    │   ├── AuthError(PermissionError)
    │   │   ├── CredentialsMissing      no credentials anywhere in the chain
    │   │   ├── CredentialsRejected     the store refused the credentials
    │   │   │   ├── UnknownAccessKey    ... because it does not know the key id
    │   │   │   ├── SignatureMismatch   ... because the secret is wrong
    │   │   │   └── ExpiredCredentials  ... because the session token expired
    │   │   └── AccessDenied            valid credentials, no permission
    │   ├── EndpointError(ConnectionError)
    │   │   ├── EndpointUnreachable     nothing listening, DNS failure, TLS failure
    │   │   ├── ConnectionDropped       the endpoint closed or reset the connection mid-request
    │   │   ├── StoreTimeout            connected, but the store stopped answering
    │   │   └── EndpointNotS3           it answers HTTP, but not as S3 (an error page, another service)
    │   └── StoreRequestError(OSError)  any other failure, with the backend's words
    ├── DataError(ValueError)           the bytes are not what the pipeline expects
    │   ├── CorruptShard                not a readable tar stream (names shard and byte offset)
    │   ├── DuplicateField              a field repeated in one sample (names shard and member)
    │   ├── DecodeError                 a field could not be decoded (names sample, shard, field)
    │   ├── StaleIndex                  a shard changed after its index was written
    │   ├── SourceError                 a source sample could not be read or converted (names the object)
    │   ├── CorruptCheckpoint           a payload does not match its marker, or is not a torch.save file
    │   └── WeightsOnlyRefused          torch.load(weights_only=True) refused an object (UnpicklingError)
    ├── ConfigError(ValueError)
    │   ├── MalformedEndpoint           e.g. "localhost:9000" (no scheme)
    │   ├── WrongRegion                 bucket lives in another region
    │   └── InvalidURL                  e.g. an invalid bucket name
    └── ServerError(RuntimeError)       the embedded S3 server could not start

Backend exceptions (botocore, aiohttp, s3fs, fsspec) are translated by
:func:`translate` and nowhere else: the tables ``_CODE_TO_ERROR`` (S3 error codes)
and ``_EXCEPTION_TO_ERROR`` (exception classes, matched by qualified name so this
module imports no backend) are the whole mapping.
"""

from __future__ import annotations

import pickle
import socket
from collections.abc import Callable, Iterator

__all__ = [
    "AccessDenied",
    "AuthError",
    "BucketNotFound",
    "CheckpointNotFound",
    "ConfigError",
    "ConnectionDropped",
    "CorruptCheckpoint",
    "CorruptShard",
    "CredentialsMissing",
    "CredentialsRejected",
    "DataError",
    "DecodeError",
    "DuplicateField",
    "EndpointError",
    "EndpointNotS3",
    "EndpointUnreachable",
    "ExpiredCredentials",
    "InvalidURL",
    "MalformedEndpoint",
    "NotFound",
    "ObjectNotFound",
    "S3PipesError",
    "ServerError",
    "SignatureMismatch",
    "SourceError",
    "StaleIndex",
    "StoreError",
    "StoreRequestError",
    "StoreTimeout",
    "UnknownAccessKey",
    "WeightsOnlyRefused",
    "WrongRegion",
    "translate",
]


class S3PipesError(Exception):
    """Base of every error raised by s3pipes."""


class DataError(S3PipesError, ValueError):
    """The data read is not what the pipeline expects.

    Attributes:
        url: the shard or object.
        member: the tar member (or field) concerned, or "".
        offset: byte offset in the object where the problem starts, or None.
    """

    def __init__(self, url: str, detail: str, *, member: str = "", offset: int | None = None) -> None:
        self.url, self.detail, self.member, self.offset = url, detail, member, offset
        where = "".join(
            [f", member {member!r}" if member else "", f", byte offset {offset}" if offset is not None else ""]
        )
        super().__init__(f"{url}{where}: {detail}")

    def __reduce__(self) -> tuple[object, ...]:
        return (_rebuild_data_error, (type(self), self.url, self.detail, self.member, self.offset))


def _rebuild_data_error(cls: type[DataError], url: str, detail: str, member: str, offset: int | None) -> DataError:
    return cls(url, detail, member=member, offset=offset)


class CorruptShard(DataError):
    """A shard is not a readable tar stream (truncated, corrupt header, not a tar at all)."""


class DuplicateField(DataError):
    """Two members of one sample have the same key and extension."""


class DecodeError(DataError):
    """A field of a sample could not be decoded.

    Attributes:
        key: the sample's ``__key__``; field: the field name, e.g. ``"seg.png"``.
        member, offset: the tar member the field came from and its header's byte offset in the
            shard, when known (the decode stage of a pipeline and ``MapDataset.from_shards`` fill
            them in); else the field and None.
    """

    def __init__(
        self, key: str, url: str, field: str, detail: str, *, member: str = "", offset: int | None = None
    ) -> None:
        self.key, self.field = key, field
        message = f"cannot decode field {field!r} of sample {key!r}: {detail}"
        super().__init__(url, message, member=member or field, offset=offset)
        self.detail = detail

    def locate(self, member: str, offset: int) -> None:
        """Name the tar member the field came from and its byte offset (the message says them too)."""
        located = DecodeError(self.key, self.url, self.field, self.detail, member=member, offset=offset)
        self.member, self.offset, self.args = member, offset, located.args

    def __reduce__(self) -> tuple[object, ...]:
        fields = (self.key, self.url, self.field, self.detail, self.member, self.offset)
        return (_rebuild_decode_error, (type(self), *fields))


def _rebuild_decode_error(
    cls: type[DecodeError], key: str, url: str, field: str, detail: str, member: str, offset: int | None
) -> DecodeError:
    return cls(key, url, field, detail, member=member, offset=offset)


class CorruptCheckpoint(DataError):
    """A payload does not match its marker (size or sha256), or torch cannot read it."""


class WeightsOnlyRefused(DataError, pickle.UnpicklingError):
    """``torch.load(weights_only=True)`` refused an object in the checkpoint (it is not plain tensors/containers)."""


class StaleIndex(DataError):
    """A shard changed (size or ETag) after its index was written."""


class SourceError(DataError):
    """A source object of a conversion could not be read or turned into samples (``.url`` names it)."""


class ConfigError(S3PipesError, ValueError):
    """The configuration (endpoint, region, URL) cannot work, whatever the store says."""


class MalformedEndpoint(ConfigError):
    """The endpoint URL is not an absolute http(s) URL."""


class WrongRegion(ConfigError):
    """The bucket exists in a region other than the one requests are signed for."""


class InvalidURL(ConfigError):
    """The URL cannot name an object (bad bucket name, unknown protocol, ...)."""


class ServerError(S3PipesError, RuntimeError):
    """The embedded S3 server could not be started (binary missing, did not come up)."""


class StoreError(S3PipesError):
    """A request to the store failed.

    Attributes:
        url: the object or prefix the request was for.
        endpoint: where the request went (an endpoint URL, or a protocol name).
        hint: what to try, or "".
        stage: the pipeline stage whose request failed (e.g. ``"open_object"``), or "" outside a
            pipeline; set by the stage, shown first in the message.
    """

    default_hint = ""
    stage = ""

    def __init__(self, url: str, endpoint: str, detail: str, hint: str | None = None) -> None:
        self.url, self.endpoint, self.detail = url, endpoint, detail
        self.hint = self.default_hint if hint is None else hint
        message = f"{url} (endpoint {endpoint}): {detail}"
        super().__init__(message + (f". {self.hint}" if self.hint else ""))

    def __reduce__(self) -> tuple[object, ...]:
        # Builtin OSError subclasses pickle their args, not ours: keep the fields
        # so errors survive the trip back from DataLoader / Dask workers.
        return (type(self), (self.url, self.endpoint, self.detail, self.hint), self.__dict__)

    def __str__(self) -> str:
        # OSError.__str__ formats errno/strerror; ours is the message we built.
        message = str(self.args[0]) if self.args else ""
        return f"stage {self.stage}: {message}" if self.stage else message

    def in_stage(self, stage: str) -> None:
        """Name the pipeline stage the failed request was made for, unless one is named already."""
        if stage and not self.stage:
            self.stage = stage


class NotFound(StoreError, FileNotFoundError):
    """The bucket or the object does not exist."""


class BucketNotFound(NotFound):
    """The bucket does not exist at this endpoint."""

    default_hint = "Create it first, or check the bucket name and the endpoint"


class ObjectNotFound(NotFound):
    """The bucket exists but the object (or version) does not."""

    default_hint = "Check the key; list the prefix with `s3pipes ls` to see what is there"


class CheckpointNotFound(ObjectNotFound):
    """The run has no committed checkpoint at this step (``step``), or none at all (``step`` is None).

    Attributes:
        step: the step asked for, or None for "the latest".
        available: the committed steps there are, sorted.
    """

    def __init__(self, url: str, endpoint: str, step: int | None, available: list[int]) -> None:
        self.step, self.available = step, list(available)
        if step is None:
            detail = "no committed checkpoint in this run"
            hint = "Save one with save(state, step=...); objects saved with key= load with load(key=...)"
        else:
            older = f" (and {len(available) - 20} older)" if len(available) > 20 else ""
            detail = f"step {step} has no committed checkpoint"
            hint = (
                f"Committed steps: {', '.join(map(str, available[-20:]))}{older}"
                if available
                else ("The run has no committed checkpoint yet")
            )
        super().__init__(url, endpoint, detail, hint)

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (self.url, self.endpoint, self.step, self.available), self.__dict__)


class AuthError(StoreError, PermissionError):
    """The store would not let these credentials do this."""


class CredentialsMissing(AuthError):
    """No credentials were found in storage_options, the environment or the boto chain."""

    default_hint = (
        "Set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or pass key=/secret= in "
        "storage_options, or call s3pipes.load_env() to read a .env file)"
    )


class CredentialsRejected(AuthError):
    """The store refused the credentials themselves."""

    default_hint = "Check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY for this endpoint"


class UnknownAccessKey(CredentialsRejected):
    """The store does not know the access key id."""

    default_hint = "The access key id is not known to this endpoint: check AWS_ACCESS_KEY_ID and the endpoint"


class SignatureMismatch(CredentialsRejected):
    """The key id is known but the signature is wrong: almost always a wrong secret."""

    default_hint = "The access key id is known but the secret does not match: check AWS_SECRET_ACCESS_KEY"


class ExpiredCredentials(CredentialsRejected):
    """Temporary credentials have expired."""

    default_hint = "Refresh the session token (AWS_SESSION_TOKEN) or the profile's credentials"


class AccessDenied(AuthError):
    """The credentials are valid but lack permission for this request."""

    default_hint = "The credentials are valid but not allowed to do this: check the bucket policy or identity"


class EndpointError(StoreError, ConnectionError):
    """The endpoint could not be talked to."""


class EndpointUnreachable(EndpointError):
    """Nothing answered: connection refused, unknown host, TLS failure or connect timeout."""

    default_hint = "Check the endpoint URL (AWS_ENDPOINT_URL / endpoint_url) and that the server is running"


class ConnectionDropped(EndpointError):
    """The endpoint accepted the connection, then closed or reset it before answering."""

    default_hint = "The endpoint or a proxy in front of it is dropping connections; check its logs and load"


class StoreTimeout(EndpointError):
    """The endpoint accepted the connection but stopped answering."""

    default_hint = "The store is overloaded or stalled; raise read_timeout or retry later"


class EndpointNotS3(EndpointError):
    """The endpoint answers HTTP, but a request S3 answers with an error code got none (an HTML page)."""

    default_hint = (
        "Check the endpoint URL and port (AWS_ENDPOINT_URL / endpoint_url): it may be another service, "
        "e.g. a web console or a proxy's error page"
    )


NOT_S3_CODE = "s3pipes.NotS3"
"""The error code given to a reply whose body has no S3 error code (S3 always sends one, but to HEAD)."""


class StoreRequestError(StoreError, OSError):
    """A store failure that none of the specific errors describe."""


# S3 error codes (botocore's response["Error"]["Code"]) -> error class.
_CODE_TO_ERROR: dict[str, type[S3PipesError]] = {
    "NoSuchBucket": BucketNotFound,
    "NoSuchKey": ObjectNotFound,
    "NoSuchVersion": ObjectNotFound,
    "404": ObjectNotFound,
    "NotFound": ObjectNotFound,
    "InvalidAccessKeyId": UnknownAccessKey,
    "SignatureDoesNotMatch": SignatureMismatch,
    "ExpiredToken": ExpiredCredentials,
    "TokenRefreshRequired": ExpiredCredentials,
    "InvalidToken": CredentialsRejected,
    "AccessDenied": AccessDenied,
    "AllAccessDisabled": AccessDenied,
    "AccountProblem": AccessDenied,
    "403": AccessDenied,
    "AuthorizationHeaderMalformed": WrongRegion,
    "PermanentRedirect": WrongRegion,
    "IllegalLocationConstraintException": WrongRegion,
    "301": WrongRegion,
    NOT_S3_CODE: EndpointNotS3,
    "InvalidBucketName": InvalidURL,
    "RequestTimeout": StoreTimeout,
}

# Backend exception classes, by "module.QualName" anywhere in the MRO -> error class.
# First match along the exception's cause chain wins, so order from specific to general.
_EXCEPTION_TO_ERROR: tuple[tuple[str, type[S3PipesError]], ...] = (
    ("botocore.exceptions.NoCredentialsError", CredentialsMissing),
    ("botocore.exceptions.PartialCredentialsError", CredentialsMissing),
    ("botocore.exceptions.ConnectTimeoutError", EndpointUnreachable),
    ("botocore.exceptions.EndpointConnectionError", EndpointUnreachable),
    ("botocore.exceptions.SSLError", EndpointUnreachable),
    ("botocore.exceptions.ProxyConnectionError", EndpointUnreachable),
    ("aiohttp.client_exceptions.ClientConnectorError", EndpointUnreachable),
    ("botocore.exceptions.ReadTimeoutError", StoreTimeout),
    ("botocore.exceptions.ConnectionClosedError", ConnectionDropped),
    ("aiohttp.client_exceptions.ServerDisconnectedError", ConnectionDropped),
    ("aiohttp.client_exceptions.ClientPayloadError", ConnectionDropped),
    ("builtins.ConnectionResetError", ConnectionDropped),
    ("builtins.TimeoutError", StoreTimeout),
    ("fsspec.exceptions.FSTimeoutError", StoreTimeout),
    ("builtins.ConnectionRefusedError", EndpointUnreachable),
    ("socket.gaierror", EndpointUnreachable),
    ("builtins.FileNotFoundError", ObjectNotFound),
    ("builtins.PermissionError", AccessDenied),
)


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def _error_code(exc: BaseException) -> str | None:
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        code = response.get("Error", {}).get("Code")
        if code == "" and str(response.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))[:1] == "4":
            return NOT_S3_CODE  # botocore found no code in the body: S3's always has one (a HEAD's has none: "404")
        return str(code) if code else None
    return None


def _status(exc: BaseException) -> str:
    response = getattr(exc, "response", None)
    status = response.get("ResponseMetadata", {}).get("HTTPStatusCode") if isinstance(response, dict) else None
    return str(status) if status else "an error"


def _mro_names(exc: BaseException) -> set[str]:
    return {f"{cls.__module__}.{cls.__qualname__}" for cls in type(exc).__mro__}


def classify(exc: BaseException) -> tuple[type[S3PipesError], BaseException] | None:
    """The error class for ``exc`` and the link of its cause chain that decided it.

    S3 error codes win over exception classes: they are the store's own words.
    """
    chain = list(_chain(exc))
    for link in chain:
        code = _error_code(link)
        if code in _CODE_TO_ERROR:
            return _CODE_TO_ERROR[code], link
    for link in chain:
        names = _mro_names(link)
        for name, cls in _EXCEPTION_TO_ERROR:
            if name in names:
                return cls, link
    return None


def _detail(cls: type[S3PipesError], link: BaseException) -> str:
    code = _error_code(link)
    if cls is EndpointUnreachable and any(isinstance(e, socket.gaierror) for e in _chain(link)):
        return "host name could not be resolved (DNS)"
    if cls is EndpointUnreachable and any(isinstance(e, ConnectionRefusedError) for e in _chain(link)):
        return "connection refused: nothing is listening there"
    text = {
        BucketNotFound: "bucket does not exist",
        ObjectNotFound: "object does not exist",
        CredentialsMissing: "no credentials found",
        UnknownAccessKey: "credentials rejected: unknown access key id",
        SignatureMismatch: "credentials rejected: the secret key does not match the access key id",
        ExpiredCredentials: "credentials rejected: they have expired",
        CredentialsRejected: "credentials rejected",
        AccessDenied: "access denied",
        EndpointUnreachable: "endpoint unreachable",
        ConnectionDropped: "the endpoint closed the connection before answering",
        StoreTimeout: "the store did not answer in time",
        EndpointNotS3: f"the endpoint answered HTTP {_status(link)} without an S3 error code: it does not look like S3",
        WrongRegion: "the bucket is in another region than requests are signed for",
    }.get(cls, "")
    if cls is WrongRegion:
        message = getattr(link, "response", {}).get("Error", {}).get("Message", "")
        text = f"{text} ({message})" if message else text
    if code and code not in {"404", "403", "301", NOT_S3_CODE} and text:
        text = f"{text} [{code}]"
    return text or f"{type(link).__name__}: {link}"


def _is_ambiguous(found: tuple[type[S3PipesError], BaseException] | None) -> bool:
    """Worth a probe: nothing matched, or only a bare status (HEAD replies carry no body)."""
    if found is None:
        return True
    cls, link = found
    code = _error_code(link)
    return cls in (AccessDenied, ObjectNotFound) and (code is None or code.isdigit())


def translate(
    exc: BaseException,
    *,
    url: str,
    endpoint: str,
    probe: Callable[[], BaseException | None] | None = None,
    redact: Callable[[str], str] = lambda text: text,
) -> S3PipesError:
    """Turn a backend exception into the matching :class:`S3PipesError`.

    Args:
        exc: what fsspec / s3fs / botocore raised.
        url: the object or prefix the request was for (named in the message).
        endpoint: where the request went (named in the message).
        probe: called when the store's answer was ambiguous (a body-less 403 or
            404 to a HEAD request); it makes a request that returns an error code
            and returns what that raised, or None if it succeeded.
        redact: applied to any backend text that lands in the message.

    Returns:
        The error to raise ``from exc``. An ``S3PipesError`` passes through.

    Example:
        >>> err = translate(FileNotFoundError("b/k"), url="memory://b/k", endpoint="memory")
        >>> type(err).__name__, isinstance(err, FileNotFoundError)
        ('ObjectNotFound', True)
    """
    if isinstance(exc, S3PipesError):
        return exc
    found = classify(exc)
    if probe is not None and _is_ambiguous(found):
        probed = probe()
        refined = classify(probed) if probed is not None else None
        code = _error_code(refined[1]) if refined is not None else None
        if refined is not None and code is not None and not code.isdigit():
            found = refined
        elif refined is not None and code is not None and found is not None and code.isdigit() and code[0] == "4":
            found = EndpointNotS3, refined[1]  # the probe is a listing: S3 always says why it refuses one
    tries = _attempts(exc)
    if found is None:
        code = next((c for c in map(_error_code, _chain(exc)) if c), None)  # the store's word, if it said one
        said = f"the store answered {code}" if code else f"{type(exc).__name__}: {exc}"
        return StoreRequestError(url, endpoint, redact(said + tries))
    cls, link = found
    if issubclass(cls, StoreError):
        return cls(url, endpoint, redact(_detail(cls, link) + tries))
    return cls(redact(f"{url} (endpoint {endpoint}): {_detail(cls, link)}{tries}"))


def _attempts(exc: BaseException) -> str:
    """``"; gave up after 3 attempts"`` when a retry loop marked the exception it gave up on, else ``""``."""
    for link in _chain(exc):
        attempts = getattr(link, "s3pipes_attempts", None)
        if isinstance(attempts, int) and attempts > 1:
            return f"; gave up after {attempts} attempts"
    return ""
