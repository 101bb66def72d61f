"""One storage layer: URL -> (fsspec filesystem, path), with S3 set up from the environment.

Every byte s3pipes moves goes through a :class:`Store`. It resolves URLs for any
fsspec protocol (``s3://``, ``file://``, ``memory://``, ``gs://``, ...), builds one
filesystem per protocol *per process* (s3fs clients hang when used after ``fork``,
s3fs#914, so a forked DataLoader worker builds its own), and is the boundary where
backend exceptions become :mod:`s3pipes.errors`.

S3 settings, first match wins:

========================  =============================================================
setting                   sources, in order
========================  =============================================================
endpoint                  ``storage_options["endpoint_url"]``, ``AWS_ENDPOINT_URL_S3``,
                          ``AWS_ENDPOINT_URL``; none = AWS itself
credentials               ``storage_options["key"/"secret"/"token"]``,
                          ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` /
                          ``AWS_SESSION_TOKEN``, then botocore's chain (profile, ...)
region                    ``client_kwargs["region_name"]``, ``AWS_REGION``,
                          ``AWS_DEFAULT_REGION``; with a custom endpoint "us-east-1"
TLS certificates          ``client_kwargs["verify"]`` (a CA bundle's path, or False),
                          ``AWS_CA_BUNDLE``; none = the default CAs
addressing                path-style for a custom endpoint (``http://localhost:9000``)
========================  =============================================================

The environment is read only by :meth:`Store.from_env`, and a ``.env`` file only
when asked for (``env_file=`` or :func:`load_env`); importing s3pipes reads neither.
"""

from __future__ import annotations

import contextlib
import datetime
import email.utils
import gc
import io
import logging
import os
import random
import secrets
import socket
import stat
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from types import TracebackType
from typing import IO, TYPE_CHECKING, Any, cast
from urllib.parse import unquote, urlsplit

import fsspec
import fsspec.asyn
from fsspec.core import split_protocol

from s3pipes import errors

if TYPE_CHECKING:
    from s3pipes._fastget import FastGetter

__all__ = ["DEFAULT_CONNECT_TIMEOUT", "DEFAULT_READ_TIMEOUT", "Store", "StoreFile", "load_env"]

DEFAULT_CONNECT_TIMEOUT = 3.0
"""Seconds to wait for a TCP/TLS connection before reporting the endpoint unreachable."""

DEFAULT_READ_TIMEOUT = 60.0
"""Seconds to wait for the next bytes of a response before reporting a timeout."""

PART_SUFFIX = ".s3pipes-part"
"""The name ending of a local write in flight (a temporary file beside its target): never listed."""

_SECRET_OPTIONS = ("secret", "token", "password", "aws_secret_access_key", "aws_session_token")
_S3_PROTOCOLS = ("s3", "s3a")
_AWS_VARIABLES = (
    "AWS_ENDPOINT_URL_S3",
    "AWS_ENDPOINT_URL",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "AWS_CA_BUNDLE",
)
_WRITE_MODES, _READ_MODES = ("wb",), ("rb",)
_log = logging.getLogger(__name__)


def load_env(path: str | os.PathLike[str] = ".env", *, override: bool = False) -> bool:
    """Read ``KEY=value`` lines from a ``.env`` file into ``os.environ``.

    Variables already set in the environment win unless ``override=True``. Values are
    taken literally: ``$`` in a secret stays ``$`` (no ``${VAR}`` expansion).

    Args:
        path: the file to read.
        override: let the file's values replace ones already set.

    Returns:
        True if the file existed and set at least one variable.

    Example:
        >>> load_env("/nonexistent/.env")
        False
    """
    from dotenv import load_dotenv

    return bool(load_dotenv(path, override=override, interpolate=False))


def _endpoint_from(options: Mapping[str, Any], env: Mapping[str, str]) -> tuple[str | None, str]:
    """The endpoint URL and where it came from (named in errors)."""
    candidates = (
        (options.get("endpoint_url"), "storage_options['endpoint_url']"),
        (options.get("client_kwargs", {}).get("endpoint_url"), "client_kwargs['endpoint_url']"),
        (env.get("AWS_ENDPOINT_URL_S3"), "AWS_ENDPOINT_URL_S3"),
        (env.get("AWS_ENDPOINT_URL"), "AWS_ENDPOINT_URL"),
    )
    for value, source in candidates:
        if value:
            return str(value), source
    return None, ""


def _without_userinfo(endpoint: str) -> str:
    """``http://user:pass@host:9000`` -> ``http://host:9000``: endpoints are shown, credentials not."""
    if "://" not in endpoint:  # malformed, and shown in the error that says so
        return endpoint.rpartition("@")[2]
    parts = urlsplit(endpoint)
    if "@" not in parts.netloc:
        return endpoint
    return parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl()


def _check_endpoint(endpoint: str, source: str) -> None:
    parts = urlsplit(endpoint)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        shown = _without_userinfo(endpoint)
        guess = f"http://{shown}" if "://" not in endpoint else None
        fix = f"; did you mean {guess!r}?" if guess else "; it must look like http://host:port"
        raise errors.MalformedEndpoint(f"endpoint {shown!r} (from {source}) is not an http(s) URL with a host{fix}")


