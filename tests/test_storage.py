"""Runs on S3 (a moto server on 127.0.0.1) and in local folders: same bytes, checksums, reloading."""

from __future__ import annotations

import hashlib
import json
import os

import pytest
import torch
from torch import nn

import rayq
from rayq.errors import StorageError
from rayq.storage.run import MANIFEST, load_run_model, open_run, write_run

# Manifest fields that differ between two writes of the same result by design.
MANIFEST_ONLY_FIELDS = ("created_unix_s", "config")

FACTORY_MODULE = "rayq_storage_test_model"
FACTORY_SOURCE = f'''
import torch
from torch import nn


def make():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(4, 8, 3), nn.BatchNorm1d(8), nn.ReLU(), nn.Flatten(),
                          nn.Linear(8 * 14, 16), nn.ReLU(), nn.Linear(16, 6))
    with torch.no_grad():
        model[1].running_mean.uniform_(-0.5, 0.5)
        model[1].running_var.uniform_(0.5, 2.0)
    return model.eval()
'''


@pytest.fixture(scope="module")
def factory_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("factory")
    (folder / f"{FACTORY_MODULE}.py").write_text(FACTORY_SOURCE)
    return folder


@pytest.fixture(scope="module")
def float_model():
    namespace: dict = {}
    exec(FACTORY_SOURCE, namespace)
    return namespace["make"]()


@pytest.fixture(scope="module")
def batches():
    generator = torch.Generator().manual_seed(3)
    return [torch.randn(4, 4, 16, generator=generator) for _ in range(10)]


@pytest.fixture(scope="module")
def result(float_model, batches):
    # At this threshold the plan mixes int4 weights with w8a8 layers, whose input quantizers
    # are saved too; test_plan_mixes_schemes checks it.
    return rayq.compress(float_model, batches, threshold=0.002, schemes=["int4", "int8", "w8a8"])


def config_for(output: str) -> dict:
    return {"model": "in memory", "output": output, "threshold": 0.002}


def test_plan_mixes_schemes(result):
    schemes = {r["scheme"] for r in result.plan.to_pylist() if r["quantizable"]}
    assert schemes == {"int4", "w8a8"}


def s3_object(bucket: str, key: str) -> bytes:
    import boto3

    client = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
    return client.get_object(Bucket=bucket, Key=key)["Body"].read()


def put_s3_object(bucket: str, key: str, data: bytes) -> None:
    import boto3

    client = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
    client.put_object(Bucket=bucket, Key=key, Body=data)


def without_manifest_only_fields(manifest: dict) -> dict:
    return {k: v for k, v in manifest.items() if k not in MANIFEST_ONLY_FIELDS}


def test_s3_and_local_runs_hold_same_bytes(result, s3_bucket, tmp_path):
    s3_uri = f"s3://{s3_bucket}/runs/tiny"
    local_dir = tmp_path / "tiny"
    write_run(result, s3_uri, config=config_for(s3_uri))
    write_run(result, str(local_dir), config=config_for(str(local_dir)))

    s3_manifest = json.loads(s3_object(s3_bucket, f"runs/tiny/{MANIFEST}"))
    local_manifest = json.loads((local_dir / MANIFEST).read_text())
    assert s3_manifest["files"] == local_manifest["files"]
    assert without_manifest_only_fields(s3_manifest) == without_manifest_only_fields(local_manifest)
    assert s3_manifest["config"]["output"] == s3_uri

    expected = {"model/model.safetensors", "model/quant_config.json", "sensitivity.parquet",
                "plan.parquet", "thresholds.parquet", "summary.txt", "sensitivity.png",
                "thresholds.png", "report.html"}
    assert set(s3_manifest["files"]) == expected
    for path, entry in s3_manifest["files"].items():
        s3_bytes = s3_object(s3_bucket, f"runs/tiny/{path}")
        local_bytes = (local_dir / path).read_bytes()
        assert s3_bytes == local_bytes, path
        assert hashlib.sha256(s3_bytes).hexdigest() == entry["sha256"], path
        assert len(s3_bytes) == entry["size_bytes"], path


def test_repeated_writes_give_same_bytes(result, tmp_path):
    # Any run-to-run change in file bytes (such as metadata written in a random order) would show
    # in at least one of ten writes with near certainty.
    digests = []
    for index in range(10):
        folder = tmp_path / f"run{index}"
        write_run(result, str(folder), config=config_for("same"))
        digests.append(json.loads((folder / MANIFEST).read_text())["files"])
    for files in digests[1:]:
        assert files == digests[0]


def test_s3_run_tables_read_back_equal(result, s3_bucket):
    uri = f"s3://{s3_bucket}/run"
    write_run(result, uri, config=config_for(uri))

    run = open_run(uri)
    run.verify()
    for name in ("sensitivity", "plan", "thresholds"):
        assert run.table(name).equals(getattr(result, name)), name


def test_s3_prefix_without_manifest_is_incomplete(result, s3_bucket):
    uri = f"s3://{s3_bucket}/interrupted"
    write_run(result, uri, config=config_for(uri))
    import boto3

    client = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
    client.delete_object(Bucket=s3_bucket, Key=f"interrupted/{MANIFEST}")

    with pytest.raises(StorageError) as excinfo:
        open_run(uri)
    message = str(excinfo.value)
    assert "incomplete run" in message
    assert uri in message
    assert MANIFEST in message


