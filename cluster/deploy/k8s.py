"""KubeRay manifests rendered from the typed pool config, so the worker groups and the recipe cannot drift.

One RayJob (head + ``teacher-gpu`` + ``student-gpu`` worker groups) runs ``python recipes/dad_imagenet.py``
with the pool sizes written into its entrypoint; a standalone RayCluster of the same shape serves
interactive ``ray job submit``; a PersistentVolumeClaim holds the run directory (and the checkpoints
unless ``storage_path`` is an object-store URI). ``write_tree`` regenerates the committed ``k8s/``:
``base/`` is ``render`` of the defaults, each overlay is a kustomize patch set from ``base`` to its preset.
"""

from __future__ import annotations

import copy
import math
import re
import shlex
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Any, Optional

import yaml

from cluster.engine.pools import STUDENT_RESOURCE, TEACHER_RESOURCE, PoolsConfig
from cluster.deploy.k8s_checks import STUDENT_GROUP, TEACHER_GROUP, check_manifests
from robust.config import load_config

IMAGE = f"robust-distill:{version('robust-distill')}"
WORKDIR = "/app"  # the image's working directory: the entrypoint's recipes/ path is relative to it
RUNS_MOUNT = "/mnt/runs"
DATA_MOUNT = "/mnt/data"
UID = 1000  # the image's non-root user
HEADER = "# Generated from the typed config by cluster/deploy/k8s.py (`robust-distill k8s render`); do not edit by hand.\n"
LABELS = {"app.kubernetes.io/name": "robust-distill", "app.kubernetes.io/managed-by": "robust-distill-k8s-render"}

POD_SECURITY = {"runAsNonRoot": True, "runAsUser": UID, "runAsGroup": UID, "fsGroup": UID,
                "seccompProfile": {"type": "RuntimeDefault"}}
CONTAINER_SECURITY = {"allowPrivilegeEscalation": False, "privileged": False, "readOnlyRootFilesystem": True,
                      "capabilities": {"drop": ["ALL"]}}


@dataclass
class PodSize:
    """The largest worker pod: one node's allocatable resources, or less to scale a pool in smaller steps."""

    gpus: int = 8
    cpus: int = 90  # fits the allocatable share of common 8-GPU machines (96-208 vCPUs, 1.1-2 TiB)
    memory_gib: int = 1000


@dataclass
class K8sConfig:
    name: str = "dad-imagenet"  # the RayJob; the standalone RayCluster is <name>-cluster
    image: str = IMAGE
    recipe: str = "recipes/dad_imagenet.py"
    recipe_args: list[str] = field(default_factory=list)  # dotlist for the recipe; pools.* and run.* are written
    max_pod: PodSize = field(default_factory=PodSize)
    head_cpus: int = 8  # the head runs the driver and Ray Data's read tasks, never pool work
    head_memory_gib: int = 64
    storage_path: str = f"{RUNS_MOUNT}/checkpoints"  # Ray Train checkpoints: under RUNS_MOUNT, or s3://, gs://...
    runs_claim_size: str = "1Ti"  # the run directory (config, metrics, exported students, report)
    runs_access_mode: str = "ReadWriteMany"  # every pod mounts it; ReadWriteOnce only when all share one node
    storage_class: Optional[str] = None  # None: the cluster's default StorageClass
    data_claim: Optional[str] = "robust-distill-data"  # an existing PVC (shards, weights) mounted read-only
    object_store_secret: Optional[str] = None  # a Secret with the object store's credentials (envFrom)
    auth_secret: str = "robust-distill-ray-token"  # a Secret with key auth_token: Ray's token authentication
    backoff_limit: int = 2  # RayJob retries; each builds a new cluster and resumes from the last checkpoint
    ttl_seconds_after_finished: int = 3600
    teacher_idle_timeout_s: int = 300  # an idle teacher pod is removed after this long


@dataclass
class DeployConfig:
    """What ``robust-distill k8s render`` loads: the recipe's pools and the deployment."""

    pools: PoolsConfig = field(default_factory=PoolsConfig)
    k8s: K8sConfig = field(default_factory=K8sConfig)


