"""A moto S3 server on 127.0.0.1 for tests of the object-storage path (imported by test modules;
``tests/`` is on ``sys.path`` through the root conftest)."""

from __future__ import annotations

import contextlib
import socket
from typing import Iterator

import pytest

BUCKET = "pacl"
ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
       "AWS_EC2_METADATA_DISABLED": "true"}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def moto_s3() -> Iterator[dict]:
    """Start a moto S3 server with bucket ``pacl``; yields the environment variables through which
    pyarrow (and so pacl_ray.formats.storage) reaches it. Skips the test when moto is missing."""
    pytest.importorskip("moto.server")
    boto3 = pytest.importorskip("boto3")
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    try:
        endpoint = f"http://127.0.0.1:{port}"
        boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="testing",
                     aws_secret_access_key="testing").create_bucket(Bucket=BUCKET)
        yield {**ENV, "AWS_ENDPOINT_URL": endpoint}
    finally:
        server.stop()


@pytest.fixture()
def mock_s3(monkeypatch) -> Iterator[str]:
    """moto S3 for one test, its variables set in this process; yields ``s3://pacl``."""
    with moto_s3() as env:
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        yield f"s3://{BUCKET}"
