"""Quantization-aware fine-tuning of a finished run into a new run, on a small model.

The parent runs are written in-process from a small MLP quantized to int4 everywhere, which loses
enough fidelity for fine-tuning to win some back. The model is handed over in memory, so Ray Train
workers receive it by value. The real-model figures are in test_minilm_finetune.py.
"""

from __future__ import annotations

import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import safetensors.torch
import torch
from torch import nn

import rayq
from rayq.cli.main import main
from rayq.config import JobConfig
from rayq.errors import ConfigError, StorageError
from rayq.quant.weights import (
    INT4_WEIGHTS,
    choose_scales,
    fake_quantize_rows,
    fake_quantize_rows_learned_scales,
)
from rayq.sources.data import load_batches
from rayq.storage.run import open_run, write_run

SAMPLES = 48
BATCH_SIZE = 4  # 12 batches: 10 for training, the last 2 held out


class Mlp(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(16, 64), nn.GELU(), nn.Linear(64, 64), nn.GELU(),
                                    nn.Linear(64, 8))

    def forward(self, x):
        return self.layers(x)


def make_mlp() -> Mlp:
    torch.manual_seed(0)
    return Mlp().eval()


@pytest.fixture(scope="module")
def parent(tmp_path_factory):
    """A finished int4 run of the MLP whose model was handed over in memory, and its folder."""
    folder = tmp_path_factory.mktemp("finetune")
    generator = torch.Generator().manual_seed(1)
    samples = torch.randn(SAMPLES, 16, generator=generator)
    calibration = folder / "calibration.safetensors"
    safetensors.torch.save_file({"x": samples}, str(calibration))
    job = JobConfig(model="python:not_imported:make", calibration=str(calibration),
                    batch_size=BATCH_SIZE, threshold=1.0, schemes=["int4"], evaluation_batches=2,
                    output=str(folder / "parent"))
    batches = load_batches(job.calibration, None, job.batch_size)
    result = rayq.compress(make_mlp(), batches, threshold=1.0, schemes=["int4"],
                           evaluation_batches=2)
    assert {row["scheme"] for row in result.plan.to_pylist()} == {"int4"}
    write_run(result, job.output, config=job.model_dump(mode="json"), source=None)
    return folder


def manifest(location) -> dict:
    with open(os.path.join(location, "manifest.json")) as handle:
        return json.load(handle)


def outputs_of(model: nn.Module, batches) -> list[torch.Tensor]:
    with torch.no_grad():
        return [model(batch) for batch in batches]


# Learned scales.

def test_learned_scales_forward_is_bit_identical():
    torch.manual_seed(0)
    rows = torch.randn(6, 300)
    scales = choose_scales(rows, INT4_WEIGHTS)
    learned = scales.clone().requires_grad_(True)
    output = fake_quantize_rows_learned_scales(rows.clone().requires_grad_(True), learned,
                                               INT4_WEIGHTS)
    assert torch.equal(output, fake_quantize_rows(rows, scales, INT4_WEIGHTS))
    output.square().sum().backward()
    assert learned.grad is not None
    assert bool(torch.isfinite(learned.grad).all())
    assert float(learned.grad.abs().sum()) > 0


# The Python API, in this process.

def test_finetune_writes_child_run_that_round_trips(parent):
    output = parent / "tuned"
    before_manifest = manifest(parent / "parent")
    result = rayq.finetune(str(parent / "parent"), str(output), model=make_mlp(), steps=40,
                           learning_rate=1e-3, checkpoint_every=10)
    print(f"\nMLP int4: held-out cosine {result.before.cosine_mean:.5f} -> "
          f"{result.after.cosine_mean:.5f}, relative error {result.before.relative_error:.4f} -> "
          f"{result.after.relative_error:.4f}")
    # The figures of this tiny model move by less than their noise, so only the mechanics are
    # checked here; test_minilm_finetune.py checks the recovery on the real model.
    assert all(0 < h["loss"] < 1 for h in result.history)
    assert result.steps == 40
    assert result.resumed_from == []

    # The parent is untouched and recorded; the child has the same layout and model size.
    assert manifest(parent / "parent") == before_manifest
    child = manifest(output)
    assert child["parent"] == str(parent / "parent")
    assert child["finetune"]["steps_run"] == 40
    assert set(before_manifest["files"]) | {"finetune.parquet"} == set(child["files"])
    assert (os.path.getsize(output / "model" / "model.safetensors")
            == os.path.getsize(parent / "parent" / "model" / "model.safetensors"))
    assert not os.path.exists(output / "checkpoints")
    history = pq.read_table(output / "finetune.parquet").to_pylist()
    assert [row["step"] for row in history] == list(range(1, 41))
    # Only the chosen plan was trained, so only its row carries measured errors.
    for row in pq.read_table(output / "thresholds.parquet").to_pylist():
        if row["chosen"]:
            assert row["cosine_mean"] == result.after.cosine_mean
        else:
            assert row["cosine_mean"] is None

    # The saved run gives exactly the outputs of the module at the end of training.
    probes = [torch.randn(5, 16, generator=torch.Generator().manual_seed(7))]
    loaded = rayq.load(str(output), make_mlp())
    for actual, expected in zip(outputs_of(loaded, probes), outputs_of(result.trained_model, probes)):
        assert torch.equal(actual, expected)


