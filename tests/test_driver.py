"""The Ray driver: exact merging over any number of workers, dead workers, placement checks."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from torch import nn

import rayq
from rayq.driver.placement import WorkerRequest, check_placement, default_request
from rayq.errors import ConfigError, RunFailedError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCHEMES = ["int4", "int8", "w8a8"]
# 10 batches: the last one is held out, so 9 are scored, in chunks of 4, 4 and 1.
BATCH_COUNT = 10
SCORED_BATCHES = 9

pytestmark = pytest.mark.usefixtures("pickled_by_value")


class MixedModel(nn.Module):
    """An embedding, a convolution with a BatchNorm to fold, an LSTM, attention and a linear head."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(50, 16)
        self.conv = nn.Conv1d(16, 16, 3, padding=1)
        self.norm = nn.BatchNorm1d(16)
        self.lstm = nn.LSTM(16, 16, batch_first=True)
        self.attention = nn.MultiheadAttention(16, 2, batch_first=True)
        self.head = nn.Linear(16, 4)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        x = torch.relu(self.norm(self.conv(x.transpose(1, 2)))).transpose(1, 2)
        x, _ = self.lstm(x)
        x, _ = self.attention(x, x, x, need_weights=False)
        return self.head(x.mean(dim=1))


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    model = MixedModel()
    with torch.no_grad():
        model.norm.running_mean.uniform_(-0.5, 0.5)
        model.norm.running_var.uniform_(0.5, 2.0)
    return model.eval()


@pytest.fixture(scope="module")
def batches():
    generator = torch.Generator().manual_seed(1)
    return [torch.randint(0, 50, (4, 12), generator=generator) for _ in range(BATCH_COUNT)]


@pytest.fixture(scope="module")
def in_process(model, batches):
    return rayq.compress(model, batches, schemes=SCHEMES)


@pytest.fixture(scope="module")
def two_workers(ray_local, model, batches):
    return rayq.compress(model, batches, schemes=SCHEMES, workers=2)


def assert_same_scores(result, reference) -> None:
    """QS and its sums bitwise equal, activation ranges equal, and the same plan."""
    for column in ("layer", "scheme", "calls", "qs", "qs_numerator", "qs_denominator",
                   "input_scale", "input_zero_point"):
        assert result.sensitivity.column(column).to_pylist() == \
            reference.sensitivity.column(column).to_pylist(), column
    assert result.plan.equals(reference.plan)


def wait_for_free_cpus(ray_module, expected: float, timeout_s: float = 20.0) -> float:
    deadline = time.monotonic() + timeout_s
    free = ray_module.available_resources().get("CPU", 0)
    while free < expected and time.monotonic() < deadline:
        time.sleep(0.2)
        free = ray_module.available_resources().get("CPU", 0)
    return free


def test_model_covers_mixed_layer_types(in_process):
    types = set(in_process.sensitivity.column("module_type").to_pylist())
    assert types == {"Embedding", "Conv1d", "LSTM", "MultiheadAttention", "Linear"}
    w8a8 = [r for r in in_process.sensitivity.to_pylist() if r["scheme"] == "w8a8"]
    # Only layers whose input is a single float tensor take w8a8, and each of them was scored.
    assert {r["layer"] for r in w8a8 if r["fits"]} == {"conv", "head"}
    assert all(r["qs"] is not None and r["qs"] > 0 for r in w8a8 if r["fits"])
    assert in_process.folded


def test_one_worker_matches_in_process(ray_local, model, batches, in_process):
    result = rayq.compress(model, batches, schemes=SCHEMES, workers=1)
    assert_same_scores(result, in_process)
    assert [w["batches"] for w in result.workers] == [SCORED_BATCHES]


def test_two_workers_match_in_process(two_workers, in_process):
    assert_same_scores(two_workers, in_process)


def test_two_workers_both_score_batches(two_workers):
    assert [w["worker_id"] for w in two_workers.workers] == [0, 1]
    counts = [w["batches"] for w in two_workers.workers]
    assert all(count > 0 for count in counts), counts
    assert sum(counts) == SCORED_BATCHES
    assert all(w["restarts"] == 0 for w in two_workers.workers)
    assert all(w["device"] == "cpu" for w in two_workers.workers)


