"""Store: URL resolution, S3 settings order, the error boundary and process safety, on memory://."""

from __future__ import annotations

import io
import multiprocessing
import os
import pickle
import threading
from pathlib import Path

import pytest

import s3pipes
from s3pipes import MalformedEndpoint, ObjectNotFound, Store
from s3pipes.store import StoreFile

ENDPOINT = "http://127.0.0.1:9"


def s3(store: Store) -> dict[str, object]:
    options = store.resolved_options("s3://bucket/key")
    return {
        "endpoint": options.get("endpoint_url"),
        "key": options.get("key"),
        "secret": options.get("secret"),
        "region": options["client_kwargs"].get("region_name"),
        "config": options["config_kwargs"],
    }


def test_explicit_options_win_over_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://from-env:1")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "env-key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "env-secret")
    store = Store.from_env({"endpoint_url": ENDPOINT, "key": "mine", "secret": "my-secret"})
    got = s3(store)
    assert (got["key"], got["secret"]) == ("mine", "my-secret")
    assert store.endpoint("s3://b/k") == ENDPOINT


def test_s3_specific_endpoint_variable_wins_over_generic(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://generic:1")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://specific:2")
    assert Store.from_env().endpoint("s3://b/k") == "http://specific:2"
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3")
    assert Store.from_env().endpoint("s3://b/k") == "http://generic:1"


def test_credentials_and_region_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", ENDPOINT)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "env-key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "env-secret")
    got = s3(Store.from_env())
    assert (got["key"], got["secret"]) == ("env-key", "env-secret")
    assert got["region"] == "us-east-1", "a custom endpoint needs no AWS_REGION"
    monkeypatch.setenv("AWS_REGION", "eu-west-3")
    assert s3(Store.from_env())["region"] == "eu-west-3"


