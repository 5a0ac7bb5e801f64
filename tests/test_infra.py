"""The deployment files in infra/: schemas, field checks, and references into this repository.

Kubernetes objects are validated against the Kubernetes JSON schemas that the kubernetes-validate
package ships (no network). KubeRay's CRD schema is not available offline, so the RayCluster is
checked field by field, and each of its pod templates against the Kubernetes PodTemplateSpec
schema. The Ray cluster launcher config is validated against the schema that Ray ships.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import tomllib

import pytest
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INFRA = os.path.join(ROOT, "infra")
KUBERNETES_VERSION = "1.33.0"  # the oldest Kubernetes minor that EKS and GKE still support
S3_ACTIONS = {"s3:ListBucket", "s3:GetObject", "s3:PutObject", "s3:DeleteObject",
              "s3:AbortMultipartUpload", "s3:ListMultipartUploadParts"}


def documents(*parts: str) -> list[dict]:
    with open(os.path.join(INFRA, *parts)) as handle:
        return [doc for doc in yaml.safe_load_all(handle) if doc]


def kubernetes_objects() -> list[dict]:
    return documents("kuberay", "raycluster.yaml") + documents("kuberay", "cronjob.yaml")


def project_version() -> str:
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as handle:
        return tomllib.load(handle)["project"]["version"]


def pod_templates(raycluster: dict) -> list[dict]:
    spec = raycluster["spec"]
    return [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]


def containers(obj: dict) -> list[dict]:
    if obj["kind"] == "RayCluster":
        return [c for t in pod_templates(obj) for c in t["spec"]["containers"]]
    if obj["kind"] == "CronJob":
        return obj["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"]
    return []


def validate_kubernetes(obj: dict) -> None:
    import kubernetes_validate

    kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)


@pytest.mark.parametrize("obj", [o for o in kubernetes_objects() if o["kind"] != "RayCluster"],
                         ids=lambda o: o["kind"])
def test_kubernetes_object_matches_schema(obj):
    validate_kubernetes(obj)


def test_kubernetes_schema_rejects_mistakes():
    import kubernetes_validate

    cronjob = next(o for o in kubernetes_objects() if o["kind"] == "CronJob")
    broken = json.loads(json.dumps(cronjob))
    broken["spec"]["jobTemplate"]["spec"]["template"]["spec"]["restartPolicy"] = 3
    with pytest.raises(kubernetes_validate.ValidationError):
        validate_kubernetes(broken)
    broken = json.loads(json.dumps(cronjob))
    broken["spec"]["shedule"] = "0 2 * * *"
    with pytest.raises(kubernetes_validate.ValidationError):
        validate_kubernetes(broken)


def test_raycluster_pod_templates_match_schema():
    raycluster = next(o for o in kubernetes_objects() if o["kind"] == "RayCluster")
    for template in pod_templates(raycluster):
        validate_kubernetes({"apiVersion": "v1", "kind": "PodTemplate",
                             "metadata": {"name": "check"}, "template": template})


def test_raycluster_fields():
    raycluster = next(o for o in kubernetes_objects() if o["kind"] == "RayCluster")
    assert raycluster["apiVersion"] == "ray.io/v1"
    spec = raycluster["spec"]
    assert set(spec) <= {"rayVersion", "enableInTreeAutoscaling", "headGroupSpec",
                         "workerGroupSpecs", "autoscalerOptions", "headServiceAnnotations"}
    with open(os.path.join(ROOT, "requirements.lock")) as handle:
        ray_pin = re.search(r"^ray==(\S+)$", handle.read(), re.MULTILINE).group(1)
    assert spec["rayVersion"] == ray_pin
    assert set(spec["headGroupSpec"]) <= {"serviceType", "rayStartParams", "template"}
    for group in spec["workerGroupSpecs"]:
        assert set(group) <= {"groupName", "replicas", "minReplicas", "maxReplicas",
                              "rayStartParams", "template"}
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        assert all(isinstance(v, str) for v in group["rayStartParams"].values())
    gpu = [g for g in spec["workerGroupSpecs"]
           if any("nvidia.com/gpu" in c["resources"]["limits"] for c in g["template"]["spec"]["containers"])]
    assert gpu, "no worker group requests a GPU"
    for group in gpu:
        limit = group["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]
        assert group["rayStartParams"]["num-gpus"] == limit


def test_images_built_from_dockerfile():
    expected = f"/rayq:{project_version()}"
    images = [c["image"] for o in kubernetes_objects() for c in containers(o)]
    images.append(documents("aws", "cluster.yaml")[0]["docker"]["image"])
    assert images
    for image in images:
        assert image.endswith(expected), image
    assert len(set(images)) == 1


def test_dockerfile_copies_existing_files():
    with open(os.path.join(INFRA, "Dockerfile")) as handle:
        lines = [line.strip() for line in handle if line.strip().startswith("COPY")]
    assert lines
    for line in lines:
        sources = shlex.split(line)[1:-1]
        for source in sources:
            assert os.path.exists(os.path.join(ROOT, source)), f"{line}: {source} not found"


def zoo_command() -> str:
    cronjob = next(o for o in kubernetes_objects() if o["kind"] == "CronJob")
    command = containers(cronjob)[0]["command"]
    assert command[:3] == ["ray", "job", "submit"]
    return " ".join(command[command.index("--") + 1:])


def test_cronjob_submits_zoo_job_file():
    entrypoint = zoo_command()
    match = re.search(r"(?:^|&& )rayq zoo (\S+)", entrypoint)
    assert match, entrypoint
    assert match.group(1).startswith("jobs/")
    assert os.path.isfile(os.path.join(ROOT, match.group(1)))
    workdir = re.match(r"cd (\S+) && ", entrypoint).group(1)
    with open(os.path.join(INFRA, "Dockerfile")) as handle:
        assert f"WORKDIR {workdir}" in handle.read()


def test_cronjob_fleet_file_is_valid():
    from rayq.cli.jobs import read_job_file
    from rayq.config import load_fleet

    path = re.search(r"rayq zoo (\S+)", zoo_command()).group(1)
    fleet = load_fleet(read_job_file(os.path.join(ROOT, path)), path)
    assert fleet.jobs(path)


def validate_launcher(config: dict) -> None:
    """Validate against ray/autoscaler/ray-schema.json, the schema `ray up` checks."""
    import jsonschema
    import ray.autoscaler

    path = os.path.join(os.path.dirname(ray.autoscaler.__file__), "ray-schema.json")
    with open(path) as handle:
        jsonschema.validate(config, json.load(handle))


def test_cluster_launcher_matches_ray_schema():
    config = documents("aws", "cluster.yaml")[0]
    validate_launcher(config)
    nodes = config["available_node_types"]
    assert config["head_node_type"] in nodes
    assert any(node["resources"].get("GPU", 0) >= 1 for node in nodes.values())


def test_cluster_launcher_schema_rejects_mistakes():
    import jsonschema

    config = documents("aws", "cluster.yaml")[0]
    config["available_node_types"]["gpu_worker"]["min_wokers"] = 1
    with pytest.raises(jsonschema.ValidationError):
        validate_launcher(config)


def test_iam_policy_least_privilege():
    with open(os.path.join(INFRA, "aws", "iam-policy.json")) as handle:
        policy = json.load(handle)
    assert policy["Version"] == "2012-10-17"
    for statement in policy["Statement"]:
        assert statement["Effect"] == "Allow"
        actions = statement["Action"] if isinstance(statement["Action"], list) else [statement["Action"]]
        assert set(actions) <= S3_ACTIONS, actions
        resources = statement["Resource"] if isinstance(statement["Resource"], list) else [statement["Resource"]]
        for resource in resources:
            assert resource.startswith("arn:aws:s3:::rayq-models"), resource
            assert "*" not in resource.removesuffix("/*"), resource
        if "s3:ListBucket" in actions:
            assert "s3:prefix" in json.dumps(statement.get("Condition", {}))
        if {"s3:PutObject", "s3:DeleteObject"} & set(actions):
            assert resources == ["arn:aws:s3:::rayq-models/zoo/*"]


def test_infra_readme_names_every_file():
    with open(os.path.join(INFRA, "README.md")) as handle:
        readme = handle.read()
    for base, _, files in os.walk(INFRA):
        for name in files:
            relative = os.path.relpath(os.path.join(base, name), INFRA)
            if relative != "README.md":
                assert relative in readme, relative