def _s3_options(explicit: Mapping[str, Any], env: Mapping[str, str], timeouts: tuple[float, float]) -> dict[str, Any]:
    """s3fs keyword arguments: explicit options over environment over defaults."""
    options = dict(explicit)
    endpoint, source = _endpoint_from(explicit, env)
    client_kwargs = dict(options.pop("client_kwargs", {}))
    client_kwargs.pop("endpoint_url", None)
    if endpoint is not None:
        _check_endpoint(endpoint, source)
        options["endpoint_url"] = _without_userinfo(endpoint)  # never sent on, nor logged by botocore
    parts = urlsplit(endpoint or "")  # http://key:secret@host: credentials as the endpoint's source gives them
    in_url = (unquote(parts.username), unquote(parts.password)) if parts.username and parts.password else None
    given = options.get("key") is not None or options.get("secret") is not None
    if in_url is not None and not given and not source.startswith("AWS_"):  # storage_options win over the env
        options["key"], options["secret"] = in_url
    for option, variable in (
        ("key", "AWS_ACCESS_KEY_ID"),
        ("secret", "AWS_SECRET_ACCESS_KEY"),
        ("token", "AWS_SESSION_TOKEN"),
    ):
        if options.get(option) is None and env.get(variable):
            options[option] = env[variable]
    if in_url is not None and options.get("key") is None and options.get("secret") is None:
        options["key"], options["secret"] = in_url
    region = client_kwargs.get("region_name") or env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION")
    if region is None and endpoint is not None:
        region = "us-east-1"  # any region signs for a custom endpoint; botocore needs one
    if region is not None:
        client_kwargs["region_name"] = region
    if "verify" not in client_kwargs and env.get("AWS_CA_BUNDLE"):
        client_kwargs["verify"] = env["AWS_CA_BUNDLE"]  # so a .env file's bundle counts too
    options["client_kwargs"] = client_kwargs
    config = dict(options.pop("config_kwargs", {}))
    config.setdefault("connect_timeout", timeouts[0])
    config.setdefault("read_timeout", timeouts[1])
    # botocore's standard mode retries 5xx, throttling and dropped connections with
    # back-off. That makes an endpoint that was never there slow to report (s3fs's own
    # 5 tries on top: 10+ s), which is why Store.filesystem checks reachability first.
    config.setdefault("retries", {"mode": "standard", "max_attempts": 3})
    if endpoint is not None:
        config.setdefault("s3", {"addressing_style": "path"})
    options["config_kwargs"] = config
    # s3fs answers info()/open()/cat_file() sizes from listings it cached, so after a listing
    # an object another process wrote or replaced since looked missing or kept its old size.
    options.setdefault("use_listings_cache", False)
    return options


_WITH_CLIENTS: weakref.WeakSet[Store] = weakref.WeakSet()
"""Stores that built a client in this process (alive, or garbage not yet collected)."""


def _collect_before_fork() -> None:
    """Collect unreachable Stores before a fork, here, where their clients can close.

    A Store in a reference cycle outlives its last use until the cycle collector runs. A
    child forked before that (a DataLoader worker) inherits it and, collecting it there,
    runs the clients' finalizers on a copy of the parent's event loop that no thread runs:
    they waited for it (s3fs 0.1 s, our session 2 s, before it learnt to skip other
    processes) or left "attached to a different loop" errors and "Unclosed connector"
    warnings in every worker. Only in processes with s3pipes clients: a full collection
    costs milliseconds to tens of them, next to the fork itself.
    """
    if _WITH_CLIENTS:
        gc.collect()


os.register_at_fork(before=_collect_before_fork)