@pytest.mark.parametrize("after_chunks", [0, 1])
def test_killed_worker_result_equals_fault_free(ray_local, model, batches, in_process,
                                                after_chunks):
    # after_chunks=0 kills the actor in the activation statistics pass; with 1 its second chunk
    # arrives in either pass, so the actor dies at the latest in the QS pass.
    result = rayq.compress(model, batches, schemes=SCHEMES, workers=2,
                           fault={"slot": 1, "after_chunks": after_chunks})
    assert_same_scores(result, in_process)
    assert [w["restarts"] for w in result.workers] == [0, 1]
    assert sum(w["batches"] for w in result.workers) == SCORED_BATCHES
    assert result.thresholds.equals(in_process.thresholds)


def test_no_restarts_fails_naming_worker_and_batches(ray_local, model, batches):
    with pytest.raises(RunFailedError) as excinfo:
        rayq.compress(model, batches, schemes=SCHEMES, workers=2, max_restarts=0,
                      fault={"slot": 1, "after_chunks": 0})
    message = str(excinfo.value)
    # Chunks go out in order, so slot 1 received the second chunk, batches 4 to 7.
    assert "worker 1" in message
    assert "batches [4, 5, 6, 7]" in message
    assert "max_restarts=0" in message
    # The surviving actor is released too, so the cluster gets its CPUs back.
    assert wait_for_free_cpus(ray_local, 2) == 2


