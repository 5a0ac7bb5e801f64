"""`rayq zoo`: fleet files, fingerprints, skipping, failure isolation and claims.

The fleet runs use the shared local Ray instance and the small zoo of jobs/zoo-small.yaml. The
same behaviour through the Ray Jobs API and S3 is tested in test_zoo_jobs_api.py.
"""

from __future__ import annotations

import json
import os
import threading
import time

import pytest

from rayq.cli.main import main
from rayq.config import load_fleet
from rayq.driver.placement import WorkerRequest
from rayq.errors import ConfigError
from rayq.fleet.claims import ClaimStore, new_owner_id, remove_expired_claims
from rayq.fleet.runner import FleetRun, run_models
from rayq.fleet.schedule import models_at_once
from rayq.storage.location import parse_location
from tests.zoo_helpers import (
    ROOT,
    read_local_table,
    save_tone_weights,
    statuses,
    write_fleet,
)

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL_TONES = os.path.join(ROOT, "jobs", "data", "small-tones.safetensors")


def fleet_problems(data: dict) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load_fleet(data, "fleet.yaml").jobs("fleet.yaml")
    return caught.value.problems


def test_fleet_entry_overrides_defaults():
    fleet = load_fleet({"output": "runs/zoo", "defaults": {"threshold": 0.01, "workers": 2},
                        "models": [{"name": "a", "model": "m", "calibration": "c.txt",
                                    "threshold": 0.002}]}, "fleet.yaml")
    job = fleet.jobs("fleet.yaml")["a"]
    assert job.threshold == 0.002
    assert job.workers == 2
    assert job.output == "runs/zoo/a"


def test_fleet_problems_reported_at_once():
    problems = fleet_problems({
        "output": "runs/zoo",
        "defaults": {"threshold": -1, "output": "x"},
        "models": [{"name": "a", "model": "m", "calibration": "c.txt", "treshold": 0.1},
                   {"name": "b", "model": "m", "calibration": "c.txt", "workers": 0}],
    })
    text = "\n".join(problems)
    assert "defaults.output: not allowed" in text
    assert "models.0.treshold: unknown key; did you mean `threshold`?" in text
    assert "models.1.workers: invalid value 0" in text
    assert "defaults.threshold: invalid value -1" in text


def test_fleet_rejects_repeated_names_and_unknown_keys():
    with pytest.raises(ConfigError) as caught:
        load_fleet({"output": "o", "model": "x", "models": [
            {"name": "a", "model": "m", "calibration": "c"},
            {"name": "a", "model": "m", "calibration": "c"}]}, "fleet.yaml")
    text = "\n".join(caught.value.problems)
    assert "model: unknown key; did you mean `models`?" in text
    assert "repeated: a" in text


def test_fleet_rejects_name_with_slash():
    with pytest.raises(ConfigError) as caught:
        load_fleet({"output": "o", "models": [{"name": "a/b", "model": "m", "calibration": "c"}]},
                   "fleet.yaml")
    assert "models.0.name" in str(caught.value)


def test_models_at_once_from_resources():
    nodes = [{"CPU": 8.0}, {"CPU": 4.0, "GPU": 2.0}]
    assert models_at_once([WorkerRequest(2, 1.0, 0.0)] * 10, nodes) == 6
    assert models_at_once([WorkerRequest(1, 1.0, 1.0)] * 5, nodes) == 2
    assert models_at_once([WorkerRequest(4, 1.0, 0.0), WorkerRequest(1, 1.0, 0.0)], nodes) == 2
    assert models_at_once([WorkerRequest(1, 1.0, 0.0)] * 3, nodes) == 3
    assert models_at_once([WorkerRequest(16, 1.0, 0.0)], nodes) == 1


@pytest.fixture(params=["local", "s3"])
def claim_root(request, tmp_path):
    if request.param == "local":
        return parse_location(str(tmp_path / "zoo"))
    import uuid

    import boto3

    endpoint = request.getfixturevalue("s3_server")
    bucket = f"rayq-claims-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=bucket)
    return parse_location(f"s3://{bucket}/zoo")