class Store:
    """Resolves URLs to fsspec filesystems and translates their errors.

    Args:
        storage_options: keyword arguments for the filesystem of the URLs' protocol,
            as fsspec takes them (for S3: s3fs's ``endpoint_url``, ``key``, ``secret``,
            ``client_kwargs``, ``config_kwargs``, ...).
        connect_timeout: seconds before an endpoint that does not accept the
            connection is reported unreachable.
        read_timeout: seconds without bytes before a request is reported stalled.

    A Store built directly reads no environment variable itself; use
    :meth:`from_env` for the ``AWS_*`` / ``.env`` configuration (the module
    docstring has the order). Filesystems are built lazily, once per process.

    Example:
        >>> store = Store()
        >>> store.write_bytes("memory://doc-store/a.txt", b"hi")
        >>> store.read_bytes("memory://doc-store/a.txt")
        b'hi'
    """

    def __init__(
        self,
        storage_options: Mapping[str, Any] | None = None,
        *,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        read_timeout: float = DEFAULT_READ_TIMEOUT,
        _env: Mapping[str, str] | None = None,
    ) -> None:
        if connect_timeout <= 0 or read_timeout <= 0:
            raise ValueError(f"timeouts must be positive, got {connect_timeout=} and {read_timeout=}")
        self._explicit = dict(storage_options or {})
        self._timeouts = (float(connect_timeout), float(read_timeout))
        # Resolve (and validate) S3 settings now: a malformed endpoint fails at construction,
        # and nothing of the environment but these settings is kept (or pickled to workers).
        self._s3 = _s3_options(self._explicit, _env or {}, self._timeouts)
        self._filesystems: dict[str, fsspec.AbstractFileSystem] = {}
        self._inherited: list[Any] = []
        self._getter: FastGetter | None = None
        self._pid = os.getpid()
        self._lock = threading.Lock()

    @classmethod
    def from_env(
        cls,
        storage_options: Mapping[str, Any] | None = None,
        *,
        env_file: str | os.PathLike[str] | None = None,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        read_timeout: float = DEFAULT_READ_TIMEOUT,
    ) -> Store:
        """A Store configured from explicit options, then ``AWS_*`` variables.

        Args:
            storage_options: as for :class:`Store`; these win over the environment.
            env_file: a ``.env`` file whose values fill in variables the process
                environment does not set (taken literally, as :func:`load_env` does). Not
                read unless given.
            connect_timeout: as for :class:`Store`.
            read_timeout: as for :class:`Store`.

        Raises:
            MalformedEndpoint: the endpoint has no http(s) scheme or no host.
            ConfigError: ``env_file`` does not exist or cannot be read.

        Example:
            >>> Store.from_env({"endpoint_url": "http://127.0.0.1:9000", "key": "k", "secret": "s"})
            Store(s3: endpoint=http://127.0.0.1:9000, key=k***, secret=***)
        """
        env: dict[str, str] = {}
        if env_file is not None:
            from dotenv import dotenv_values

            if not os.path.exists(env_file):  # dotenv reads a missing file as an empty one (a pipe is fine)
                raise errors.ConfigError(f"env_file {os.fspath(env_file)!r}: no such file (cwd {os.getcwd()})")
            try:
                values = dotenv_values(env_file, interpolate=False)
            except OSError as exc:
                raise errors.ConfigError(f"env_file {os.fspath(env_file)!r}: cannot be read: {exc}") from None
            env.update({k: v for k, v in values.items() if k in _AWS_VARIABLES and v is not None})
        env.update({k: os.environ[k] for k in _AWS_VARIABLES if k in os.environ})
        return cls(storage_options, connect_timeout=connect_timeout, read_timeout=read_timeout, _env=env)

    # -- resolution -------------------------------------------------------------------------

    def _options_for(self, protocol: str) -> dict[str, Any]:
        return dict(self._s3) if protocol in _S3_PROTOCOLS else dict(self._explicit)

    def resolved_options(self, url: str) -> dict[str, Any]:
        """The keyword arguments the filesystem for ``url`` is built with.

        They include credentials: inspect them, do not log them.

        Example:
            >>> Store({"endpoint_url": "http://127.0.0.1:9000"}).resolved_options("s3://b/k")["client_kwargs"]
            {'region_name': 'us-east-1'}
        """
        return self._options_for(self._protocol(url))

    def endpoint(self, url: str) -> str:
        """Where requests for ``url`` go, as named in error messages.

        Example:
            >>> Store().endpoint("memory://b/k")
            'memory'
        """
        protocol = self._protocol(url)
        if protocol in _S3_PROTOCOLS:
            return _without_userinfo(str(self._s3.get("endpoint_url") or "AWS S3"))
        return protocol

    @staticmethod
    def _protocol(url: str) -> str:
        protocol, _ = split_protocol(url)
        return protocol or "file"

    def filesystem(self, url: str) -> fsspec.AbstractFileSystem:
        """The filesystem for ``url``'s protocol, built once in this process.

        Example:
            >>> store = Store()
            >>> fs = store.filesystem("memory://doc-fs/a")
            >>> type(fs).__name__, store.filesystem("memory://doc-fs/b") is fs
            ('MemoryFileSystem', True)
        """
        protocol = self._protocol(url)
        if self._pid != os.getpid():
            self._after_fork()
        with self._lock:
            fs = self._filesystems.get(protocol)
        if fs is not None:
            return fs
        try:
            cls = fsspec.get_filesystem_class(protocol)
        except (ImportError, ValueError) as exc:
            raise errors.InvalidURL(f"{url}: cannot open protocol {protocol!r}: {exc}") from None
        options = self.resolved_options(url)
        if protocol == "file":
            options.setdefault("auto_mkdir", True)
        if protocol in _S3_PROTOCOLS and options.get("endpoint_url"):
            self._check_reachable(url, str(options["endpoint_url"]))  # not under the lock: it waits
        # skip_instance_cache: fsspec's class-level instance cache would hand
        # the same (possibly forked) client to every Store in the process.
        if protocol in _S3_PROTOCOLS and "session" not in options and "profile" not in options:
            options["session"] = _fast_session()
        fs = cls(skip_instance_cache=True, **options)
        _WITH_CLIENTS.add(self)
        if protocol in _S3_PROTOCOLS:
            # One retry layer: botocore's (3 attempts, back-off). s3fs's 5 tries around it
            # multiplied them: a stalled endpoint took 21 connections to report.
            fs.retries = 1
        with self._lock:
            return self._filesystems.setdefault(protocol, fs)

    def _after_fork(self) -> None:
        """In a forked child: fresh lock and clients; the parent's are kept but never used.

        The inherited lock may have been held by a parent thread at fork time (it would
        never be released here), and collecting the inherited clients would run finalizers
        that close connections whose sockets the parent still uses (measured: the parent's
        next request then hung for read_timeout).
        """
        self._lock = threading.Lock()
        self._inherited.extend([*self._filesystems.values(), self._getter])
        self._filesystems, self._getter, self._pid = {}, None, os.getpid()

    def _check_reachable(self, url: str, endpoint: str) -> None:
        """Fail in at most ``connect_timeout`` when nothing listens at a custom endpoint.

        Once per filesystem (so once per process): later failures are retried as
        transient, but a wrong host or port is a configuration error and is said at once,
        not after a minute of back-off.
        """
        parts = urlsplit(endpoint)
        port = parts.port or (443 if parts.scheme == "https" else 80)
        shown = _without_userinfo(endpoint)  # an endpoint may carry key:secret@; the message must not
        try:
            socket.create_connection((parts.hostname, port), timeout=self._timeouts[0]).close()
        except socket.gaierror as exc:
            raise errors.translate(exc, url=url, endpoint=shown, redact=self.redact) from exc
        except OSError as exc:  # refused, timed out, no route
            detail = (
                "connection refused: nothing is listening there"
                if isinstance(exc, ConnectionRefusedError)
                else (f"no connection within connect_timeout={self._timeouts[0]:g} s ({exc})")
            )
            raise errors.EndpointUnreachable(url, shown, detail) from exc

    def resolve(self, url: str) -> tuple[fsspec.AbstractFileSystem, str]:
        """``(filesystem, path)`` for ``url``; the path is what the filesystem's methods take.

        Example:
            >>> fs, path = Store().resolve("memory://bucket/x.tar")
            >>> type(fs).__name__, path
            ('MemoryFileSystem', '/bucket/x.tar')
        """
        fs = self.filesystem(url)
        return fs, str(fs._strip_protocol(url))

    # -- the error boundary -----------------------------------------------------------------

    def redact(self, text: str) -> str:
        """``text`` with every configured secret replaced by ``***``.

        Secrets: ``secret``/``token``/``password`` options (also inside ``client_kwargs``)
        and credentials written into the endpoint URL. Values shorter than 4 characters
        are not replaced (they would mangle ordinary words); do not use such secrets.

        Example:
            >>> Store({"secret": "hunter22"}).redact("signing with hunter22 failed")
            'signing with *** failed'
        """
        secrets: list[str] = []
        for options in (self._s3, self._explicit, self._s3.get("client_kwargs", {})):
            secrets += [str(options[name]) for name in _SECRET_OPTIONS if options.get(name)]
        endpoint, _ = _endpoint_from(self._explicit, {})  # as given: the store's own has no credentials
        userinfo = urlsplit(endpoint or "").password
        if userinfo:
            secrets += [userinfo, unquote(userinfo)]
        for secret in sorted(set(secrets), key=len, reverse=True):
            if len(secret) >= 4:
                text = text.replace(secret, "***")
        return text

    @contextlib.contextmanager
    def errors(self, url: str) -> Iterator[None]:
        """Translate any backend exception raised inside into an :mod:`s3pipes.errors` error.

        The one boundary: every Store method runs its I/O inside it, and stages that
        use a filesystem directly wrap their calls in it.

        Example:
            >>> store = Store()
            >>> fs, path = store.resolve("memory://doc-errors/missing")
            >>> try:
            ...     with store.errors("memory://doc-errors/missing"):
            ...         fs.cat_file(path)  # raises the builtin FileNotFoundError
            ... except errors.ObjectNotFound as exc:
            ...     print(type(exc).__name__, isinstance(exc, FileNotFoundError))
            ObjectNotFound True
        """
        try:
            yield
        except errors.S3PipesError:
            raise
        except (KeyboardInterrupt, SystemExit, GeneratorExit, StopIteration):
            raise
        except Exception as exc:
            raise errors.translate(
                exc, url=url, endpoint=self.endpoint(url), probe=lambda: self._probe(url), redact=self.redact
            ) from exc

    def _probe(self, url: str) -> BaseException | None:
        """Ask the store something that answers with an error code (HEAD replies have none)."""
        fs, path = self.resolve(url)
        if self._protocol(url) not in _S3_PROTOCOLS:
            return None
        bucket, _, key = path.partition("/")
        try:
            fs.call_s3("list_objects_v2", Bucket=bucket, Prefix=key, MaxKeys=1)
        except Exception as exc:
            return exc
        return None

    # -- I/O, all inside the boundary -------------------------------------------------------

    def open(self, url: str, mode: str = "rb", **kwargs: Any) -> IO[bytes]:
        """Open ``url`` for reading (``"rb"``) or for replacing it whole (``"wb"``).

        Errors raised by reads, writes and ``close`` are translated. A write becomes
        visible only when the file is closed without error (fsspec's commit/discard);
        inside a ``with`` block that raises, it is discarded and an existing object of
        that name is left as it was. Other modes (append, exclusive, update) are refused:
        object stores replace objects whole.

        Example:
            >>> store = Store()
            >>> with store.open("memory://doc-open/a.txt", "wb") as f:
            ...     _ = f.write(b"hello")
            >>> with store.open("memory://doc-open/a.txt") as f:
            ...     f.read(4)
            b'hell'
        """
        if mode not in _READ_MODES + _WRITE_MODES:
            raise ValueError(f"{mode=} is not supported for {url}: use 'rb' to read or 'wb' to replace the object")
        fs, path = self.resolve(url)
        writing = mode in _WRITE_MODES
        protocol = self._protocol(url)
        if protocol == "memory":
            # memory:// publishes a file when it is opened and hands every reader the same
            # file object (one shared position); give it a real store's semantics instead.
            handle: Any = _MemoryUpload(fs, path) if writing else io.BytesIO(self.read_bytes(url))
        elif writing and protocol in ("file", "local"):
            with self.errors(url):
                handle = _LocalUpload(path)
        else:
            if writing:
                kwargs.setdefault("autocommit", False)  # publish on commit, not on open or failed close
            with self.errors(url):
                handle = fs.open(path, mode, **kwargs)
        # StoreFile implements the parts of IO[bytes] that readers and writers use.
        return cast(IO[bytes], StoreFile(handle, self, url, commit=writing))

    def read_bytes(self, url: str, start: int | None = None, end: int | None = None) -> bytes:
        """The object's bytes (``[start, end)`` when given).

        Example:
            >>> store = Store()
            >>> store.write_bytes("memory://doc-read-bytes/a", b"0123456789")
            >>> store.read_bytes("memory://doc-read-bytes/a", 2, 5)
            b'234'
        """
        if self._fast_getter(url) is not None and (start or 0) >= 0 and (end is None or end >= 0):
            return self.read_ranges([url], [start], [end], concurrency=1)[0]  # resumes a body cut short
        fs, path = self.resolve(url)
        with self.errors(url):
            return bytes(_retrying(lambda: fs.cat_file(path, start=start, end=end)))

    def read_ranges(
        self,
        urls: Sequence[str],
        starts: Sequence[int | None] | None = None,
        ends: Sequence[int | None] | None = None,
        *,
        concurrency: int = 32,
    ) -> list[bytes]:
        """The bytes of many objects (or ``[start, end)`` ranges of them), fetched concurrently.

        At most ``concurrency`` requests are in flight; results come in the order asked.
        All URLs must share one protocol.

        Raises:
            StoreError: for the first URL that failed, naming it.

        Example:
            >>> store = Store()
            >>> store.write_bytes("memory://doc-ranges/a", b"0123456789")
            >>> store.read_ranges(["memory://doc-ranges/a"] * 2, [0, 5], [2, 8])
            [b'01', b'567']
        """
        if not urls:
            return []
        fs, _ = self.resolve(urls[0])
        paths = [self.resolve(url)[1] for url in urls]
        starts_ = list(starts) if starts is not None else [None] * len(urls)
        ends_ = list(ends) if ends is not None else [None] * len(urls)
        getter = self._fast_getter(urls[0])
        if getter is not None:
            ranges = [(*path.split("/", 1), start, end) for path, start, end in zip(paths, starts_, ends_, strict=True)]
            return self._raise_first(urls, getter.fetch(ranges, concurrency=concurrency))  # type: ignore[arg-type]
        options: dict[str, Any] = {"batch_size": concurrency} if getattr(fs, "async_impl", False) else {}
        if self._protocol(urls[0]) in _S3_PROTOCOLS:
            # One GET per object: with max_concurrency > 1, s3fs first HEADs every whole-object
            # read to decide whether to split it (measured: 2.1x the objects/s on 4 KB objects).
            options["max_concurrency"] = 1
        with self.errors(urls[0]):
            results = fs.cat_ranges(paths, starts_, ends_, on_error="return", **options)
        return self._raise_first(urls, results)

    def _raise_first(self, urls: Sequence[str], results: Sequence[Any]) -> list[bytes]:
        for url, result in zip(urls, results, strict=True):
            if isinstance(result, BaseException):
                with self.errors(url):
                    raise result
        return [bytes(result) for result in results]

    def _fast_getter(self, url: str) -> FastGetter | None:
        """The low-CPU GET path (see :mod:`s3pipes._fastget`), where it applies, once per process."""
        s3 = self._s3
        path_style = s3["config_kwargs"].get("s3", {}).get("addressing_style") == "path"
        if not (self._protocol(url) in _S3_PROTOCOLS and s3.get("endpoint_url") and path_style):
            return None
        if not (s3.get("key") and s3.get("secret")) or self._pid != os.getpid():
            return None
        if self._getter is None:
            from botocore.credentials import Credentials

            from s3pipes._fastget import FastGetter

            credentials = Credentials(s3["key"], s3["secret"], s3.get("token"))
            region = s3["client_kwargs"].get("region_name", "us-east-1")
            verify = s3["client_kwargs"].get("verify", True)  # TLS as botocore checks it
            self._getter = FastGetter(
                str(s3["endpoint_url"]), credentials, region, timeouts=self._timeouts, verify=verify
            )
            _WITH_CLIENTS.add(self)
        return self._getter

    def write_bytes(self, url: str, data: bytes) -> None:
        """Write ``data`` as the whole object at ``url``.

        Example:
            >>> store = Store()
            >>> store.write_bytes("memory://doc-write-bytes/a", b"first")
            >>> store.write_bytes("memory://doc-write-bytes/a", b"second")
            >>> store.read_bytes("memory://doc-write-bytes/a")
            b'second'
        """
        if not isinstance(data, bytes | bytearray | memoryview):
            raise TypeError(f"write_bytes({url!r}) takes bytes, not {type(data).__name__}")
        if self._protocol(url) in ("file", "local"):
            with self.open(url, "wb") as file:  # beside the target, renamed over it: never half written
                file.write(data)
            return
        fs, path = self.resolve(url)
        getter = self._fast_getter(url)
        with self.errors(url):
            if getter is not None:  # the path whose stalls fail within the read timeout, as reads do
                bucket, _, key = path.partition("/")
                fsspec.asyn.sync(fsspec.asyn.get_loop(), getter.put_object, bucket, key, memoryview(data))
            else:
                fs.pipe_file(path, data)

    def info(self, url: str) -> dict[str, Any]:
        """Metadata of one object (``size``, and for S3 ``ETag``, ``LastModified``, ...).

        Example:
            >>> store = Store()
            >>> store.write_bytes("memory://doc-info/a", b"12345")
            >>> store.info("memory://doc-info/a")["size"]
            5
        """
        getter = self._fast_getter(url)
        fs, path = self.resolve(url)
        with self.errors(url):
            if getter is not None and not path.endswith("/"):
                # one HEAD that a stall fails within read_timeout (botocore retries read timeouts: 4x as long)
                return getter.head(*path.split("/", 1))
            return dict(fs.info(path))

    def exists(self, url: str) -> bool:
        """Whether ``url`` exists; a missing bucket is an error, not False.

        Example:
            >>> store = Store()
            >>> store.write_bytes("memory://doc-exists/a", b"")
            >>> store.exists("memory://doc-exists/a"), store.exists("memory://doc-exists/b")
            (True, False)
        """
        try:
            self.info(url)
        except errors.ObjectNotFound:
            return False
        return True

    def list(self, prefix: str, *, suffix: str = "") -> list[str]:
        """Sorted URLs of every object under ``prefix`` (recursively) ending in ``suffix``.

        Example:
            >>> store = Store()
            >>> for name in ("b.tar", "a.tar", "notes.txt"):
            ...     store.write_bytes(f"memory://doc-list/{name}", b"")
            >>> store.list("memory://doc-list/", suffix=".tar")
            ['memory://doc-list/a.tar', 'memory://doc-list/b.tar']
        """
        return list(self.list_info(prefix, suffix=suffix))

    def list_info(self, prefix: str, *, suffix: str = "") -> dict[str, dict[str, Any]]:
        """``{url: info}`` (size, ETag, ...) of every object under ``prefix`` ending in ``suffix``, sorted.

        On S3, a prefix with several "subdirectories" (common prefixes) is listed one
        subdirectory per request stream, concurrently: listing pages are sequential
        within a prefix, so this divides the wall time by up to their number. From a
        path-style endpoint the pages go through the low-CPU path of :mod:`s3pipes._fastget`.

        Example:
            >>> store = Store()
            >>> store.write_bytes("memory://doc-list-info/b.tar", b"123")
            >>> store.write_bytes("memory://doc-list-info/a.tar", b"1")
            >>> {url: info["size"] for url, info in store.list_info("memory://doc-list-info/").items()}
            {'memory://doc-list-info/a.tar': 1, 'memory://doc-list-info/b.tar': 3}
        """
        fs, path = self.resolve(prefix)
        getter = self._fast_getter(prefix)
        with self.errors(prefix):
            if getter is not None:
                bucket, _, key = path.partition("/")
                found = getter.list_objects(bucket, key.rstrip("/") + "/" if key else "")
            elif self._protocol(prefix) in _S3_PROTOCOLS:
                found = self._find_s3(fs, path)
            else:
                found = fs.find(path, detail=True)
                if not found and not fs.exists(path):
                    fs.ls(path)  # raises for a missing root, so that case is never silent
                found = {
                    name: info for name, info in found.items() if not name.endswith(PART_SUFFIX)
                }  # writes in flight
        # Spell results like the prefix was spelled ("memory://x" not "memory:///x").
        root, base = path.rstrip("/"), prefix.rstrip("/")
        folders = _folders(found)
        return {
            base + name[len(root) :]: dict(info)
            for name, info in sorted(found.items())
            if name.endswith(suffix) and name.startswith(root) and name not in folders
        }

    @staticmethod
    def _find_s3(fs: fsspec.AbstractFileSystem, path: str) -> dict[str, Any]:
        try:
            top = fs.ls(path, detail=True, refresh=True)  # one delimited listing
        except FileNotFoundError:
            fs.info(path.split("/")[0])  # raises for a missing bucket; an empty prefix lists nothing
            return {}
        found = {entry["name"]: entry for entry in top if entry["type"] != "directory"}
        subdirectories = [entry["name"] for entry in top if entry["type"] == "directory"]
        if subdirectories:
            with ThreadPoolExecutor(min(16, len(subdirectories)), thread_name_prefix="s3pipes-list") as pool:
                for part in pool.map(lambda name: fs.find(name, detail=True), subdirectories):
                    found.update(part)
        return found

    def delete(self, url: str) -> None:
        """Delete one object.

        Example:
            >>> store = Store()
            >>> store.write_bytes("memory://doc-delete/a", b"x")
            >>> store.delete("memory://doc-delete/a")
            >>> store.exists("memory://doc-delete/a")
            False
        """
        fs, path = self.resolve(url)
        with self.errors(url):
            fs.rm_file(path)

    # -- pickling and repr ------------------------------------------------------------------

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_filesystems"], state["_inherited"], state["_lock"], state["_getter"] = {}, [], None, None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()
        self._pid = os.getpid()

    def __repr__(self) -> str:
        parts = []
        endpoint = self._s3.get("endpoint_url")
        if endpoint:
            parts.append(f"endpoint={_without_userinfo(str(endpoint))}")
        key = self._s3.get("key")
        if key:
            parts.append(f"key={str(key)[:4]}***")
        if self._s3.get("secret"):
            parts.append("secret=***")
        return f"Store(s3: {', '.join(parts) or 'default AWS chain'})"