# Presets of the committed overlays (k8s/overlays/NAME), merged over DeployConfig's defaults (= k8s/base).
OVERLAYS: dict[str, dict[str, Any]] = {
    "single-node": {  # one 8-GPU machine (k3s, microk8s, kind with the GPU operator); 2-GPU pods
        "pools": {"teacher": {"min_actors": 1, "max_actors": 6}, "student": {"num_workers": 2}},
        "k8s": {"max_pod": {"gpus": 2, "cpus": 24, "memory_gib": 120}, "head_cpus": 4, "head_memory_gib": 32,
                "runs_claim_size": "200Gi", "runs_access_mode": "ReadWriteOnce",
                "recipe_args": [f"data.train_shards={DATA_MOUNT}/imagenet/train",
                                f"data.test_shards={DATA_MOUNT}/imagenet/val"]},
    },
    "gpu-cluster": {  # 8-GPU nodes; online DAD wants ~8 teacher GPUs per student GPU (SPEC section 9)
        "pools": {"teacher": {"min_actors": 8, "max_actors": 64}, "student": {"num_workers": 8}},
        "k8s": {"storage_path": "s3://robust-distill/checkpoints", "object_store_secret": "robust-distill-object-store",
                "head_cpus": 16, "head_memory_gib": 128,
                "recipe_args": ["data.train_shards=s3://robust-distill/imagenet/train",
                                "data.test_shards=s3://robust-distill/imagenet/val"]},
    },
}


def load_deploy_config(overlay: str | None = None, overrides: Sequence[str] = ()) -> DeployConfig:
    """DeployConfig's defaults (k8s/base) <- the overlay's preset <- ``pools.*=``/``k8s.*=`` overrides."""
    if overlay is not None and overlay not in OVERLAYS:
        raise ValueError(f"unknown overlay {overlay!r}; choose one of {sorted(OVERLAYS)}")
    return load_config(DeployConfig, presets=[OVERLAYS[overlay]] if overlay else [], overrides=overrides)


@dataclass(frozen=True)
class GroupSize:
    per_pod: int  # teacher actors or student workers one pod holds (its custom resource count)
    gpus: int
    cpus: int
    memory_gib: int
    min_replicas: int
    max_replicas: int


def size_groups(pools: PoolsConfig, max_pod: PodSize) -> dict[str, GroupSize]:
    """Pods per group from the pool sizes: as few pods as fit; student pods are equal (ZeRO's world is fixed)."""
    t, s = pools.teacher, pools.student
    if not 1 <= t.min_actors <= t.max_actors:
        raise ValueError(f"need 1 <= pools.teacher.min_actors <= max_actors, got ({t.min_actors}, {t.max_actors})")
    if s.num_workers < 1:
        raise ValueError(f"pools.student.num_workers must be >= 1, got {s.num_workers}")
    k_t = min(_fit("teacher actor", t.gpus_per_actor, t.cpus_per_actor, max_pod), t.max_actors)
    fit_s = min(_fit("student worker", s.gpus_per_worker, s.cpus_per_worker, max_pod), s.num_workers)
    k_s = max(k for k in range(1, fit_s + 1) if s.num_workers % k == 0)
    n_s = s.num_workers // k_s
    return {TEACHER_GROUP: _group(k_t, t.gpus_per_actor, t.cpus_per_actor, max_pod,
                                  math.ceil(t.min_actors / k_t), math.ceil(t.max_actors / k_t)),
            STUDENT_GROUP: _group(k_s, s.gpus_per_worker, s.cpus_per_worker, max_pod, n_s, n_s)}


def _fit(what: str, gpus: float, cpus: float, max_pod: PodSize) -> int:
    fits = [math.floor(have / each + 1e-9) for have, each in ((max_pod.gpus, gpus), (max_pod.cpus, cpus)) if each > 0]
    fit = min(fits, default=2**31 - 1)
    if fit < 1:
        raise ValueError(f"one {what} needs {gpus:g} GPUs and {cpus:g} CPUs but the largest pod (k8s.max_pod) has "
                         f"{max_pod.gpus} GPUs and {max_pod.cpus} CPUs; raise k8s.max_pod or lower the pool's needs")
    return fit


def _group(k: int, gpus: float, cpus: float, max_pod: PodSize, lo: int, hi: int) -> GroupSize:
    pod_gpus, pod_cpus = math.ceil(round(k * gpus, 6)), max(1, math.ceil(round(k * cpus, 6)))
    share = max(pod_gpus / max_pod.gpus if max_pod.gpus else 0.0, pod_cpus / max_pod.cpus)
    return GroupSize(k, pod_gpus, pod_cpus, max(1, math.floor(share * max_pod.memory_gib)), lo, hi)


