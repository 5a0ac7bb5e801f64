"""S3 writes through network faults, and `rayq plan` against a fresh run at the same threshold.

The faults come from `FaultyLink`, a TCP relay on 127.0.0.1 between rayq's S3 clients and the
S3 server (moto's, unless RAYQ_TEST_S3_ENDPOINT names another). It resets connections the way a lost network or a proxy with a transfer limit does,
so boto3 and pyarrow see the same errors they would see from AWS. The tests inspect the bucket
directly on the S3 server, past the relay.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import struct
import threading
import time
import uuid
from urllib.parse import urlparse

import boto3
import pyarrow.parquet as pq
import pytest
import safetensors.torch
import torch
from botocore.exceptions import (
    ClientError,
    ConnectionClosedError,
    EndpointConnectionError,
)
from conftest import run_cli
from torch import nn

import rayq
from rayq.cli.main import main
from rayq.errors import StorageError
from rayq.storage import retry
from rayq.storage.retry import RetryPolicy, StorageWriteFailed, next_delay_s
from rayq.storage.run import MANIFEST, load_run_model, open_run, run_files, write_run

MIB = 1024 * 1024
MODEL_FILE = "model/model.safetensors"
ACCESS_KEY = "AKIARAYQFAULTTEST001"
SECRET_KEY = "rayq-fault-test-secret-that-must-not-be-logged"


def reset(sock: socket.socket) -> None:
    """Close with a TCP reset, as a dropped link or a crashed peer does."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
    except OSError:
        pass


class FaultyLink:
    """A TCP relay to the S3 server that fails on request.

    `go_down_after(n)` forwards n more request bytes, then resets every connection and every
    new one until `heal()`, like an outage that starts partway through an upload. `cap_connections(n)`
    resets any connection once it has carried n request bytes, as a proxy with a transfer
    limit does, so small requests pass and large uploads never do.
    """

    def __init__(self, upstream_host: str, upstream_port: int):
        self.upstream = (upstream_host, upstream_port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.lock = threading.Lock()
        self.down = False
        self.budget: int | None = None
        self.cap: int | None = None
        self.open_sockets: set[socket.socket] = set()
        threading.Thread(target=self._accept, daemon=True).start()

    def go_down_after(self, request_bytes: int) -> None:
        with self.lock:
            self.budget = request_bytes

    def cap_connections(self, request_bytes: int | None) -> None:
        with self.lock:
            self.cap = request_bytes

    def go_down(self) -> None:
        with self.lock:
            self._go_down()

    def heal(self) -> None:
        with self.lock:
            self.down = False
            self.budget = None

    def close(self) -> None:
        self.listener.close()
        self.go_down()

    def _go_down(self) -> None:
        self.down = True
        for sock in self.open_sockets:
            reset(sock)
        self.open_sockets.clear()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            with self.lock:
                if self.down:
                    reset(client)
                    continue
                server = socket.create_connection(self.upstream)
                self.open_sockets |= {client, server}
            threading.Thread(target=self._relay, args=(client, server, True), daemon=True).start()
            threading.Thread(target=self._relay, args=(server, client, False), daemon=True).start()

    def _relay(self, source: socket.socket, sink: socket.socket, is_request: bool) -> None:
        carried = 0
        try:
            while data := source.recv(64 * 1024):
                if is_request:
                    carried += len(data)
                    if self._cut(len(data), carried, source, sink):
                        return
                sink.sendall(data)
            sink.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the other direction, or go_down, reset the connection

    def _cut(self, size: int, carried: int, source: socket.socket, sink: socket.socket) -> bool:
        with self.lock:
            if self.budget is not None:
                self.budget -= size
                if self.budget < 0:
                    self._go_down()
            if self.down or (self.cap is not None and carried > self.cap):
                reset(source)
                reset(sink)
                return True
        return False


class HealOnRetry(logging.Handler):
    """Ends the outage when rayq logs its first retry, so the next attempt finds the store."""

    def __init__(self, link: FaultyLink):
        super().__init__(logging.WARNING)
        self.link = link

    def emit(self, record: logging.LogRecord) -> None:
        self.link.heal()


class OutageOnLog(logging.Handler):
    """Takes the link down when rayq logs a message that starts with `prefix`."""

    def __init__(self, link: FaultyLink, prefix: str):
        super().__init__(logging.DEBUG)
        self.link = link
        self.prefix = prefix

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage().startswith(self.prefix):
            self.link.go_down()


@pytest.fixture
def link(s3_server, monkeypatch):
    """Route rayq's S3 traffic through a FaultyLink."""
    if not os.environ.get("RAYQ_TEST_S3_ENDPOINT"):
        # moto takes any keys, so these can be searched for in the log.
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
    endpoint = urlparse(s3_server)
    relay = FaultyLink(endpoint.hostname, endpoint.port)
    monkeypatch.setenv("AWS_ENDPOINT_URL", relay.url)
    yield relay
    relay.close()


def credentials() -> list[str]:
    return [os.environ["AWS_ACCESS_KEY_ID"], os.environ["AWS_SECRET_ACCESS_KEY"]]


@pytest.fixture
def fast_retries(monkeypatch):
    monkeypatch.setattr(retry, "UPLOAD_RETRY", RetryPolicy(attempts=3, first_delay_s=0.05,
                                                           max_delay_s=0.1))
    return retry.UPLOAD_RETRY


@pytest.fixture
def bucket_client(s3_server):
    """A boto3 client on the S3 server itself, past the relay."""
    return boto3.client("s3", endpoint_url=s3_server)


@pytest.fixture
def bucket(bucket_client):
    name = f"rayq-faults-{uuid.uuid4().hex[:12]}"
    bucket_client.create_bucket(Bucket=name)
    return name


@pytest.fixture
def rayq_log(caplog):
    caplog.set_level(logging.DEBUG, logger="rayq.storage")
    return caplog


def attach(handler: logging.Handler, logger_name: str):
    logger = logging.getLogger(logger_name)
    logger.addHandler(handler)
    return lambda: logger.removeHandler(handler)


@pytest.fixture(scope="module")
def large_float_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(1024, 2048), nn.ReLU(), nn.Linear(2048, 1024)).eval()


