"""Policy and pool-size checks of KubeRay manifests; each failure says what to change.

``check_pools``: the worker groups hold the pools the recipe asks for, one custom-resource unit per teacher
actor / student worker (what cluster/engine/teacher_pool.py and cluster/engine/trainer.py request), with
the GPUs the config gives them. ``check_manifests``: that, for every RayJob (pools read back from its entrypoint), plus
non-root, no privilege escalation, read-only root, requests and limits on every container, ClusterIP-only
head, token authentication and secrets only by reference.
"""

from __future__ import annotations

import math
import re
import shlex
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

from cluster.engine.pools import STUDENT_RESOURCE, TEACHER_RESOURCE, PoolsConfig
from robust.config import load_config

TEACHER_GROUP = "teacher-gpu"
STUDENT_GROUP = "student-gpu"
_SECRET_NAME = re.compile(r"TOKEN|PASSWORD|SECRET|ACCESS_KEY|CREDENTIAL", re.IGNORECASE)


def load_manifests(paths: Iterable[str | Path]) -> list[dict[str, Any]]:
    """Every object in the YAML files (directories: their *.yaml, less kustomize's own files)."""
    files = []
    for path in map(Path, paths):
        files += sorted(path.glob("*.yaml")) if path.is_dir() else [path]
    docs = [doc for f in files if f.name != "kustomization.yaml" and not f.name.endswith(".patch.yaml")
            for doc in yaml.safe_load_all(f.read_text())]
    return [doc for doc in docs if doc]


def pools_from_entrypoint(entrypoint: str) -> PoolsConfig:
    """The PoolsConfig a RayJob's ``pools.*`` overrides give (fields it omits keep their defaults)."""
    overrides = [arg.removeprefix("pools.") for arg in shlex.split(entrypoint) if arg.startswith("pools.")]
    return load_config(PoolsConfig, overrides=overrides)


def check_pools(pools: PoolsConfig, cluster_spec: dict[str, Any]) -> None:
    """Raise ValueError unless the worker groups of ``cluster_spec`` hold exactly the pools' actors and workers."""
    errors = _pool_errors(pools, cluster_spec)
    if errors:
        raise ValueError("the manifests do not fit the pools:\n- " + "\n- ".join(errors))


def check_manifests(objects: Iterable[dict[str, Any]], *, pools: PoolsConfig | None = None) -> None:
    """Raise ValueError listing every policy or pool-size violation; ``pools`` is checked against RayClusters."""
    errors = []
    for obj in objects:
        where = f"{obj.get('kind')} {obj.get('metadata', {}).get('name')}"
        if obj.get("kind") == "Secret":
            errors.append(f"{where}: do not ship Secrets with the manifests; create them in the cluster and "
                          "reference them (authOptions.secretName, envFrom.secretRef)")
        elif obj.get("kind") == "RayJob":
            spec = obj["spec"]
            errors += _cluster_errors(where, spec["rayClusterSpec"])
            errors += [f"{where}: {e}" for e in _pool_errors(pools_from_entrypoint(spec["entrypoint"]),
                                                             spec["rayClusterSpec"])]
            if "submitterPodTemplate" not in spec:
                errors.append(f"{where}: set submitterPodTemplate, else KubeRay's default submitter pod runs as root")
            else:
                errors += _pod_errors(f"{where} submitter", spec["submitterPodTemplate"]["spec"])
        elif obj.get("kind") == "RayCluster":
            errors += _cluster_errors(where, obj["spec"])
            if pools is not None:
                errors += [f"{where}: {e}" for e in _pool_errors(pools, obj["spec"])]
    if errors:
        raise ValueError("manifest check failed:\n- " + "\n- ".join(errors))


def _cluster_errors(where: str, spec: dict[str, Any]) -> list[str]:
    errors = []
    auth = spec.get("authOptions", {})
    if auth.get("mode") != "token" or not auth.get("secretName"):
        errors.append(f"{where}: set authOptions {{mode: token, secretName: <Secret with key auth_token>}}")
    head = spec["headGroupSpec"]
    service = head.get("headService", {}).get("spec", {})
    service_types = {head.get("serviceType", "ClusterIP"), service.get("type", "ClusterIP")}
    if service_types != {"ClusterIP"} or head.get("enableIngress"):
        errors.append(f"{where}: the head (dashboard, job server) must be a ClusterIP service without ingress; "
                      "reach it with `kubectl port-forward`")
    if head.get("rayStartParams", {}).get("num-gpus") != "0":
        errors.append(f"{where}: the head must declare rayStartParams num-gpus: \"0\" (no GPU work on the head)")
    pool_units = {TEACHER_RESOURCE, STUDENT_RESOURCE} & (set(head.get("resources", {})) | _start_resources(head))
    if pool_units:
        errors.append(f"{where}: the head declares pool resources {sorted(pool_units)}; remove them")
    autoscaler = spec.get("autoscalerOptions", {})
    if spec.get("enableInTreeAutoscaling"):
        errors += [f"{where} autoscaler: {e}" for e in _container_errors(autoscaler)]
    errors += _pod_errors(f"{where} head", head["template"]["spec"])
    for group in spec.get("workerGroupSpecs", []):
        errors += _pod_errors(f"{where} {group['groupName']}", group["template"]["spec"])
    return errors


def _start_resources(group: dict[str, Any]) -> set[str]:
    text = group.get("rayStartParams", {}).get("resources", "")
    return set(re.findall(r'\\?"(\w+)\\?"\s*:', text))  # '"{\"teacher\": 8}"' -> {"teacher"}