def test_claim_excludes_second_fleet(claim_root):
    first = ClaimStore(claim_root, "fleet-a", ttl_s=60)
    second = ClaimStore(claim_root, "fleet-b", ttl_s=60)
    assert first.acquire("model") is None
    holder = second.acquire("model")
    assert holder is not None
    assert holder.owner == "fleet-a"
    first.release("model")
    assert second.acquire("model") is None


def test_expired_claim_taken_over(claim_root):
    crashed = ClaimStore(claim_root, "crashed", ttl_s=0.2)
    assert crashed.acquire("model") is None
    time.sleep(0.3)
    fresh = ClaimStore(claim_root, "fresh", ttl_s=60)
    assert fresh.acquire("model") is None
    assert ClaimStore(claim_root, "third", ttl_s=60).acquire("model").owner == "fresh"


def test_release_keeps_claim_taken_over(claim_root):
    crashed = ClaimStore(claim_root, "crashed", ttl_s=0.2)
    crashed.acquire("model")
    time.sleep(0.3)
    ClaimStore(claim_root, "fresh", ttl_s=60).acquire("model")
    crashed.release("model")
    assert ClaimStore(claim_root, "third", ttl_s=60).acquire("model").owner == "fresh"


def claim_in_process(root: str, start, results) -> None:
    store = ClaimStore(parse_location(root), new_owner_id(), ttl_s=60)
    start.wait()
    results.put(store.acquire("model") is None)


def test_claim_race_between_processes(tmp_path):
    import multiprocessing

    # fork: the children only open files, and spawn would import torch again in each.
    context = multiprocessing.get_context("fork")
    start = context.Barrier(6)
    results = context.Queue()
    processes = [context.Process(target=claim_in_process, args=(str(tmp_path / "zoo"), start, results))
                 for _ in range(6)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=120)
    outcomes = [results.get(timeout=5) for _ in processes]
    assert outcomes.count(True) == 1


def test_remove_expired_claims(tmp_path):
    root = parse_location(str(tmp_path / "zoo"))
    ClaimStore(root, "old", ttl_s=0.1).acquire("stale")
    ClaimStore(root, "live", ttl_s=60).acquire("held")
    time.sleep(0.2)
    assert remove_expired_claims(root) == ["stale.claim"]
    assert sorted(os.listdir(root.path(".claims"))) == ["held.claim"]


def run_zoo(*args: str, capsys) -> tuple[int, str]:
    code = main(["zoo", *args])
    return code, capsys.readouterr().out


@pytest.mark.slow
def test_zoo_skips_unchanged_and_isolates_failure(ray_local, tmp_path, capsys):
    weights = str(tmp_path / "tone.safetensors")
    save_tone_weights(weights)
    output = str(tmp_path / "zoo")
    fleet = write_fleet(tmp_path, output, weights={"tone-convnet": weights},
                        extra=[{"name": "missing-data", "model": "python:rayq_zoo.tiny:tone_convnet",
                                "calibration": str(tmp_path / "absent.safetensors")},
                               {"name": "dying-worker", "model": "python:rayq_zoo.tiny:dying_convnet",
                                "calibration": SMALL_TONES, "max_restarts": 1}])

    code, printed = run_zoo(fleet, capsys=capsys)
    table = read_local_table(output)
    assert code == 1
    assert statuses(table) == {"text-encoder": "done", "tone-convnet": "done",
                               "spectrum-lstm": "done", "broken": "failed",
                               "missing-data": "failed", "dying-worker": "failed"}
    rows = {row["name"]: row for row in table.to_pylist()}
    assert "broken on purpose" in rows["broken"]["reason"]
    assert "absent.safetensors" in rows["missing-data"]["reason"]
    assert "died 2 times (max_restarts=1)" in rows["dying-worker"]["reason"]
    for name in ("text-encoder", "tone-convnet", "spectrum-lstm"):
        assert rows[name]["compression_ratio"] > 1.0
        assert rows[name]["relative_error"] is not None
        assert os.path.isfile(os.path.join(output, name, "manifest.json"))
    assert "broken on purpose" in printed
    with open(os.path.join(output, "tone-convnet", "manifest.json")) as handle:
        manifest = json.load(handle)
    assert set(manifest["fingerprint"]["parts"]) == {"weights", "data", "config"}
    assert not os.path.exists(os.path.join(output, ".claims"))

    code, _ = run_zoo(fleet, capsys=capsys)
    assert code == 1
    assert statuses(read_local_table(output)) == {
        "text-encoder": "skipped", "tone-convnet": "skipped", "spectrum-lstm": "skipped",
        "broken": "failed", "missing-data": "failed", "dying-worker": "failed"}

    save_tone_weights(weights, scale=1.01)
    code, _ = run_zoo(fleet, capsys=capsys)
    rows = {row["name"]: row for row in read_local_table(output).to_pylist()}
    assert rows["tone-convnet"]["status"] == "done"
    assert rows["tone-convnet"]["reason"] == "weights changed"
    assert rows["text-encoder"]["status"] == "skipped"
    assert rows["spectrum-lstm"]["status"] == "skipped"