@pytest.fixture(scope="module")
def large_batches():
    generator = torch.Generator().manual_seed(1)
    return [torch.randn(4, 1024, generator=generator) for _ in range(10)]


@pytest.fixture(scope="module")
def large_result(large_float_model, large_batches):
    """Both layers stay float at threshold 0: a 16 MiB model file, uploaded in 8 MiB parts."""
    result = rayq.compress(large_float_model, large_batches, threshold=0.0, schemes=["int8"],
                           clip_search=False)
    assert {r["scheme"] for r in result.plan.to_pylist()} == {"float"}
    return result


def config_for(uri: str) -> dict:
    return {"model": "in memory", "output": uri, "threshold": 0.0}


def open_uploads(client, bucket: str) -> list[dict]:
    return client.list_multipart_uploads(Bucket=bucket).get("Uploads", [])


def stored_keys(client, bucket: str, prefix: str) -> set[str]:
    listed = client.list_objects_v2(Bucket=bucket, Prefix=prefix + "/").get("Contents", [])
    return {item["Key"].removeprefix(prefix + "/") for item in listed}


def retry_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "rayq.storage.retry" and r.levelno == logging.WARNING]


def assert_reads_back(uri: str, result, float_model, batches) -> None:
    run = open_run(uri)
    run.verify()
    for name in ("sensitivity", "plan", "thresholds"):
        assert run.table(name).equals(getattr(result, name)), name
    loaded = load_run_model(run, float_model)
    with torch.no_grad():
        for batch in batches:
            assert torch.equal(loaded(batch), result.model(batch))


# Retry decisions, without a store.

def test_retry_policy_delays_and_gives_up():
    policy = RetryPolicy(attempts=5, first_delay_s=2.0, max_delay_s=10.0)
    lost = ConnectionClosedError(endpoint_url="http://127.0.0.1:1/bucket/key")
    assert [next_delay_s(lost, attempt, policy) for attempt in range(1, 6)] == \
        [2.0, 4.0, 8.0, 10.0, None]
    unreachable = EndpointConnectionError(endpoint_url="http://127.0.0.1:1")
    assert next_delay_s(unreachable, 1, policy) == 2.0


@pytest.mark.parametrize("code, status, transient", [
    ("SlowDown", 503, True), ("InternalError", 500, True), ("RequestTimeout", 400, True),
    ("AccessDenied", 403, False), ("NoSuchBucket", 404, False),
])
def test_retry_policy_by_error_code(code, status, transient):
    error = ClientError({"Error": {"Code": code, "Message": "from the store"},
                         "ResponseMetadata": {"HTTPStatusCode": status}}, "PutObject")
    expected = 2.0 if transient else None
    assert next_delay_s(error, 1, RetryPolicy()) == expected


# Faults during an upload.

def assert_retried_once(caplog, uri: str, path: str) -> None:
    warnings = retry_warnings(caplog)
    assert len(warnings) == 1, warnings
    assert f"upload of {uri}/{path} failed on attempt 1 of 3" in warnings[0]
    for secret in credentials():
        assert secret not in caplog.text