_BODY_ATTEMPTS = 6


def _retrying(call: Callable[[], Any]) -> Any:
    """``call()``, again (up to 6 attempts in all) when the connection drops mid-answer.

    botocore retries a request until its headers arrive; s3fs reads the body afterwards,
    so a body cut short (a reset, a truncation) would otherwise end the read at once. The
    exception of the last attempt carries ``s3pipes_attempts`` for the error message.
    """
    for attempt in range(1, _BODY_ATTEMPTS + 1):
        try:
            return call()
        except Exception as exc:
            found = errors.classify(exc)
            dropped = found is not None and found[0] is errors.ConnectionDropped  # not a stall: botocore retried it
            if not dropped or attempt == _BODY_ATTEMPTS:
                if dropped:
                    exc.s3pipes_attempts = attempt  # type: ignore[attr-defined]  # read by errors.translate
                raise
            time.sleep(random.uniform(0, min(1.0, 0.05 * 2**attempt)))  # full jitter, capped
    raise AssertionError("unreachable")


def _parse_timestamp(value: Any) -> datetime.datetime:
    """botocore's timestamp parser, without dateutil on the two formats S3 sends.

    Listing 20k objects spent ~70% of its client CPU in dateutil parsing LastModified
    (benchmarks/mapstyle.py profile); ISO 8601 (XML bodies) and RFC 822 (headers)
    are parsed by the standard library here, anything else by botocore.
    """
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            if value[:4].isdigit():
                parsed = datetime.datetime.fromisoformat(value)
                return parsed if parsed.tzinfo else parsed.replace(tzinfo=datetime.timezone.utc)
            return email.utils.parsedate_to_datetime(value)
    from botocore.utils import parse_timestamp

    fallback: datetime.datetime = parse_timestamp(value)
    return fallback