def entrypoint(pools: PoolsConfig, cfg: K8sConfig) -> str:
    """``python RECIPE ...``: the user's dotlist, then the run directory, storage and every pool field."""
    owned = [a for a in cfg.recipe_args
             if a.startswith("pools.") or a.split("=")[0] in ("run.out_dir", "run.storage_path")]
    if owned:
        raise ValueError(f"k8s.recipe_args {owned} are set by the renderer: give pool sizes as pools.* of the "
                         "render command and the checkpoint location as k8s.storage_path")
    if "://" not in cfg.storage_path and not cfg.storage_path.startswith(RUNS_MOUNT + "/"):
        raise ValueError(f"k8s.storage_path {cfg.storage_path!r} must be an object-store URI (s3://...) or a path "
                         f"under {RUNS_MOUNT}/ (the shared run volume), so a retried job finds its checkpoints")
    args = [*cfg.recipe_args, f"run.out_dir={RUNS_MOUNT}", f"run.storage_path={cfg.storage_path}"]
    args += [f"pools.{pool}.{key}={value}" for pool, fields in asdict(pools).items() for key, value in fields.items()]
    return " ".join(["python", cfg.recipe, *map(shlex.quote, args)])


def build_objects(pools: PoolsConfig, cfg: K8sConfig) -> list[dict[str, Any]]:
    """RayJob, PersistentVolumeClaim and the standalone RayCluster, as plain dicts."""
    if not re.fullmatch(r"[a-z]([-a-z0-9]{0,37}[a-z0-9])?", cfg.name):
        raise ValueError(f"k8s.name {cfg.name!r} must be a DNS-1035 label of at most 39 characters "
                         "(lower-case letters, digits, '-'): KubeRay derives longer names from it")
    cluster = _cluster_spec(pools, cfg)
    meta = {"labels": dict(LABELS)}
    job = {"apiVersion": "ray.io/v1", "kind": "RayJob", "metadata": {"name": cfg.name, **meta},
           "spec": {"entrypoint": entrypoint(pools, cfg), "shutdownAfterJobFinishes": True,
                    "ttlSecondsAfterFinished": cfg.ttl_seconds_after_finished, "backoffLimit": cfg.backoff_limit,
                    "submitterPodTemplate": _submitter(cfg), "rayClusterSpec": cluster}}
    claim = {"accessModes": [cfg.runs_access_mode], "resources": {"requests": {"storage": cfg.runs_claim_size}}}
    if cfg.storage_class is not None:
        claim["storageClassName"] = cfg.storage_class
    pvc = {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": _runs_claim(cfg), **meta},
           "spec": claim}
    standalone = {"apiVersion": "ray.io/v1", "kind": "RayCluster", "metadata": {"name": f"{cfg.name}-cluster", **meta},
                  "spec": cluster}
    return copy.deepcopy([job, pvc, standalone])  # no dict shared between objects or with the constants


def _runs_claim(cfg: K8sConfig) -> str:
    return f"{cfg.name}-runs"


def _cluster_spec(pools: PoolsConfig, cfg: K8sConfig) -> dict[str, Any]:
    sizes = size_groups(pools, cfg.max_pod)
    head = {"serviceType": "ClusterIP", "rayStartParams": {"num-gpus": "0", "dashboard-host": "0.0.0.0"},
            "template": _pod_template(cfg, "head", cpus=cfg.head_cpus, memory_gib=cfg.head_memory_gib, gpus=0)}
    groups = []
    for name, resource in ((TEACHER_GROUP, TEACHER_RESOURCE), (STUDENT_GROUP, STUDENT_RESOURCE)):
        size = sizes[name]
        group = {"groupName": name, "replicas": size.min_replicas, "minReplicas": size.min_replicas,
                 "maxReplicas": size.max_replicas, "resources": {resource: str(size.per_pod)},
                 "template": _pod_template(cfg, name, cpus=size.cpus, memory_gib=size.memory_gib, gpus=size.gpus)}
        if name == TEACHER_GROUP:
            group["idleTimeoutSeconds"] = cfg.teacher_idle_timeout_s
        groups.append(group)
    autoscaler = {"version": "v2", "upscalingMode": "Default", "idleTimeoutSeconds": 60,
                  "resources": _resources(cpu="500m", memory="512Mi"), "securityContext": CONTAINER_SECURITY,
                  "volumeMounts": _scratch_mounts()}
    return {"rayVersion": version("ray"), "enableInTreeAutoscaling": True, "autoscalerOptions": autoscaler,
            "authOptions": {"mode": "token", "secretName": cfg.auth_secret},
            "headGroupSpec": head, "workerGroupSpecs": groups}