def test_learned_scales_change_scales_and_round_trip(parent):
    output = parent / "tuned-scales"
    result = rayq.finetune(str(parent / "parent"), str(output), model=make_mlp(), steps=10,
                           learning_rate=1e-3, learn_scales=True)
    parent_model = rayq.load(str(parent / "parent"), make_mlp())
    loaded = rayq.load(str(output), make_mlp())
    before = parent_model.layers[0].parametrizations.weight[0].scales
    after = loaded.layers[0].parametrizations.weight[0].scales
    assert not torch.equal(before, after)
    assert bool((after > 0).all())
    probes = [torch.randn(5, 16, generator=torch.Generator().manual_seed(8))]
    for actual, expected in zip(outputs_of(loaded, probes), outputs_of(result.trained_model, probes)):
        assert torch.equal(actual, expected)


def test_interrupted_job_resumes_from_checkpoint(parent):
    output = parent / "resumed"
    with pytest.raises(RuntimeError, match="fault injection"):
        rayq.finetune(str(parent / "parent"), str(output), model=make_mlp(), steps=9,
                      checkpoint_every=2, fault={"step": 5})
    assert sorted(os.listdir(output / "checkpoints")) == ["step-00000002", "step-00000004"]
    assert not os.path.exists(output / "manifest.json")

    result = rayq.finetune(str(parent / "parent"), str(output), model=make_mlp(), steps=9,
                           checkpoint_every=2)
    assert result.resumed_from == [4]
    assert [h["step"] for h in result.history] == list(range(1, 10))
    assert manifest(output)["finetune"]["resumed_from"] == [4]
    assert not os.path.exists(output / "checkpoints")

    # Resuming repeats the lost steps exactly, so the model equals an uninterrupted job's.
    fresh = rayq.finetune(str(parent / "parent"), str(parent / "uninterrupted"), model=make_mlp(),
                          steps=9, checkpoint_every=2)
    probes = [torch.randn(5, 16, generator=torch.Generator().manual_seed(9))]
    for actual, expected in zip(outputs_of(result.model, probes), outputs_of(fresh.model, probes)):
        assert torch.equal(actual, expected)


