"""The exception tree and the one translation table: complete, builtin-compatible, secret-free."""

from __future__ import annotations

import importlib
import inspect
import pickle
import socket

import pytest
from botocore.exceptions import (
    ClientError,
    ConnectionClosedError,
    ConnectTimeoutError,
    EndpointConnectionError,
    NoCredentialsError,
    ReadTimeoutError,
)

import s3pipes
from s3pipes import errors

BUILTINS = (FileNotFoundError, PermissionError, ConnectionError, ValueError, OSError, RuntimeError)
# Raised by s3pipes' own checks, not translated from a backend.
RAISED_DIRECTLY = {
    errors.MalformedEndpoint,
    errors.ServerError,
    errors.StoreRequestError,
    errors.CorruptShard,
    errors.DuplicateField,
    errors.DecodeError,
    errors.StaleIndex,
    errors.SourceError,
    errors.CheckpointNotFound,
    errors.CorruptCheckpoint,
    errors.WeightsOnlyRefused,
}


def all_errors() -> list[type[errors.S3PipesError]]:
    return [c for _, c in inspect.getmembers(errors, inspect.isclass) if issubclass(c, errors.S3PipesError)]


def leaves() -> list[type[errors.S3PipesError]]:
    classes = all_errors()
    return [c for c in classes if not any(o is not c and issubclass(o, c) for o in classes)]


def test_every_leaf_inherits_a_builtin() -> None:
    for cls in leaves():
        assert issubclass(cls, BUILTINS), cls


def test_tree_in_docstring_names_every_class() -> None:
    assert errors.__doc__ is not None
    for cls in all_errors():
        assert cls.__name__ in errors.__doc__, cls


def test_mapping_is_complete() -> None:
    targets = set(errors._CODE_TO_ERROR.values()) | {cls for _, cls in errors._EXCEPTION_TO_ERROR}
    unreachable = {cls for cls in leaves() if cls not in targets} - RAISED_DIRECTLY
    assert not unreachable, f"leaves no backend error maps to: {unreachable}"


def test_mapped_exception_names_are_real_classes() -> None:
    for qualified, _ in errors._EXCEPTION_TO_ERROR:
        module, _, name = qualified.rpartition(".")
        assert inspect.isclass(getattr(importlib.import_module(module), name)), qualified


def client_error(code: str, status: int, message: str = "msg") -> ClientError:
    return ClientError(
        {"Error": {"Code": code, "Message": message}, "ResponseMetadata": {"HTTPStatusCode": status}}, "GetObject"
    )


@pytest.mark.parametrize(
    ("exc", "expected", "builtin"),
    [
        (client_error("NoSuchBucket", 404), errors.BucketNotFound, FileNotFoundError),
        (client_error("NoSuchKey", 404), errors.ObjectNotFound, FileNotFoundError),
        (client_error("InvalidAccessKeyId", 403), errors.UnknownAccessKey, PermissionError),
        (client_error("SignatureDoesNotMatch", 403), errors.SignatureMismatch, PermissionError),
        (client_error("ExpiredToken", 400), errors.ExpiredCredentials, PermissionError),
        (client_error("AccessDenied", 403), errors.AccessDenied, PermissionError),
        (
            client_error("AuthorizationHeaderMalformed", 400, "the region 'us-east-1' is wrong; expecting 'eu-west-1'"),
            errors.WrongRegion,
            ValueError,
        ),
        (client_error("PermanentRedirect", 301), errors.WrongRegion, ValueError),
        (client_error("InvalidBucketName", 400), errors.InvalidURL, ValueError),
        (NoCredentialsError(), errors.CredentialsMissing, PermissionError),
        (EndpointConnectionError(endpoint_url="http://x"), errors.EndpointUnreachable, ConnectionError),
        (ConnectTimeoutError(endpoint_url="http://x"), errors.EndpointUnreachable, ConnectionError),
        (ReadTimeoutError(endpoint_url="http://x"), errors.StoreTimeout, ConnectionError),
        (ConnectionClosedError(endpoint_url="http://x"), errors.ConnectionDropped, ConnectionError),
        (FileNotFoundError("b/k"), errors.ObjectNotFound, FileNotFoundError),
    ],
)
def test_translation(exc: BaseException, expected: type, builtin: type) -> None:
    url = "s3://bucket/key.tar"
    err = errors.translate(exc, url=url, endpoint="http://127.0.0.1:9000")
    assert type(err) is expected
    assert isinstance(err, builtin)
    assert url in str(err) and "http://127.0.0.1:9000" in str(err)


