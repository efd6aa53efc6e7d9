"""Shared fixtures: one real local Ray session for the whole test run, small real corpora."""

from __future__ import annotations

import logging
import os
import socket

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")


@pytest.fixture(scope="session")
def ray_session():
    """A real local Ray (2 CPUs, like CI), shared by every integration test."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def sample_corpus(tmp_path_factory):
    """The embedded default corpus (stdlib docstrings) as a real parquet file."""
    from rnb_ray.sample import write_sample_corpus

    return write_sample_corpus(tmp_path_factory.mktemp("sample") / "sample.parquet")


@pytest.fixture(scope="module")
def local_s3(request):
    """A real local S3 server (moto), the AWS variables pointing at it, and the bucket named by the test
    module's ``BUCKET``; yields a pyarrow S3FileSystem on it. Request ``ray_session`` first where Ray
    workers must not inherit the variables."""
    import pyarrow.fs as pafs
    from moto.server import ThreadedMotoServer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one log line per request otherwise
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        fs = pafs.S3FileSystem(endpoint_override=f"127.0.0.1:{port}", scheme="http", access_key="testing",
                               secret_key="testing", region="us-east-1", allow_bucket_creation=True)
        fs.create_dir(request.module.BUCKET)
        yield fs
    server.stop()