def test_labelled_parquet_with_builtin_and_user_loss(parent, tmp_path, monkeypatch):
    generator = torch.Generator().manual_seed(2)
    features = torch.randn(32, 16, generator=generator)
    labels = torch.randint(0, 8, (32,), generator=generator)
    data = tmp_path / "labelled.parquet"
    pq.write_table(pa.table({"x": [row.tolist() for row in features], "label": labels.tolist()}),
                   str(data))
    (tmp_path / "rayq_test_losses.py").write_text(
        "import torch\n\n\ndef hinge(outputs, labels):\n"
        "    picked = outputs.gather(1, labels.long().unsqueeze(1))\n"
        "    return torch.relu(1 - picked + outputs).mean()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for loss in ("cross_entropy", "rayq_test_losses:hinge"):
        result = rayq.finetune(str(parent / "parent"), str(tmp_path / loss.replace(":", "-")),
                               model=make_mlp(), steps=6, learning_rate=1e-3, loss=loss,
                               data=str(data), label_column="label")
        losses = [h["loss"] for h in result.history]
        assert len(losses) == 6
        assert losses[-1] < losses[0], loss


@pytest.mark.parametrize("settings, named", [
    ({"steps": 5, "epochs": 1}, "steps or epochs"),
    ({"learning_rate": 0}, "learning_rate"),
    ({"steps": 0}, "steps"),
    ({"label_column": "y"}, "label_column needs data"),
    ({"loss": "mse"}, "needs labels"),
    ({"loss": "no_colon"}, "no_colon"),
    ({"data": "labels.csv", "label_column": "y", "loss": "mse"}, "labels.csv"),
    ({"checkpoint_every": -1}, "checkpoint_every"),
])
def test_invalid_settings_are_rejected_before_work(parent, settings, named):
    with pytest.raises(ConfigError) as excinfo:
        rayq.finetune(str(parent / "parent"), str(parent / "never"), model=make_mlp(), **settings)
    assert named in str(excinfo.value)
    assert not os.path.exists(parent / "never")


def test_unknown_user_loss_and_big_batch_are_rejected(parent):
    with pytest.raises(ConfigError, match="no_such_module"):
        rayq.finetune(str(parent / "parent"), str(parent / "never"), model=make_mlp(),
                      loss="no_such_module:loss")
    with pytest.raises(ConfigError, match="batch_size 5"):
        rayq.finetune(str(parent / "parent"), str(parent / "never"), model=make_mlp(), batch_size=5)
    assert not os.path.exists(parent / "never")


def test_loss_that_is_not_scalar_is_rejected(parent, tmp_path, monkeypatch):
    (tmp_path / "rayq_test_bad_loss.py").write_text(
        "def per_sample(outputs, targets):\n    return (outputs - targets[0]).square().sum(1)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ConfigError, match="scalar tensor"):
        rayq.finetune(str(parent / "parent"), str(parent / "never"), model=make_mlp(),
                      loss="rayq_test_bad_loss:per_sample")
    assert not os.path.exists(parent / "never")


def test_output_rules(parent):
    with pytest.raises(ConfigError, match="parent run itself"):
        rayq.finetune(str(parent / "parent"), str(parent / "parent"), model=make_mlp(), steps=1)
    finished = parent / "finished"
    rayq.finetune(str(parent / "parent"), str(finished), model=make_mlp(), steps=1)
    with pytest.raises(StorageError, match="already contains a finished run"):
        rayq.finetune(str(parent / "parent"), str(finished), model=make_mlp(), steps=1)
    rayq.finetune(str(parent / "parent"), str(finished), model=make_mlp(), steps=2, overwrite=True)
    assert manifest(finished)["finetune"]["steps_run"] == 2
    with pytest.raises(StorageError, match="no run found"):
        rayq.finetune(str(parent / "missing"), str(parent / "never"), model=make_mlp())


def test_smaller_batches_cut_calibration_batches(parent):
    result = rayq.finetune(str(parent / "parent"), str(parent / "small-batches"), model=make_mlp(),
                           epochs=1, batch_size=2)
    # 10 training batches of 4 samples become 20 of 2: one epoch on one worker is 20 steps.
    assert result.steps == 20


# The command line.

def test_finetune_help_lists_every_option(capsys):
    with pytest.raises(SystemExit) as excinfo:
        main(["finetune", "--help"])
    assert excinfo.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--output", "--steps", "--epochs", "--learning-rate", "--batch-size", "--workers",
                 "--checkpoint-every", "--learn-scales", "--loss", "--data", "--label-column",
                 "--trust-code", "--overwrite", "default", "example"):
        assert flag in out


def test_cli_report_names_the_parent(parent, capsys):
    output = parent / "reported"
    rayq.finetune(str(parent / "parent"), str(output), model=make_mlp(), steps=2)
    assert main(["report", str(output)]) == 0
    out = capsys.readouterr().out
    assert f"fine-tuned from {parent / 'parent'}" in out
    assert "fine-tuning: 2 steps" in out


def test_cli_rejects_invalid_values_with_exit_2(parent, capsys):
    code = main(["finetune", str(parent / "parent"), "--output", str(parent / "never"),
                 "--steps", "3", "--epochs", "1"])
    assert code == 2
    err = capsys.readouterr().err
    assert "steps or epochs" in err
    assert "Traceback" not in err
    code = main(["finetune", str(parent / "parent"), "--output", str(parent / "never"),
                 "--learning-rate", "-1"])
    assert code == 2
    assert "--learning-rate: invalid value -1.0" in capsys.readouterr().err
    code = main(["finetune", str(parent / "parent"), "--output", str(parent / "never"),
                 "--steps", "0"])
    assert code == 2
    assert "--steps: invalid value 0" in capsys.readouterr().err
    assert not (parent / "never").exists()


def test_cli_needs_trust_code_for_factory_parent(tmp_path, capsys):
    folder = tmp_path / "factory-run"
    job = JobConfig(model="python:some_module:make", calibration=str(tmp_path / "c.safetensors"),
                    output=str(folder))
    safetensors.torch.save_file({"x": torch.randn(8, 16)}, str(tmp_path / "c.safetensors"))
    result = rayq.compress(make_mlp(), [torch.randn(4, 16)], threshold=1.0, schemes=["int4"])
    write_run(result, str(folder), config=job.model_dump(mode="json"),
              source={"kind": "python", "factory": "some_module:make", "weights": None})
    code = main(["finetune", str(folder), "--output", str(tmp_path / "never")])
    assert code == 2
    err = capsys.readouterr().err
    assert "--trust-code" in err
    assert "some_module:make" in err
    assert not os.path.exists(tmp_path / "never")


def test_cli_finetunes_factory_run_with_trust_code(tmp_path, monkeypatch, capsys):
    (tmp_path / "rayq_finetune_factory.py").write_text(
        "import torch\nfrom torch import nn\n\n\ndef make():\n    torch.manual_seed(0)\n"
        "    return nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 4)).eval()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    calibration = tmp_path / "c.safetensors"
    safetensors.torch.save_file({"x": torch.randn(24, 16, generator=torch.Generator().manual_seed(3))},
                                str(calibration))
    # The parent is compressed here rather than by `rayq compress`, which would start Ray.
    job = JobConfig(model="python:rayq_finetune_factory:make", calibration=str(calibration),
                    batch_size=4, threshold=1.0, schemes=["int4"], output=str(tmp_path / "parent"))
    import rayq_finetune_factory

    result = rayq.compress(rayq_finetune_factory.make(), load_batches(str(calibration), None, 4),
                           threshold=1.0, schemes=["int4"])
    write_run(result, job.output, config=job.model_dump(mode="json"),
              source={"kind": "python", "factory": "rayq_finetune_factory:make", "weights": None})
    assert main(["finetune", str(tmp_path / "parent"), "--output", str(tmp_path / "tuned"),
                 "--trust-code", "--steps", "3", "--learn-scales"]) == 0
    out = capsys.readouterr().out
    assert "fine-tuning: 3 steps" in out
    assert "before" in out
    assert "after" in out
    assert manifest(tmp_path / "tuned")["finetune"]["learn_scales"] is True


def test_cli_model_in_memory_parent_exits_2(parent, capsys):
    code = main(["finetune", str(parent / "parent"), "--output", str(parent / "never")])
    assert code == 2
    assert "handed over in memory" in capsys.readouterr().err


# Ray Train.

@pytest.mark.slow
def test_ray_train_resumes_after_killed_worker(parent, ray_local, pickled_by_value):
    output = parent / "ray-train"
    result = rayq.finetune(str(parent / "parent"), str(output), model=make_mlp(), workers=2,
                           steps=8, learning_rate=1e-3, checkpoint_every=2,
                           fault={"rank": 1, "step": 5})
    print(f"\nRay Train, 2 workers, worker 1 killed before step 5 (counted from 0): resumed from "
          f"{result.resumed_from}, cosine {result.before.cosine_mean:.5f} -> "
          f"{result.after.cosine_mean:.5f}")
    # Checkpoints are at steps 2 and 4. Ray Train resumes from the latest one its controller
    # registered before it saw the worker die, which may not yet include step 4.
    assert len(result.resumed_from) == 1
    assert result.resumed_from[0] in (2, 4)
    assert [h["step"] for h in result.history] == list(range(1, 9))
    child = manifest(output)
    assert [w["rank"] for w in child["workers"]] == [0, 1]
    assert child["finetune"]["resumed_from"] == result.resumed_from
    assert not os.path.exists(output / "checkpoints")
    assert not os.path.exists(os.path.expanduser("~/ray_results/checkpoints"))

    probes = [torch.randn(5, 16, generator=torch.Generator().manual_seed(10))]
    loaded = rayq.load(str(output), make_mlp())
    for actual, expected in zip(outputs_of(loaded, probes), outputs_of(result.trained_model, probes)):
        assert torch.equal(actual, expected)
    assert open_run(str(output)).manifest["parent"] == str(parent / "parent")


def test_finetune_writes_to_s3(parent, s3_bucket):
    output = f"s3://{s3_bucket}/tuned"
    result = rayq.finetune(str(parent / "parent"), output, model=make_mlp(), steps=3,
                           checkpoint_every=1)
    run = open_run(output)
    assert run.manifest["parent"] == str(parent / "parent")
    # The checkpoints were written under the output while the job ran, and removed at its end.
    assert not [path for path in run.location.list_files() if path.startswith("checkpoints/")]
    probes = [torch.randn(5, 16, generator=torch.Generator().manual_seed(11))]
    loaded = rayq.load(output, make_mlp())
    for actual, expected in zip(outputs_of(loaded, probes), outputs_of(result.trained_model, probes)):
        assert torch.equal(actual, expected)