def test_unplaceable_gpu_workers_fail_fast(tmp_path):
    script = tmp_path / "unplaceable.py"
    script.write_text(textwrap.dedent("""
        import logging
        import sys

        import ray
        import torch
        from torch import nn

        import rayq
        from rayq.errors import ConfigError

        # Two logical GPUs. A worker of 0.4 GPU stays on one device, so 4 fit and 5 do not.
        ray.init(num_cpus=8, num_gpus=2, include_dashboard=False, _node_ip_address="127.0.0.1",
                 logging_level=logging.WARNING, log_to_driver=False)
        model = nn.Sequential(nn.Linear(8, 8))
        try:
            rayq.compress(model, [torch.randn(2, 8)], workers=5, worker_gpus=0.4)
        except ConfigError as exc:
            print("ConfigError:", exc)
            sys.exit(0)
        finally:
            ray.shutdown()
        print("no ConfigError was raised")
        sys.exit(1)
    """))
    process = subprocess.Popen([sys.executable, str(script)], cwd=ROOT, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        # Ray's own processes share the session, so they stop with the script.
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        pytest.fail("rayq waited for 60 s on workers that can never be placed")
    assert process.returncode == 0, stdout + stderr
    assert "5 workers of 1 CPU + 0.4 GPU each" in stdout
    assert "2 GPUs" in stdout
    assert "room for 4" in stdout


def test_actor_results_are_cpu_plain_values(ray_local, model, batches):
    import ray

    from rayq.config import QuantizationSettings
    from rayq.driver.worker import ScoringWorker
    from rayq.quant.activations import calibrate

    settings = QuantizationSettings(schemes=SCHEMES)
    actor = ray.remote(num_cpus=1)(ScoringWorker).remote(
        0, 0, None, ray.put(model), settings.model_dump(), 1)
    try:
        chunk = list(enumerate(batches[:2]))
        stats = ray.get(actor.activation_stats.remote(chunk))
        activations = {name: calibrate(h, "mse", 99.99) for name, h in stats.items()}
        sums = ray.get(actor.qs_sums.remote(chunk, activations))
        info = ray.get(actor.info.remote())
    finally:
        ray.kill(actor)

    assert set(stats) == {"conv", "head"}
    assert set(sums) == {0, 1}
    assert set(sums[0]) == {"embed", "conv", "lstm", "attention", "head"}
    for value in (stats, sums, info):
        for leaf in leaves(value):
            if isinstance(leaf, torch.Tensor):
                assert leaf.device.type == "cpu"
                assert not leaf.requires_grad
            else:
                assert isinstance(leaf, (int, float, str, bool, type(None))), type(leaf)
    for layer_sums in sums[0].values():
        assert type(layer_sums.denominator) is float
        assert all(type(v) is float for v in layer_sums.numerators.values())


def leaves(value):
    """Yield the scalars and tensors inside nested dicts, lists, tuples and dataclasses."""
    if isinstance(value, dict):
        for key, item in value.items():
            yield from leaves(key)
            yield from leaves(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from leaves(item)
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        for item in dataclasses.fields(value):
            yield from leaves(getattr(value, item.name))
    else:
        yield value


# Pure placement checks: no cluster needed.

def test_placement_cpu_workers_fit():
    check_placement(WorkerRequest(2, 1.0, 0.0), [{"CPU": 2}])
    check_placement(WorkerRequest(4, 0.5, 0.0), [{"CPU": 2}])


def test_placement_fractional_resources_fit_exactly():
    # 10 x 0.1 is exactly 1 in Ray's fixed point, though 1 // 0.1 == 9 in floating point.
    check_placement(WorkerRequest(10, 0.1, 0.0), [{"CPU": 1}])
    check_placement(WorkerRequest(10, 0.1, 0.1), [{"CPU": 1, "GPU": 1}])
    check_placement(WorkerRequest(6, 1.0, 1 / 3), [{"CPU": 8, "GPU": 2}])


def test_placement_too_many_cpu_workers():
    with pytest.raises(ConfigError) as excinfo:
        check_placement(WorkerRequest(3, 1.0, 0.0), [{"CPU": 2}])
    message = str(excinfo.value)
    assert "3 workers of 1 CPU each" in message
    assert "2 CPUs and 0 GPUs over 1 node(s)" in message
    assert "room for 2" in message
    assert "--workers" in message


def test_placement_gpu_fraction_stays_on_one_device():
    # Ray places a fraction of a GPU on one device: two of 0.6 never share a GPU.
    check_placement(WorkerRequest(2, 1.0, 0.6), [{"CPU": 8, "GPU": 2}])
    with pytest.raises(ConfigError) as excinfo:
        check_placement(WorkerRequest(3, 1.0, 0.6), [{"CPU": 8, "GPU": 2}])
    assert "room for 2" in str(excinfo.value)


def test_placement_five_workers_of_0_4_gpu_on_two_gpus():
    with pytest.raises(ConfigError) as excinfo:
        check_placement(WorkerRequest(5, 1.0, 0.4), [{"CPU": 8, "GPU": 2}])
    message = str(excinfo.value)
    assert "5 workers of 1 CPU + 0.4 GPU each" in message
    assert "8 CPUs and 2 GPUs" in message
    assert "room for 4" in message
    check_placement(WorkerRequest(4, 1.0, 0.4), [{"CPU": 8, "GPU": 2}])


def test_placement_counts_each_node_separately():
    nodes = [{"CPU": 1}, {"CPU": 1}]
    check_placement(WorkerRequest(2, 1.0, 0.0), nodes)
    # Two CPUs in total, but no single node has room for a worker of 2 CPUs.
    with pytest.raises(ConfigError) as excinfo:
        check_placement(WorkerRequest(1, 2.0, 0.0), nodes)
    assert "over 2 node(s), room for 0" in str(excinfo.value)


def test_placement_gpu_workers_on_cpu_cluster():
    with pytest.raises(ConfigError) as excinfo:
        check_placement(WorkerRequest(1, 1.0, 1.0), [{"CPU": 16}])
    assert "0 GPUs" in str(excinfo.value)


def test_placement_gpu_workers_over_gpu_nodes():
    nodes = [{"CPU": 4, "GPU": 1}, {"CPU": 4, "GPU": 1}, {"CPU": 4}]
    check_placement(WorkerRequest(2, 1.0, 1.0), nodes)
    with pytest.raises(ConfigError):
        check_placement(WorkerRequest(3, 1.0, 1.0), nodes)
    check_placement(WorkerRequest(1, 1.0, 2.0), [{"CPU": 4, "GPU": 2}])


@pytest.mark.parametrize("workers", [0, -1])
def test_placement_rejects_no_workers(workers):
    with pytest.raises(ConfigError) as excinfo:
        check_placement(WorkerRequest(workers, 1.0, 0.0), [{"CPU": 2}])
    assert f"invalid workers={workers}" in str(excinfo.value)


def test_placement_rejects_non_whole_gpus_above_one():
    with pytest.raises(ConfigError) as excinfo:
        check_placement(WorkerRequest(1, 1.0, 1.5), [{"CPU": 4, "GPU": 4}])
    assert "1.5" in str(excinfo.value)
    assert "--worker-gpus" in str(excinfo.value)


def test_default_request_takes_gpus_where_cluster_has_them():
    assert default_request(3, 2.0, None, None) == WorkerRequest(3, 1.0, 1.0)
    assert default_request(3, 0.0, None, None) == WorkerRequest(3, 1.0, 0.0)
    assert default_request(2, 4.0, 2.0, 0.5) == WorkerRequest(2, 2.0, 0.5)
    assert default_request(2, 4.0, None, 0.0) == WorkerRequest(2, 1.0, 0.0)