@pytest.mark.slow
def test_zoo_redoes_interrupted_and_corrupted_runs(ray_local, tmp_path, capsys):
    output = str(tmp_path / "zoo")
    fleet = write_fleet(tmp_path, output, drop=("broken", "text-encoder", "spectrum-lstm"))
    assert run_zoo(fleet, capsys=capsys)[0] == 0
    os.remove(os.path.join(output, "tone-convnet", "manifest.json"))

    assert run_zoo(fleet, capsys=capsys)[0] == 0
    row = read_local_table(output).to_pylist()[0]
    assert row["status"] == "done"
    assert row["reason"] == "previous run is incomplete (no readable manifest)"

    with open(os.path.join(output, "tone-convnet", "thresholds.parquet"), "ab") as handle:
        handle.write(b"corrupted")
    assert run_zoo(fleet, capsys=capsys)[0] == 0
    row = read_local_table(output).to_pylist()[0]
    assert row["status"] == "done"
    assert row["reason"] == "previous run with the same fingerprint is corrupted"


@pytest.mark.slow
def test_zoo_takes_over_expired_claim(ray_local, tmp_path, capsys):
    output = str(tmp_path / "zoo")
    fleet = write_fleet(tmp_path, output, drop=("broken", "text-encoder", "spectrum-lstm"))
    ClaimStore(parse_location(output), "crashed-fleet", ttl_s=0.1).acquire("tone-convnet")
    time.sleep(0.2)

    assert run_zoo(fleet, capsys=capsys)[0] == 0
    assert statuses(read_local_table(output)) == {"tone-convnet": "done"}
    assert not os.path.exists(os.path.join(output, ".claims"))


@pytest.mark.slow
def test_concurrent_fleets_compress_once(ray_local, tmp_path):
    output = str(tmp_path / "zoo")
    fleet_file = write_fleet(tmp_path, output, drop=("broken",))
    import yaml

    with open(fleet_file) as handle:
        fleet = load_fleet(yaml.safe_load(handle), fleet_file)
    jobs = fleet.jobs(fleet_file)
    root = parse_location(output)
    nodes = [{"CPU": 2.0}]
    outcomes: dict[str, list] = {}
    start = threading.Barrier(2)

    def run_fleet(label: str) -> None:
        claims = ClaimStore(root, new_owner_id(), ttl_s=60)
        start.wait()
        outcomes[label] = run_models(jobs, FleetRun(claims, nodes=nodes), parallel=2)

    threads = [threading.Thread(target=run_fleet, args=(label,)) for label in ("a", "b")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    for name in jobs:
        rows = [o for label in ("a", "b") for o in outcomes[label] if o.name == name]
        done = [o for o in rows if o.status == "done"]
        assert len(done) == 1, f"{name}: {[(o.status, o.reason) for o in rows]}"
        other = next(o for o in rows if o.status != "done")
        assert other.status == "skipped"
        assert other.reason.startswith(("claimed by fleet", "unchanged since"))