def test_ca_bundle_from_environment_or_env_file_unless_given(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A MinIO with its own CA: botocore and the fast path both check TLS with ``client_kwargs["verify"]``."""
    monkeypatch.delenv("AWS_CA_BUNDLE", raising=False)
    assert "verify" not in Store.from_env().resolved_options("s3://b/k")["client_kwargs"]
    monkeypatch.setenv("AWS_CA_BUNDLE", "/etc/minio/ca.pem")
    assert Store.from_env().resolved_options("s3://b/k")["client_kwargs"]["verify"] == "/etc/minio/ca.pem"
    given = Store.from_env({"client_kwargs": {"verify": False}})
    assert given.resolved_options("s3://b/k")["client_kwargs"]["verify"] is False
    monkeypatch.delenv("AWS_CA_BUNDLE")
    (tmp_path / ".env").write_text("AWS_CA_BUNDLE=/from/dotenv.pem\n")
    from_file = Store.from_env(env_file=tmp_path / ".env")
    assert from_file.resolved_options("s3://b/k")["client_kwargs"]["verify"] == "/from/dotenv.pem"


def test_custom_endpoint_uses_path_style_and_short_timeouts() -> None:
    config = s3(Store({"endpoint_url": ENDPOINT}, connect_timeout=1.5))["config"]
    assert isinstance(config, dict)
    assert config["s3"] == {"addressing_style": "path"}
    assert config["connect_timeout"] == 1.5


def test_aws_itself_keeps_virtual_hosted_addressing() -> None:
    config = s3(Store())["config"]
    assert isinstance(config, dict)
    assert "s3" not in config


def test_store_reads_no_environment_unless_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", ENDPOINT)
    assert Store().endpoint("s3://b/k") == "AWS S3"
    assert Store.from_env().endpoint("s3://b/k") == ENDPOINT


@pytest.mark.parametrize("endpoint", ["localhost:9000", "127.0.0.1:9000", "ftp://host:1", "http://"])
def test_malformed_endpoint_is_reported_with_its_source(monkeypatch: pytest.MonkeyPatch, endpoint: str) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    with pytest.raises(MalformedEndpoint, match="AWS_ENDPOINT_URL") as info:
        Store.from_env()
    assert isinstance(info.value, ValueError)
    assert endpoint in str(info.value)


def test_malformed_endpoint_suggests_the_scheme() -> None:
    with pytest.raises(MalformedEndpoint, match="did you mean 'http://localhost:9000'"):
        Store({"endpoint_url": "localhost:9000"})


def test_env_file_is_read_only_when_asked(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / ".env").write_text(f"AWS_ENDPOINT_URL={ENDPOINT}\nAWS_ACCESS_KEY_ID=file-key\n")
    monkeypatch.chdir(tmp_path)
    assert Store.from_env().endpoint("s3://b/k") == "AWS S3"
    store = Store.from_env(env_file=tmp_path / ".env")
    assert store.endpoint("s3://b/k") == ENDPOINT
    assert s3(store)["key"] == "file-key"


def test_a_missing_env_file_is_named_and_values_are_taken_literally(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    with pytest.raises(s3pipes.ConfigError, match=r"env_file '.*nope\.env': no such file"):
        Store.from_env(env_file=tmp_path / "nope.env")
    monkeypatch.setenv("HOME", "/root")
    (tmp_path / ".env").write_text("AWS_SECRET_ACCESS_KEY='SK$x${HOME}'\nAWS_ACCESS_KEY_ID=k$HOME\n")
    store = Store.from_env(env_file=tmp_path / ".env")
    assert (s3(store)["secret"], s3(store)["key"]) == ("SK$x${HOME}", "k$HOME"), "no ${VAR} expansion in a secret"


def test_an_env_file_may_be_a_pipe(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """`--env-file <(vault read ...)`: a FIFO is no regular file, and is fine."""
    monkeypatch.delenv("AWS_ACCESS_KEY_ID", raising=False)
    fifo = tmp_path / "creds.env"
    os.mkfifo(fifo)
    writer = threading.Thread(target=lambda: fifo.write_text("AWS_ACCESS_KEY_ID=from-a-pipe\n"))
    writer.start()
    store = Store.from_env(env_file=fifo)
    writer.join()
    assert s3(store)["key"] == "from-a-pipe"


def test_process_environment_wins_over_env_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("AWS_ENDPOINT_URL=http://from-file:1\n")
    monkeypatch.setenv("AWS_ENDPOINT_URL", ENDPOINT)
    assert Store.from_env(env_file=tmp_path / ".env").endpoint("s3://b/k") == ENDPOINT


def test_load_env_sets_variables_from_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / "creds.env").write_text(f"AWS_ENDPOINT_URL={ENDPOINT}\n")
    assert s3pipes.load_env(tmp_path / "creds.env") is True
    assert Store.from_env().endpoint("s3://b/k") == ENDPOINT
    monkeypatch.delenv("AWS_ENDPOINT_URL")  # load_env wrote os.environ; undo it for other tests


def test_pickled_store_carries_no_unrelated_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GITHUB_TOKEN", "ghp_unrelated_secret_value")
    monkeypatch.setenv("AWS_ENDPOINT_URL", ENDPOINT)
    assert b"ghp_unrelated_secret_value" not in pickle.dumps(Store.from_env())


def test_endpoint_credentials_are_never_shown() -> None:
    store = Store({"endpoint_url": "http://user:p4ssw0rd-in-url@127.0.0.1:9000", "key": "k", "secret": "s3cret-value"})
    assert "p4ssw0rd-in-url" not in repr(store)
    assert store.endpoint("s3://b/k") == "http://127.0.0.1:9000"
    assert store.redact("x p4ssw0rd-in-url s3cret-value y") == "x *** *** y"


def test_endpoint_credentials_are_the_store_credentials_and_never_sent_on(monkeypatch: pytest.MonkeyPatch) -> None:
    """botocore logged the endpoint whole at DEBUG, and aiohttp refused it next to a signature."""
    store = Store({"endpoint_url": "http://AKIDINURL:p4ss%2Fw0rd@127.0.0.1:9000"})
    assert (s3(store)["endpoint"], s3(store)["key"], s3(store)["secret"]) == (
        "http://127.0.0.1:9000",
        "AKIDINURL",
        "p4ss/w0rd",
    )
    assert store.redact("a p4ss/w0rd b p4ss%2Fw0rd") == "a *** b ***"
    given = Store({"endpoint_url": "http://user:ignored-pass@127.0.0.1:9000", "key": "k", "secret": "s3cret"})
    assert (s3(given)["key"], s3(given)["secret"]) == ("k", "s3cret"), "explicit credentials win"
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "env-key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "env-secret")
    explicit = Store.from_env({"endpoint_url": "http://AKIDINURL:p4ss@127.0.0.1:9000"})
    assert (s3(explicit)["key"], s3(explicit)["secret"]) == ("AKIDINURL", "p4ss"), "storage_options win over env"
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://AKIDINURL:p4ss@127.0.0.1:9000")
    assert s3(Store.from_env())["key"] == "env-key", "the environment's keys win over its own endpoint's"
    for endpoint in ("ftp://k:p4ssw0rd-in-url@host:9000", "k:p4ssw0rd-in-url@host:9000"):
        with pytest.raises(MalformedEndpoint) as info:
            Store({"endpoint_url": endpoint})
        assert "p4ssw0rd-in-url" not in str(info.value)


def test_repr_never_shows_the_secret() -> None:
    store = Store({"endpoint_url": ENDPOINT, "key": "AKIAEXAMPLEKEY", "secret": "very-secret-value"})
    assert "very-secret-value" not in repr(store)
    assert "AKIAEXAMPLEKEY" not in repr(store), "the key id is shortened too"
    assert "very-secret-value" not in store.redact("signature for very-secret-value failed")


def test_round_trip_list_and_sizes_on_memory(mem_root: str) -> None:
    store = Store()
    for name in ("b/2.tar", "a.tar", "b/1.tar", "notes.txt"):
        store.write_bytes(f"{mem_root}/{name}", name.encode())
    assert store.list(mem_root, suffix=".tar") == [f"{mem_root}/a.tar", f"{mem_root}/b/1.tar", f"{mem_root}/b/2.tar"]
    assert store.read_bytes(f"{mem_root}/b/1.tar") == b"b/1.tar"
    assert store.read_bytes(f"{mem_root}/b/1.tar", 2, 5) == b"1.t"
    assert store.info(f"{mem_root}/a.tar")["size"] == 5


def test_missing_object_names_url_and_is_a_file_not_found(mem_root: str) -> None:
    url = f"{mem_root}/missing.tar"
    with pytest.raises(ObjectNotFound) as info:
        Store().read_bytes(url)
    assert isinstance(info.value, FileNotFoundError)
    assert url in str(info.value) and "memory" in str(info.value)
    assert not Store().exists(url)


def test_failed_write_publishes_nothing_and_keeps_the_old_object(tmp_path: Path) -> None:
    # memory:// publishes on open, so the transactional write is shown on file://
    store = Store()
    url = f"file://{tmp_path}/dir/object.bin"
    with store.open(url, "wb") as f:
        f.write(b"first version")
    with pytest.raises(RuntimeError, match="boom"), store.open(url, "wb") as f:
        f.write(b"half of the second")
        raise RuntimeError("boom")
    assert store.read_bytes(url) == b"first version"
    assert [p.name for p in (tmp_path / "dir").iterdir()] == ["object.bin"], "no temp file left"


def test_a_local_write_is_renamed_over_its_target_not_copied_from_tmpdir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A copy from $TMPDIR on another file system truncates the old file first: a process killed
    then lost both versions. The write goes to a file beside the target, renamed on close."""
    tmpdir = tmp_path / "tmpdir"
    tmpdir.mkdir()
    monkeypatch.setattr("tempfile.tempdir", str(tmpdir))
    store, url, target = Store(), f"file://{tmp_path}/run/model.pt", tmp_path / "run" / "model.pt"
    store.write_bytes(url, b"version 1")
    with store.open(url, "wb") as f:
        f.write(b"version 2, in flight")
        f.flush()
        (part,) = (p for p in target.parent.iterdir() if p.name != "model.pt")
        assert part.name.startswith(".model.pt.") and part.name.endswith(".s3pipes-part")
        assert target.read_bytes() == b"version 1" and not list(tmpdir.iterdir())
        assert store.list(f"file://{tmp_path}/run/") == [url], "a write in flight is not listed"
        inode = part.stat().st_ino
    assert target.read_bytes() == b"version 2, in flight"
    assert target.stat().st_ino == inode, "published by a rename"
    assert [p.name for p in target.parent.iterdir()] == ["model.pt"]


def test_a_local_write_has_the_mode_open_would_give_and_the_file_api(
    tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """The temporary file beside the target was created 0600 (mkstemp), and kept that mode."""
    store, umask = Store(), 0o022
    previous = os.umask(umask)  # the usual one, whatever this process runs with
    request.addfinalizer(lambda: os.umask(previous))
    store.write_bytes(f"file://{tmp_path}/new.bin", b"x")
    assert (tmp_path / "new.bin").stat().st_mode & 0o777 == 0o666 & ~umask
    for mode in (0o640, 0o666):  # 0o666: what a new file asks for, before the umask
        (tmp_path / "shared.bin").write_bytes(b"old")
        (tmp_path / "shared.bin").chmod(mode)
        inode = (tmp_path / "shared.bin").stat().st_ino
        store.write_bytes(f"file://{tmp_path}/shared.bin", b"new")
        assert (tmp_path / "shared.bin").stat().st_mode & 0o777 == mode, "a file replaced keeps its mode"
        assert (tmp_path / "shared.bin").stat().st_ino != inode, "replaced whole (renamed over), not rewritten"
        with store.open(f"file://{tmp_path}/shared.bin", "wb") as f:
            f.write(b"newer")
        assert (tmp_path / "shared.bin").stat().st_mode & 0o777 == mode
    with store.open(f"file://{tmp_path}/text.txt", "wb") as f, io.TextIOWrapper(f, encoding="utf-8") as text:
        assert f.writable() and f.seekable() and not f.readable() and not f.closed
        text.write("written through a text wrapper")
    assert (tmp_path / "text.txt").read_text() == "written through a text wrapper"


def test_write_bytes_takes_bytes(mem_root: str) -> None:
    with pytest.raises(TypeError, match=r"takes bytes, not str"):
        Store().write_bytes(f"{mem_root}/a.txt", "text")  # type: ignore[arg-type]


def test_unknown_protocol_is_a_clear_error() -> None:
    with pytest.raises(s3pipes.InvalidURL, match="nosuchproto"):
        Store().filesystem("nosuchproto://x/y")


def test_pickled_store_rebuilds_its_filesystems(mem_root: str) -> None:
    store = Store({"endpoint_url": ENDPOINT, "key": "k", "secret": "s"})
    store.write_bytes(f"{mem_root}/x", b"1")
    clone = pickle.loads(pickle.dumps(store))
    assert clone.filesystem(mem_root) is not store.filesystem(mem_root)
    assert clone.read_bytes(f"{mem_root}/x") == b"1"


def _child_builds_its_own(store: Store, url: str, queue: multiprocessing.Queue[object]) -> None:
    inherited = store._filesystems.get("memory")
    queue.put(store.filesystem(url) is not inherited and inherited is not None)


def test_forked_process_builds_its_own_filesystem(mem_root: str) -> None:
    store = Store()
    store.filesystem(mem_root)
    context = multiprocessing.get_context("fork")
    queue: multiprocessing.Queue[object] = context.Queue()
    child = context.Process(target=_child_builds_its_own, args=(store, mem_root, queue))
    child.start()
    child.join(30)
    assert queue.get(timeout=5) is True


@pytest.mark.parametrize("mode", ["ab", "xb", "r+b", "w", "r"])
def test_only_whole_object_modes_are_accepted(mem_root: str, mode: str) -> None:
    with pytest.raises(ValueError, match="'rb' to read or 'wb' to replace"):
        Store().open(f"{mem_root}/x", mode)


def test_memory_writes_publish_on_close_and_readers_are_independent(mem_root: str) -> None:
    store = Store()
    url = f"{mem_root}/obj"
    store.write_bytes(url, b"old")
    with pytest.raises(RuntimeError), store.open(url, "wb") as f:
        f.write(b"partial")
        raise RuntimeError("fail")
    assert store.read_bytes(url) == b"old"
    store.write_bytes(url, b"0123456789")
    with store.open(url) as a, store.open(url) as b:
        assert (a.read(4), b.read(4)) == (b"0123", b"0123")


def test_store_file_supports_line_reading_and_pickle(tmp_path: Path) -> None:
    store = Store()
    url = f"file://{tmp_path}/lines.pkl"
    with store.open(url, "wb") as f:
        pickle.dump({"a": 1}, f)
    with store.open(url) as f:
        assert pickle.load(f) == {"a": 1}
        assert f.name == url
    store.write_bytes(url, b"one\ntwo\n")
    with store.open(url) as f:
        assert list(f) == [b"one\n", b"two\n"]


def test_a_failing_cleanup_never_hides_the_callers_error(caplog: pytest.LogCaptureFixture) -> None:
    class UploadThatCannotAbort(io.BytesIO):
        def commit(self) -> None:
            raise AssertionError("a failed write must not be committed")

        def discard(self) -> None:
            raise ConnectionError("the store went away mid-upload")

    upload = StoreFile(UploadThatCannotAbort(), Store(), "memory://b/out.bin", commit=True)
    with pytest.raises(KeyError, match="the real cause"), upload as f:
        f.write(b"data")
        raise KeyError("the real cause")
    assert "could not abort the write of memory://b/out.bin" in caplog.text


class _Untouchable:
    """Fails the test if anything is asked of it."""

    closed = False

    def __getattr__(self, name: str) -> object:
        raise AssertionError(f"{name} used")


def test_a_session_finalizer_does_nothing_in_another_process() -> None:
    """In a forked child the parent's loop looks running but no thread runs it: waiting on it stalled 2 s."""
    from s3pipes._fastget import _close

    _close(_Untouchable(), _Untouchable(), os.getpid() + 1)  # type: ignore[arg-type]