def _folders(found: Mapping[str, Mapping[str, Any]]) -> set[str]:
    """The "folders" among listed names: zero-byte keys ending in "/" (the AWS console's "Create
    folder"), or that other keys are under (SeaweedFS lists such a key without its "/")."""
    empty = [name for name, info in found.items() if not info.get("size")]
    if not empty:
        return set()
    parents: set[str] = set()
    for name in found:
        cut = name.rfind("/")
        while cut > 0 and name[:cut] not in parents:  # up to a parent seen already: linear overall
            parents.add(name[:cut])
            cut = name.rfind("/", 0, cut)
    return {name for name in empty if name.endswith("/") or name in parents}


def _fast_session() -> Any:
    """An aiobotocore session whose response parser uses :func:`_parse_timestamp`, and whose
    PUTs and POSTs do not ask for ``100 Continue``.

    botocore adds ``Expect: 100-continue`` to every request with a file-like body (s3fs's
    single PUTs); aiohttp then waits for the interim reply with no timeout at all, so a
    store that stopped answering hung ``write_bytes`` (and a checkpoint's marker) forever,
    whatever the read timeout. Without the header the body goes at once and the read
    timeout covers the reply; the header only saves sending a body the server refuses.
    """
    from aiobotocore.session import AioSession
    from botocore.handlers import add_expect_header

    session = AioSession()
    session.get_component("response_parser_factory").set_parser_defaults(timestamp_parser=_parse_timestamp)
    session.unregister("before-call.s3", add_expect_header)
    return session