def test_outage_inside_large_file_is_retried(link, fast_retries, bucket_client, bucket,
                                             large_result, large_float_model, large_batches,
                                             rayq_log):
    uri = f"s3://{bucket}/run"
    # 4 MiB into the first 8 MiB part of the model file.
    link.go_down_after(4 * MIB)
    detach = attach(HealOnRetry(link), "rayq.storage.retry")
    try:
        write_run(large_result, uri, config=config_for(uri))
    finally:
        detach()

    assert_retried_once(rayq_log, uri, MODEL_FILE)
    # boto3 could not abort the upload of the failed attempt while the link was down.
    assert f"aborted the unfinished multipart upload of s3://{bucket}/run/{MODEL_FILE}" in \
        rayq_log.text
    assert open_uploads(bucket_client, bucket) == []
    assert_reads_back(uri, large_result, large_float_model, large_batches)


def test_outage_between_files_is_retried(link, fast_retries, bucket_client, bucket,
                                         large_result, large_float_model, large_batches,
                                         rayq_log):
    uri = f"s3://{bucket}/run"
    paths = list(run_files(large_result, None))
    assert paths[:2] == [MODEL_FILE, "model/quant_config.json"]
    detaches = [attach(OutageOnLog(link, f"uploaded {uri}/{MODEL_FILE}"), "rayq.storage.s3_write"),
                attach(HealOnRetry(link), "rayq.storage.retry")]
    try:
        write_run(large_result, uri, config=config_for(uri))
    finally:
        for detach in detaches:
            detach()

    assert_retried_once(rayq_log, uri, "model/quant_config.json")
    assert open_uploads(bucket_client, bucket) == []
    assert_reads_back(uri, large_result, large_float_model, large_batches)


def test_failed_upload_leaves_no_manifest(link, fast_retries, bucket_client, bucket,
                                          large_result, large_float_model, large_batches,
                                          rayq_log):
    uri = f"s3://{bucket}/run"
    write_run(large_result, uri, config=config_for(uri))
    assert MANIFEST in stored_keys(bucket_client, bucket, "run")

    # Replacing the finished run: every 8 MiB part is cut off, the small files go through.
    link.cap_connections(2 * MIB)
    with pytest.raises(StorageError) as excinfo:
        write_run(large_result, uri, config=config_for(uri), overwrite=True)
    error = excinfo.value
    assert isinstance(error, StorageWriteFailed)
    assert error.exit_code == 1
    assert f"upload of {uri}/{MODEL_FILE} failed after 3 attempts" in str(error)
    assert "not committed" in str(error)

    warnings = retry_warnings(rayq_log)
    assert [("attempt 1 of 3" in w, "attempt 2 of 3" in w) for w in warnings] == \
        [(True, False), (False, True)]
    for secret in credentials():
        assert secret not in rayq_log.text + str(error)
    assert MANIFEST not in stored_keys(bucket_client, bucket, "run")
    assert open_uploads(bucket_client, bucket) == []
    with pytest.raises(StorageError) as incomplete:
        open_run(uri)
    assert "incomplete run" in str(incomplete.value)

    # The same write, once the link carries large requests again.
    link.cap_connections(None)
    write_run(large_result, uri, config=config_for(uri), overwrite=True)
    assert open_uploads(bucket_client, bucket) == []
    assert_reads_back(uri, large_result, large_float_model, large_batches)


def test_missing_bucket_rejected_before_upload(link, large_result, rayq_log):
    uri = "s3://rayq-no-such-bucket/run"
    with pytest.raises(StorageError) as excinfo:
        write_run(large_result, uri, config=config_for(uri))
    assert excinfo.value.exit_code == 2
    assert "bucket 'rayq-no-such-bucket'" in str(excinfo.value)
    assert "not found" in str(excinfo.value)
    assert retry_warnings(rayq_log) == []


def test_local_path_through_file_exits_2(large_result, tmp_path):
    (tmp_path / "a-file").write_text("not a folder")
    output = tmp_path / "a-file" / "run"
    with pytest.raises(StorageError) as excinfo:
        write_run(large_result, str(output), config=config_for(str(output)))
    assert excinfo.value.exit_code == 2
    assert f"cannot write the run to {output}" in str(excinfo.value)
    assert (tmp_path / "a-file").read_text() == "not a folder"


# `rayq plan` against a fresh run, through the CLI.

FACTORY_MODULE = "rayq_fault_test_model"
FACTORY = f"python:{FACTORY_MODULE}:make"
FACTORY_SOURCE = '''
import torch
from torch import nn


def make():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(4, 16, 3), nn.BatchNorm1d(16), nn.ReLU(), nn.Flatten(),
                          nn.Linear(16 * 30, 64), nn.ReLU(), nn.Linear(64, 8))
    with torch.no_grad():
        model[1].running_mean.uniform_(-0.5, 0.5)
        model[1].running_var.uniform_(0.5, 2.0)
    return model.eval()
'''
# At 0.003 the plan mixes int4 and w8a8, so the stored activation ranges are used too.
ORIGINAL_THRESHOLD = "1.0"
NEW_THRESHOLD = "0.003"


