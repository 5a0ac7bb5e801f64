"""The small zoo submitted through the Ray Jobs API, as a scheduled job would be, writing to S3.

The test starts its own Ray head with the dashboard (which serves the Jobs API) on 127.0.0.1,
submits `rayq zoo` three times and reads `fleet.parquet` back from the moto S3 server.
"""

from __future__ import annotations

import io
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid

import pytest

from tests.conftest import free_port
from tests.zoo_helpers import save_tone_weights, statuses, write_fleet

pytestmark = pytest.mark.slow

# Each submission starts a job driver that joins the cluster and scores three tiny models; on a
# busy 2-core machine that takes well under this.
JOB_TIMEOUT_S = 400


def _head_command(temp_dir: str, ports: dict[str, int]) -> list[str]:
    ray = os.path.join(os.path.dirname(sys.executable), "ray")
    # Every port is chosen here, so the head never collides with another Ray on the machine.
    return [ray, "start", "--head", "--block", "--node-ip-address=127.0.0.1",
            f"--port={ports['gcs']}", "--dashboard-host=127.0.0.1",
            f"--dashboard-port={ports['dashboard']}", "--include-dashboard=true",
            f"--ray-client-server-port={ports['client']}",
            f"--node-manager-port={ports['node_manager']}",
            f"--object-manager-port={ports['object_manager']}",
            f"--dashboard-agent-listen-port={ports['agent_http']}",
            f"--dashboard-agent-grpc-port={ports['agent_grpc']}",
            f"--runtime-env-agent-port={ports['runtime_env']}",
            f"--metrics-export-port={ports['metrics']}",
            "--num-cpus=2", f"--temp-dir={temp_dir}", "--disable-usage-stats"]


@pytest.fixture(scope="module")
def jobs_client():
    """A Ray head started for this module, and a JobSubmissionClient on its dashboard."""
    from ray.job_submission import JobSubmissionClient

    names = ("gcs", "dashboard", "client", "node_manager", "object_manager", "agent_http",
             "agent_grpc", "runtime_env", "metrics")
    ports = {name: free_port() for name in names}
    # A short path: Ray's socket paths under the temp dir must stay under 108 bytes.
    temp_dir = tempfile.mkdtemp(prefix="rq-", dir="/tmp")
    # Ray 2.60 heads require a token on the Jobs API; this one gets a token made for the test.
    token = uuid.uuid4().hex
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token)
    log = open(os.path.join(temp_dir, "head.log"), "wb")  # noqa: SIM115 (closed at teardown)
    head = subprocess.Popen(_head_command(temp_dir, ports), env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{ports['dashboard']}"
    try:
        client = _wait_for_dashboard(address, head, JobSubmissionClient,
                                     {"Authorization": f"Bearer {token}"})
        yield client
    finally:
        _stop(head)
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


def _wait_for_dashboard(address: str, head: subprocess.Popen, client_class, headers: dict):
    deadline = time.monotonic() + 120
    while True:
        if head.poll() is not None:
            pytest.fail(f"ray start exited with code {head.returncode}")
        try:
            return client_class(address, headers=headers)
        except (ConnectionError, RuntimeError):
            if time.monotonic() > deadline:
                pytest.fail(f"the Ray dashboard at {address} did not answer within 120 s")
            time.sleep(2)


def _stop(head: subprocess.Popen) -> None:
    """Stop the head and every process it started (they share its process group)."""
    try:
        os.killpg(head.pid, signal.SIGTERM)
        head.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(head.pid, signal.SIGKILL)
        head.wait(timeout=30)
    except ProcessLookupError:
        return
    # Workers that outlived the head are in the same process group.
    try:
        os.killpg(head.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def submit_zoo(client, fleet: str, output: str, endpoint: str) -> tuple[str, str]:
    """Submit `rayq zoo` and wait; return the job's final status and its logs."""
    from ray.job_submission import JobStatus

    env_vars = {key: os.environ[key] for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                                 "AWS_REGION")}
    env_vars.update(AWS_ENDPOINT_URL=endpoint, OMP_NUM_THREADS="1")
    job_id = client.submit_job(
        entrypoint=f"{sys.executable} -m rayq.cli.main zoo {fleet} --output {output}",
        runtime_env={"env_vars": env_vars}, submission_id=f"zoo-{uuid.uuid4().hex[:8]}")
    deadline = time.monotonic() + JOB_TIMEOUT_S
    terminal = {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}
    while (status := client.get_job_status(job_id)) not in terminal:
        if time.monotonic() > deadline:
            client.stop_job(job_id)
            pytest.fail(f"job {job_id} did not finish in {JOB_TIMEOUT_S} s:\n"
                        f"{client.get_job_logs(job_id)[-3000:]}")
        time.sleep(2)
    return str(status), client.get_job_logs(job_id)


def read_fleet_table(endpoint: str, bucket: str):
    import boto3
    import pyarrow.parquet as pq

    body = boto3.client("s3", endpoint_url=endpoint).get_object(
        Bucket=bucket, Key="zoo/fleet.parquet")["Body"].read()
    return pq.read_table(io.BytesIO(body))


def test_zoo_through_jobs_api(jobs_client, s3_server, s3_bucket, tmp_path):
    weights = str(tmp_path / "tone.safetensors")
    save_tone_weights(weights)
    fleet = write_fleet(tmp_path, "runs/unused", weights={"tone-convnet": weights})
    output = f"s3://{s3_bucket}/zoo"

    status, logs = submit_zoo(jobs_client, fleet, output, s3_server)
    assert status == "FAILED", logs[-3000:]  # exit code 1: the broken model failed
    table = read_fleet_table(s3_server, s3_bucket)
    assert statuses(table) == {"text-encoder": "done", "tone-convnet": "done",
                               "spectrum-lstm": "done", "broken": "failed"}, logs[-3000:]
    rows = {row["name"]: row for row in table.to_pylist()}
    assert "broken on purpose" in rows["broken"]["reason"]
    assert rows["tone-convnet"]["compression_ratio"] > 1.0
    assert "broken on purpose" in logs

    status, logs = submit_zoo(jobs_client, fleet, output, s3_server)
    assert statuses(read_fleet_table(s3_server, s3_bucket)) == {
        "text-encoder": "skipped", "tone-convnet": "skipped", "spectrum-lstm": "skipped",
        "broken": "failed"}, logs[-3000:]

    save_tone_weights(weights, scale=1.01)
    status, logs = submit_zoo(jobs_client, fleet, output, s3_server)
    rows = {row["name"]: row for row in read_fleet_table(s3_server, s3_bucket).to_pylist()}
    assert rows["tone-convnet"]["status"] == "done", logs[-3000:]
    assert rows["tone-convnet"]["reason"] == "weights changed"
    assert rows["text-encoder"]["status"] == "skipped"
    assert rows["spectrum-lstm"]["status"] == "skipped"
    assert rows["broken"]["status"] == "failed"
    assert claim_keys(s3_server, s3_bucket) == []


def claim_keys(endpoint: str, bucket: str) -> list[str]:
    import boto3

    listing = boto3.client("s3", endpoint_url=endpoint).list_objects_v2(
        Bucket=bucket, Prefix="zoo/.claims/")
    return [item["Key"] for item in listing.get("Contents", [])]