class StoreFile:
    """A file object whose errors (including those raised by close) go through the boundary.

    Opened for writing, it publishes the object on a clean ``close`` and discards it
    when the ``with`` block raises.
    """

    def __init__(self, handle: Any, store: Store, url: str, *, commit: bool) -> None:
        self._handle: IO[bytes] = handle
        self._store, self.url = store, url
        self._commit = commit
        self._done = False

    def read(self, size: int = -1) -> bytes:
        with self._store.errors(self.url):
            return self._handle.read(size)

    def readinto(self, buffer: Any) -> int:
        with self._store.errors(self.url):
            return int(cast(Any, self._handle).readinto(buffer))

    def write(self, data: bytes) -> int:
        with self._store.errors(self.url):
            return self._handle.write(data)

    def seek(self, offset: int, whence: int = 0) -> int:
        with self._store.errors(self.url):
            return self._handle.seek(offset, whence)

    def tell(self) -> int:
        return self._handle.tell()

    def flush(self) -> None:
        with self._store.errors(self.url):
            self._handle.flush()

    def close(self) -> None:
        """Close; for a write, publish the object. Idempotent."""
        if self._done:
            return
        self._done = True
        with self._store.errors(self.url):
            try:
                self._handle.close()
                if self._commit:
                    cast(Any, self._handle).commit()
            except BaseException:
                self._abandon()
                raise

    def discard(self) -> None:
        """Abandon a write: nothing becomes visible in the store. Idempotent, never raises."""
        if not self._done:
            self._done = True
            self._abandon()

    def _abandon(self) -> None:
        """Best effort: abort the upload, release the handle, stop it retrying when collected.

        Errors here are logged, not raised: this runs while another exception (the one
        that made the write fail) is on its way to the caller, and must not replace it.
        """
        try:
            if self._commit:
                cast(Any, self._handle).discard()
            else:
                self._handle.close()
        except Exception as exc:
            _log.warning("could not abort the write of %s: %s", self.url, self._store.redact(repr(exc)))
        inner = getattr(self._handle, "f", None)  # fsspec's LocalFileOpener.discard leaks its temp file's fd
        with contextlib.suppress(Exception):
            if inner is not None:
                inner.close()
        with contextlib.suppress(AttributeError):
            cast(Any, self._handle).closed = True

    def readline(self, size: int = -1) -> bytes:
        with self._store.errors(self.url):
            return bytes(self._handle.readline(size))

    def readlines(self, hint: int = -1) -> list[bytes]:
        with self._store.errors(self.url):
            return list(self._handle.readlines(hint))

    def __iter__(self) -> Iterator[bytes]:
        return iter(self.readline, b"")

    @property
    def name(self) -> str:
        return self.url

    @property
    def mode(self) -> str:
        return "wb" if self._commit else "rb"

    def isatty(self) -> bool:
        return False

    @property
    def closed(self) -> bool:
        return self._done or bool(self._handle.closed)

    def readable(self) -> bool:
        return bool(self._handle.readable())

    def writable(self) -> bool:
        return bool(self._handle.writable())

    def seekable(self) -> bool:
        return bool(self._handle.seekable())

    def __enter__(self) -> StoreFile:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is not None:
            self.discard()  # a failed write must not publish a partial object
        else:
            self.close()

    def __repr__(self) -> str:
        return f"<s3pipes file {self.url}>"


