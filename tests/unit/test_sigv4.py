"""The fast path's SigV4 signer gives botocore's signatures, header for header."""

from __future__ import annotations

import datetime

import pytest
from botocore import auth as botocore_auth
from botocore.auth import S3SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.config import Config
from botocore.credentials import Credentials

from s3pipes._sigv4 import Signer

NOW = datetime.datetime(2026, 11, 21, 23, 59, 58, tzinfo=datetime.timezone.utc)
SECRET = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY"

CASES = [
    ("GET", "http://127.0.0.1:8333/mnist/train/3/00042.png", {}),
    ("GET", "http://127.0.0.1:8333/b/shard-000.tar", {"Range": "bytes=1024-8389631", "If-Match": '"abc"'}),
    ("HEAD", "http://LOCALHOST:9000/b/a%20key/%C3%BC.json", {}),
    ("GET", "http://127.0.0.1:8333/b?list-type=2&prefix=train%2F&continuation-token=a%2Bb%3D", {}),
    ("POST", "http://127.0.0.1:8333/b/ckpt/state.pt?uploads", {}),
    ("PUT", "http://127.0.0.1:8333/b/ckpt/state.pt?uploadId=x%2Fy&partNumber=3", {}),
    ("GET", "http://minio.local:80/b/k", {"X-Custom": "  two   spaces  "}),
    ("GET", "https://s3.example.com:443/b/k", {}),
    ("GET", "http://[::1]:9000/b/k", {}),
]


def botocore_headers(method: str, url: str, headers: dict[str, str], token: str | None, region: str) -> dict[str, str]:
    request = AWSRequest(method=method, url=url, headers=dict(headers))
    if method in ("PUT", "POST"):
        request.context["client_config"] = Config(s3={"payload_signing_enabled": False})
    S3SigV4Auth(Credentials("AKIDEXAMPLE", SECRET, token), "s3", region).add_auth(request)
    return dict(request.headers.items())


@pytest.mark.parametrize("token", [None, "session/token+="])
@pytest.mark.parametrize(("method", "url", "headers"), CASES)
def test_signatures_equal_botocores(
    monkeypatch: pytest.MonkeyPatch, method: str, url: str, headers: dict[str, str], token: str | None
) -> None:
    monkeypatch.setattr(botocore_auth, "get_current_datetime", lambda: NOW.replace(tzinfo=None))
    expected = botocore_headers(method, url, headers, token, "eu-west-3")
    signer = Signer("AKIDEXAMPLE", SECRET, token, "eu-west-3")
    got = signer.sign(method, url, headers, unsigned_payload=method in ("PUT", "POST"), now=NOW)
    assert got == expected


def test_the_signing_key_follows_the_day() -> None:
    signer = Signer("AKIDEXAMPLE", SECRET, None, "us-east-1")
    url = "http://127.0.0.1:8333/b/k"
    today = signer.sign("GET", url, {}, now=NOW)["Authorization"]
    tomorrow = signer.sign("GET", url, {}, now=NOW + datetime.timedelta(seconds=3))["Authorization"]
    assert "20261121/us-east-1" in today and "20261122/us-east-1" in tomorrow
    assert Signer("AKIDEXAMPLE", SECRET, None, "us-east-1").sign("GET", url, {}, now=NOW)["Authorization"] == today


def test_the_secret_is_not_in_the_repr() -> None:
    assert SECRET not in repr(Signer("AKIDEXAMPLE", SECRET, "tok3n-value", "us-east-1"))
    assert "tok3n" not in repr(Signer("AKIDEXAMPLE", SECRET, "tok3n-value", "us-east-1"))