def _pod_errors(where: str, pod: dict[str, Any]) -> list[str]:
    errors = [f"{where}: {flag} must not be set" for flag in ("hostNetwork", "hostPID", "hostIPC") if pod.get(flag)]
    pod_ctx = pod.get("securityContext", {})
    for c in [*pod.get("initContainers", []), *pod["containers"]]:
        ctx = {**pod_ctx, **c.get("securityContext", {})}
        if not ctx.get("runAsNonRoot") or ctx.get("runAsUser", 1) == 0:
            errors.append(f"{where} {c['name']}: run as non-root (securityContext runAsNonRoot: true, runAsUser > 0)")
        errors += [f"{where} {c['name']}: {e}" for e in _container_errors(c)]
    return errors


def _container_errors(c: dict[str, Any]) -> list[str]:
    ctx, res, errors = c.get("securityContext", {}), c.get("resources", {}), []
    if ctx.get("privileged") or ctx.get("allowPrivilegeEscalation") is not False:
        errors.append("set securityContext privileged: false, allowPrivilegeEscalation: false")
    if ctx.get("readOnlyRootFilesystem") is not True or "ALL" not in ctx.get("capabilities", {}).get("drop", []):
        errors.append("set securityContext readOnlyRootFilesystem: true and capabilities.drop: [ALL]")
    missing = [f"{kind}.{r}" for kind in ("requests", "limits") for r in ("cpu", "memory")
               if r not in res.get(kind, {})]
    if missing:
        errors.append(f"set resources {', '.join(missing)}")
    literal = [e["name"] for e in c.get("env", []) if _SECRET_NAME.search(e["name"]) and "value" in e]
    if literal:
        errors.append(f"env {literal} carry literal secrets; use valueFrom.secretKeyRef")
    return errors


def _pool_errors(pools: PoolsConfig, spec: dict[str, Any]) -> list[str]:
    groups = {g["groupName"]: g for g in spec.get("workerGroupSpecs", [])}
    missing = [name for name in (TEACHER_GROUP, STUDENT_GROUP) if name not in groups]
    if missing:
        return [f"worker groups {missing} are missing; re-render with `robust-distill k8s render`"]
    t, s = pools.teacher, pools.student
    errors = _group_errors(groups[TEACHER_GROUP], TEACHER_RESOURCE, "actor", t.gpus_per_actor, t.cpus_per_actor)
    errors += _group_errors(groups[STUDENT_GROUP], STUDENT_RESOURCE, "worker", s.gpus_per_worker, s.cpus_per_worker)
    if errors:
        return errors
    teacher, student = groups[TEACHER_GROUP], groups[STUDENT_GROUP]
    per_teacher, per_student = int(teacher["resources"][TEACHER_RESOURCE]), int(student["resources"][STUDENT_RESOURCE])
    if per_teacher * teacher["maxReplicas"] < t.max_actors:
        errors.append(f"pools.teacher.max_actors={t.max_actors} but {TEACHER_GROUP} holds at most "
                      f"{teacher['maxReplicas']} pods x {per_teacher} = {per_teacher * teacher['maxReplicas']} actors; "
                      f"raise maxReplicas to {math.ceil(t.max_actors / per_teacher)} or lower max_actors")
    fixed = {student.get("replicas"), student["minReplicas"], student["maxReplicas"]}
    if len(fixed) != 1:
        errors.append(f"{STUDENT_GROUP} must have replicas == minReplicas == maxReplicas: ZeRO's world size cannot "
                      "change during a run")
    elif per_student * student["maxReplicas"] != s.num_workers:
        have = per_student * student["maxReplicas"]
        errors.append(f"pools.student.num_workers={s.num_workers} but {STUDENT_GROUP} provides "
                      f"{student['maxReplicas']} pods x {per_student} = {have} workers "
                      f"({'too few' if have < s.num_workers else 'idle GPUs'}); re-render from the recipe's pools")
    return errors


def _group_errors(group: dict[str, Any], resource: str, unit: str, gpus: float, cpus: float) -> list[str]:
    name, declared = group["groupName"], {**group.get("resources", {})}
    other = ({TEACHER_RESOURCE, STUDENT_RESOURCE} - {resource}) & (set(declared) | _start_resources(group))
    if other:
        return [f"{name} declares {sorted(other)}; a pool's pods declare only {resource!r}"]
    if resource not in declared:
        return [f"{name} must declare its pool's custom resource: resources: {{{resource}: <{unit}s per pod>}}"]
    per_pod = int(declared[resource])
    limits = group["template"]["spec"]["containers"][0].get("resources", {}).get("limits", {})
    pod_gpus, want_gpus = int(limits.get("nvidia.com/gpu", 0)), math.ceil(round(per_pod * gpus, 6))
    errors = []
    if pod_gpus != want_gpus:
        errors.append(f"{name} pods hold {per_pod} {unit}s of {gpus:g} GPUs each, so need nvidia.com/gpu: {want_gpus}, "
                      f"not {pod_gpus}")
    if _cpus(limits.get("cpu", "0")) < per_pod * cpus:
        errors.append(f"{name} pods hold {per_pod} {unit}s of {cpus:g} CPUs each but limit cpu to {limits.get('cpu')}")
    return errors


def _cpus(quantity: str | int | float) -> float:
    text = str(quantity)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)