def _resources(*, cpu: str, memory: str, gpus: int = 0) -> dict[str, dict[str, str]]:
    amounts = {"cpu": cpu, "memory": memory} | ({"nvidia.com/gpu": str(gpus)} if gpus else {})
    return {"requests": dict(amounts), "limits": dict(amounts)}  # equal: Guaranteed QoS, Ray reads the limits


def _scratch_mounts() -> list[dict[str, str]]:
    # The root filesystem is read-only: Ray's session dir, caches and the home directory live on emptyDirs.
    return [{"name": "tmp", "mountPath": "/tmp"}, {"name": "home", "mountPath": "/home/ray"}]


def _pod_template(cfg: K8sConfig, component: str, *, cpus: int, memory_gib: int, gpus: int) -> dict[str, Any]:
    mounts = [*_scratch_mounts(), {"name": "dshm", "mountPath": "/dev/shm"},
              {"name": "runs", "mountPath": RUNS_MOUNT}]
    volumes = [{"name": "tmp", "emptyDir": {}}, {"name": "home", "emptyDir": {}},
               {"name": "dshm", "emptyDir": {"medium": "Memory"}},  # Ray's object store and NCCL
               {"name": "runs", "persistentVolumeClaim": {"claimName": _runs_claim(cfg)}}]
    if cfg.data_claim is not None:
        mounts.append({"name": "data", "mountPath": DATA_MOUNT, "readOnly": True})
        volumes.append({"name": "data", "persistentVolumeClaim": {"claimName": cfg.data_claim, "readOnly": True}})
    container = {"name": "ray-head" if component == "head" else "ray-worker", "image": cfg.image,
                 "imagePullPolicy": "IfNotPresent", "workingDir": WORKDIR,
                 "resources": _resources(cpu=str(cpus), memory=f"{memory_gib}Gi", gpus=gpus),
                 "securityContext": CONTAINER_SECURITY, "volumeMounts": mounts}
    if component == "head":
        container["ports"] = [{"name": "gcs-server", "containerPort": 6379},
                              {"name": "dashboard", "containerPort": 8265},
                              {"name": "client", "containerPort": 10001}]
    if cfg.object_store_secret is not None:
        container["envFrom"] = [{"secretRef": {"name": cfg.object_store_secret}}]
    # Autoscaler v2 replaces a failed Ray node instead of restarting it in place.
    spec = {"restartPolicy": "Never", "securityContext": POD_SECURITY, "containers": [container], "volumes": volumes}
    if component != "head":  # the head keeps its token: the autoscaler sidecar talks to the Kubernetes API
        spec["automountServiceAccountToken"] = False
    if gpus:
        spec["tolerations"] = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    return {"metadata": {"labels": {**LABELS, "app.kubernetes.io/component": component}}, "spec": spec}


def _submitter(cfg: K8sConfig) -> dict[str, Any]:
    """The pod that runs ``ray job submit`` (KubeRay fills in its command); only here to be non-root and bounded."""
    container = {"name": "ray-job-submitter", "image": cfg.image, "imagePullPolicy": "IfNotPresent",
                 "resources": _resources(cpu="500m", memory="1Gi"), "securityContext": CONTAINER_SECURITY,
                 "volumeMounts": _scratch_mounts()}
    return {"metadata": {"labels": {**LABELS, "app.kubernetes.io/component": "submitter"}},
            "spec": {"restartPolicy": "Never", "automountServiceAccountToken": False,
                     "securityContext": POD_SECURITY, "containers": [container],
                     "volumes": [{"name": "tmp", "emptyDir": {}}, {"name": "home", "emptyDir": {}}]}}