def test_wrong_region_quotes_the_expected_region() -> None:
    exc = client_error("AuthorizationHeaderMalformed", 400, "the region 'us-east-1' is wrong; expecting 'eu-west-1'")
    assert "eu-west-1" in str(errors.translate(exc, url="s3://b/k", endpoint="AWS S3"))


def test_s3fs_style_wrapping_is_seen_through() -> None:
    wrapped = PermissionError("Forbidden")
    wrapped.__cause__ = client_error("SignatureDoesNotMatch", 403)
    assert type(errors.translate(wrapped, url="s3://b/k", endpoint="e")) is errors.SignatureMismatch


def test_dns_failure_says_so() -> None:
    exc = EndpointConnectionError(endpoint_url="http://no-such-host.invalid:9000")
    exc.__context__ = socket.gaierror(-2, "Name or service not known")
    err = errors.translate(exc, url="s3://b/k", endpoint="http://no-such-host.invalid:9000")
    assert isinstance(err, errors.EndpointUnreachable)
    assert "DNS" in str(err)


def test_ambiguous_head_answer_is_refined_by_the_probe() -> None:
    head_403 = PermissionError("Forbidden")
    head_403.__cause__ = client_error("403", 403, "Forbidden")
    err = errors.translate(
        head_403, url="s3://b/k", endpoint="e", probe=lambda: client_error("InvalidAccessKeyId", 403)
    )
    assert type(err) is errors.UnknownAccessKey


def test_probe_that_succeeds_keeps_the_first_answer() -> None:
    err = errors.translate(FileNotFoundError("b/k"), url="s3://b/k", endpoint="e", probe=lambda: None)
    assert type(err) is errors.ObjectNotFound


def test_unknown_errors_keep_the_backends_words_redacted() -> None:
    err = errors.translate(
        RuntimeError("weird failure with hunter22 inside"),
        url="s3://b/k",
        endpoint="e",
        redact=lambda text: text.replace("hunter22", "***"),
    )
    assert type(err) is errors.StoreRequestError and isinstance(err, OSError)
    assert "weird failure" in str(err) and "hunter22" not in str(err)


def test_errors_survive_pickling_from_workers() -> None:
    err = errors.BucketNotFound("s3://b/k", "http://e", "bucket does not exist")
    clone = pickle.loads(pickle.dumps(err))
    assert type(clone) is errors.BucketNotFound and str(clone) == str(err) and clone.url == "s3://b/k"


def test_a_stage_named_once_leads_the_message_and_survives_pickling() -> None:
    err = errors.StoreTimeout("s3://b/shard.tar", "http://e", "read timed out after 2 s")
    err.in_stage("open_object")
    err.in_stage("untar")  # the first stage to name itself is the one that made the request
    clone = pickle.loads(pickle.dumps(err))
    assert str(clone).startswith("stage open_object: s3://b/shard.tar (endpoint http://e): read timed out")
    assert clone.stage == "open_object" and str(clone) == str(err)


def test_messages_give_a_fix() -> None:
    err = errors.CredentialsMissing("s3://b/k", "e", "no credentials found")
    assert "AWS_ACCESS_KEY_ID" in str(err)


def test_public_surface_exports_the_tree() -> None:
    for cls in all_errors():
        assert getattr(s3pipes, cls.__name__) is cls


def test_bare_status_without_a_match_is_probed() -> None:
    head_400 = OSError("Bad Request")
    head_400.__cause__ = client_error("400", 400, "Bad Request")
    err = errors.translate(head_400, url="s3://b/k", endpoint="e", probe=lambda: client_error("ExpiredToken", 400))
    assert type(err) is errors.ExpiredCredentials