@pytest.fixture(scope="module")
def factory_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("plan")
    (folder / f"{FACTORY_MODULE}.py").write_text(FACTORY_SOURCE)
    generator = torch.Generator().manual_seed(0)
    safetensors.torch.save_file({"x": torch.randn(40, 4, 32, generator=generator)},
                                str(folder / "calibration.safetensors"))
    return folder


def compress_cli(folder, threshold: str, output) -> tuple[float, object]:
    """Run `rayq compress` as a subprocess on a new local Ray instance; return (seconds, process)."""
    started = time.perf_counter()
    process = run_cli("compress", "--model", FACTORY, "--calibration",
                      str(folder / "calibration.safetensors"), "--batch-size", "4",
                      "--schemes", "int4,int8,w8a8", "--threshold", threshold, "--workers", "1",
                      "--output", str(output), env=pythonpath(folder), timeout=300)
    return time.perf_counter() - started, process


def pythonpath(folder) -> dict:
    paths = [str(folder), os.environ.get("PYTHONPATH", "")]
    return {"PYTHONPATH": os.pathsep.join(p for p in paths if p)}


@pytest.fixture(scope="module")
def original_run(factory_folder):
    output = factory_folder / "original"
    _, process = compress_cli(factory_folder, ORIGINAL_THRESHOLD, output)
    assert process.returncode == 0, process.stderr
    return output


def sha256_of(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_plan_matches_fresh_run(factory_folder, original_run):
    fresh = factory_folder / "fresh"
    fresh_s, process = compress_cli(factory_folder, NEW_THRESHOLD, fresh)
    assert process.returncode == 0, process.stderr

    replanned = factory_folder / "replanned"
    started = time.perf_counter()
    process = run_cli("plan", str(original_run), "--threshold", NEW_THRESHOLD, "--output",
                      str(replanned), "--trust-code", env=pythonpath(factory_folder), timeout=300)
    plan_s = time.perf_counter() - started
    assert process.returncode == 0, process.stderr
    print(f"fresh compress {fresh_s:.1f} s, rayq plan {plan_s:.1f} s (both subprocesses), "
          f"ratio {plan_s / fresh_s:.2f}")

    new_plan = pq.read_table(replanned / "plan.parquet")
    fresh_plan = pq.read_table(fresh / "plan.parquet")
    assert new_plan.to_pylist() == fresh_plan.to_pylist()
    assert {r["scheme"] for r in new_plan.to_pylist()} == {"int4", "w8a8"}
    assert sha256_of(replanned / MODEL_FILE) == sha256_of(fresh / MODEL_FILE)
    manifest = json.loads((replanned / MANIFEST).read_text())
    assert manifest["files"][MODEL_FILE]["sha256"] == sha256_of(fresh / MODEL_FILE)
    assert manifest["config"]["threshold"] == float(NEW_THRESHOLD)
    # The held-out errors are measured again and agree with the fresh run's.
    assert pq.read_table(replanned / "thresholds.parquet").equals(
        pq.read_table(fresh / "thresholds.parquet"))


def test_plan_to_s3_outage_exits_1(original_run, factory_folder, link, fast_retries,
                                   bucket_client, bucket, monkeypatch, rayq_log, capsys):
    monkeypatch.syspath_prepend(str(factory_folder))
    uri = f"s3://{bucket}/replanned"
    detach = attach(OutageOnLog(link, "writing run to"), "rayq.storage.run")
    try:
        code = main(["plan", str(original_run), "--threshold", NEW_THRESHOLD, "--output", uri,
                     "--trust-code"])
    finally:
        detach()

    assert code == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ")
    assert "failed after 3 attempts" in err
    assert f"The new run at {uri} was not committed" in err
    assert "Traceback" not in err
    assert len(retry_warnings(rayq_log)) == 2
    assert MANIFEST not in stored_keys(bucket_client, bucket, "replanned")
    assert open_uploads(bucket_client, bucket) == []


def test_plan_of_api_run_exits_2(large_result, tmp_path, capsys):
    saved = tmp_path / "saved"
    rayq.save(large_result, str(saved))
    output = tmp_path / "replanned"
    assert main(["plan", str(saved), "--threshold", "0.01", "--output", str(output)]) == 2
    err = capsys.readouterr().err
    assert f"{saved} records no `rayq compress` job" in err
    assert "CompressResult.replan" in err
    assert "Traceback" not in err
    assert not output.exists()