def test_s3_empty_prefix_has_no_run(s3_bucket):
    uri = f"s3://{s3_bucket}/never-written"
    with pytest.raises(StorageError) as excinfo:
        open_run(uri)
    assert "no run found" in str(excinfo.value)
    assert uri in str(excinfo.value)


def test_s3_tampered_file_is_detected(result, s3_bucket):
    uri = f"s3://{s3_bucket}/tampered"
    write_run(result, uri, config=config_for(uri))
    original = s3_object(s3_bucket, "tampered/plan.parquet")
    # Same size, one byte changed: only the checksum can tell.
    changed = original[:100] + bytes([original[100] ^ 0xFF]) + original[101:]
    put_s3_object(s3_bucket, "tampered/plan.parquet", changed)

    run = open_run(uri)
    with pytest.raises(StorageError) as excinfo:
        run.verify()
    message = str(excinfo.value)
    assert f"{uri}/plan.parquet" in message
    assert "sha256" in message
    with pytest.raises(StorageError):
        run.table("plan")
    # The files left alone still read back.
    assert run.table("sensitivity").equals(result.sensitivity)


def test_local_tampered_model_is_detected(result, tmp_path):
    folder = tmp_path / "run"
    write_run(result, str(folder), config=config_for(str(folder)))
    weights = folder / "model" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01
    weights.write_bytes(bytes(data))

    run = open_run(str(folder))
    with pytest.raises(StorageError) as excinfo:
        load_run_model(run, nn.Module())
    assert "model/model.safetensors" in str(excinfo.value)
    assert "sha256" in str(excinfo.value)


def test_s3_model_round_trip_is_bit_identical(result, float_model, batches, s3_bucket):
    uri = f"s3://{s3_bucket}/model"
    write_run(result, uri, config=config_for(uri))

    loaded = load_run_model(open_run(uri), float_model)
    assert loaded is not float_model
    with torch.no_grad():
        for batch in batches:
            assert torch.equal(loaded(batch), result.model(batch))
    # Every tensor came back, the quantized codes and scales included.
    saved = result.model.state_dict()
    restored = loaded.state_dict()
    assert saved.keys() == restored.keys()
    for name, tensor in saved.items():
        assert torch.equal(restored[name], tensor), name


def test_s3_factory_model_reloads_with_trust_code(result, batches, s3_bucket, factory_dir,
                                                 monkeypatch):
    monkeypatch.syspath_prepend(str(factory_dir))
    uri = f"s3://{s3_bucket}/factory"
    source = {"kind": "python", "factory": f"{FACTORY_MODULE}:make", "weights": None}
    write_run(result, uri, config=config_for(uri), source=source)
    run = open_run(uri)

    with pytest.raises(rayq.RayqError) as excinfo:
        load_run_model(run)
    assert "--trust-code" in str(excinfo.value)

    loaded = load_run_model(run, trust_code=True)
    with torch.no_grad():
        for batch in batches:
            assert torch.equal(loaded(batch), result.model(batch))


def test_in_memory_model_needs_float_instance(result, s3_bucket):
    uri = f"s3://{s3_bucket}/in-memory"
    write_run(result, uri, config=config_for(uri))
    with pytest.raises(StorageError) as excinfo:
        load_run_model(open_run(uri))
    assert "rayq.load(location, model)" in str(excinfo.value)


def test_finished_s3_run_is_not_replaced(result, s3_bucket):
    uri = f"s3://{s3_bucket}/finished"
    write_run(result, uri, config=config_for(uri))
    before = s3_object(s3_bucket, f"finished/{MANIFEST}")

    with pytest.raises(StorageError) as excinfo:
        write_run(result, uri, config=config_for(uri))
    assert "--overwrite" in str(excinfo.value)
    assert s3_object(s3_bucket, f"finished/{MANIFEST}") == before

    write_run(result, uri, config=config_for(uri), overwrite=True)
    assert json.loads(s3_object(s3_bucket, f"finished/{MANIFEST}"))["files"] == \
        json.loads(before)["files"]


def test_no_credentials_in_written_files(result, s3_bucket, monkeypatch):
    access_key = "AKIARAYQTESTACCESS01"
    secret_key = "rayq-test-secret-key-that-must-not-leak"
    session_token = "rayq-test-session-token-that-must-not-leak"
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret_key)
    monkeypatch.setenv("AWS_SESSION_TOKEN", session_token)
    uri = f"s3://{s3_bucket}/secrets"
    write_run(result, uri, config=config_for(uri))

    manifest = json.loads(s3_object(s3_bucket, f"secrets/{MANIFEST}"))
    texts = {MANIFEST: json.dumps(manifest),
             "summary.txt": s3_object(s3_bucket, "secrets/summary.txt").decode()}
    for path in manifest["files"]:
        texts[path] = s3_object(s3_bucket, f"secrets/{path}").decode("latin-1")
    for path, text in texts.items():
        for secret in (access_key, secret_key, session_token):
            assert secret not in text, f"{secret!r} found in {path}"