def render(pools: PoolsConfig, cfg: K8sConfig, *, out_dir: str | Path) -> list[Path]:
    """Write the manifests and a kustomization (RayJob + PVC; the RayCluster is applied on its own)."""
    objects = build_objects(pools, cfg)
    check_manifests(objects, pools=pools)  # never write a manifest that fails the policy or misfits the pools
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [_write(out / _file_name(obj), obj) for obj in objects]
    listed = [p.name for p, obj in zip(paths, objects, strict=True) if obj["kind"] != "RayCluster"]
    kustomization = {"apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization", "resources": listed}
    note = "# The RayCluster (interactive `ray job submit`) is not listed: `kubectl apply -f` it on its own.\n"
    return [*paths, _write(out / "kustomization.yaml", kustomization, note)]


def write_tree(root: str | Path) -> list[Path]:
    """Regenerate ``root/base`` (the defaults) and ``root/overlays/NAME`` (patches from base to each preset)."""
    root = Path(root)
    base = load_deploy_config()
    paths = render(base.pools, base.k8s, out_dir=root / "base")
    base_objects = build_objects(base.pools, base.k8s)
    for name in OVERLAYS:
        cfg = load_deploy_config(name)
        objects = build_objects(cfg.pools, cfg.k8s)
        check_manifests(objects, pools=cfg.pools)
        paths += _write_overlay(root / "overlays" / name, base_objects, objects)
    return paths


def _write_overlay(out: Path, base: list[dict[str, Any]], objects: list[dict[str, Any]]) -> list[Path]:
    """A kustomization over ``../../base``: one RFC 6902 patch per object kustomize builds (not the RayCluster)."""
    out.mkdir(parents=True, exist_ok=True)
    paths, patches = [], []
    for old, new in zip(base, objects, strict=True):
        assert (old["kind"], old["metadata"]["name"]) == (new["kind"], new["metadata"]["name"])
        ops = json_patch(old, new)
        if old["kind"] == "RayCluster" or not ops:
            continue
        group, _, ver = new["apiVersion"].rpartition("/")
        target = {"group": group, "version": ver, "kind": new["kind"], "name": new["metadata"]["name"]}
        paths.append(_write(out / _file_name(new, ".patch.yaml"), ops))
        patches.append({"path": paths[-1].name, "target": {k: v for k, v in target.items() if v}})
    kustomization = {"apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
                     "resources": ["../../base"], "patches": patches}
    note = ("# The RayCluster of this overlay: `robust-distill k8s render --overlay "
            f"{out.name} --out DIR`, then `kubectl apply -f DIR/raycluster-*.yaml`.\n")
    return [*paths, _write(out / "kustomization.yaml", kustomization, note)]


def json_patch(old: Any, new: Any, path: str = "") -> list[dict[str, Any]]:
    """RFC 6902 operations turning ``old`` into ``new``: maps by key, equal-length lists by index."""
    if isinstance(old, dict) and isinstance(new, dict):
        ops = [{"op": "remove", "path": f"{path}/{_escape(k)}"} for k in old if k not in new]
        for key, value in new.items():
            here = f"{path}/{_escape(key)}"
            ops += json_patch(old[key], value, here) if key in old else [{"op": "add", "path": here, "value": value}]
        return ops
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        return [op for i, (a, b) in enumerate(zip(old, new, strict=True)) for op in json_patch(a, b, f"{path}/{i}")]
    same = type(old) is type(new) and old == new
    return [] if same else [{"op": "replace", "path": path, "value": new}]


def _escape(key: str) -> str:
    return key.replace("~", "~0").replace("/", "~1")  # RFC 6901: nvidia.com/gpu -> nvidia.com~1gpu


def _file_name(obj: dict[str, Any], suffix: str = ".yaml") -> str:
    return f"{obj['kind'].lower()}-{obj['metadata']['name']}{suffix}"


class _Dumper(yaml.SafeDumper):
    """No anchors; long one-line strings (the entrypoint) as folded blocks, so diffs of manifests stay readable."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


_Dumper.add_representer(str, lambda d, s: d.represent_scalar(
    "tag:yaml.org,2002:str", s, style=">" if len(s) > 100 and " " in s and "\n" not in s else None))


def _write(path: Path, data: Any, note: str = "") -> Path:
    path.write_text(HEADER + note + yaml.dump(data, Dumper=_Dumper, sort_keys=False, width=100))
    return path