class _LocalUpload:
    """A write to a local path published only by ``commit``: a temporary file in the same
    directory, synced, then renamed over the path (atomic on POSIX).

    fsspec's own (``autocommit=False``) writes the temporary file in ``$TMPDIR`` and moves
    it on commit; from another file system (tmpfs ``/tmp``, a mounted volume) the move is a
    copy that truncates the old file first, so a process killed meanwhile left neither the
    old file nor the new one, and a checkpoint's whole size in ``$TMPDIR``.
    """

    def __init__(self, path: str) -> None:
        directory, name = os.path.split(path)
        os.makedirs(directory or ".", exist_ok=True)
        try:
            replaced: int | None = stat.S_IMODE(os.stat(path).st_mode)  # a file replaced keeps its mode
        except FileNotFoundError:
            replaced = None  # a new one gets what open() gives it: 0o666 less the umask
        self._temp = os.path.join(directory, f".{name}.{secrets.token_hex(4)}{PART_SUFFIX}")
        fd = os.open(self._temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        if replaced is not None:
            os.fchmod(fd, replaced)  # exactly the old file's (the umask applied to the open)
        self._path, self._file = path, os.fdopen(fd, "wb")

    @property
    def closed(self) -> bool:
        return self._file.closed

    def readable(self) -> bool:
        return False

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def write(self, data: bytes) -> int:
        return self._file.write(data)

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._file.seek(offset, whence)

    def tell(self) -> int:
        return self._file.tell()

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> None:
        if not self._file.closed:
            self._file.flush()
            os.fsync(self._file.fileno())  # the data is on disk before the name points at it
            self._file.close()

    def commit(self) -> None:
        os.replace(self._temp, self._path)

    def discard(self) -> None:
        self._file.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._temp)


class _MemoryUpload(io.BytesIO):
    """A write to memory:// that, like a real store's, is published only by ``commit``."""

    def __init__(self, fs: fsspec.AbstractFileSystem, path: str) -> None:
        super().__init__()
        self._fs, self._path, self._value = fs, path, b""

    def close(self) -> None:
        if not self.closed:
            self._value = self.getvalue()
        super().close()

    def commit(self) -> None:
        self._fs.pipe_file(self._path, self._value)

    def discard(self) -> None:
        self._value = b""
