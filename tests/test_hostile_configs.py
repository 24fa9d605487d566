"""Hostile configs: every recipe refuses wrong types, unknown keys, negative sizes, empty lists, unknown
methods, paths that do not exist and pools larger than the cluster before any Ray work starts, with a
message that names the key (and what to set)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cluster.jobs import dad, evaluation, robust_teacher, rpt
from cluster.jobs.dad import DadConfig
from cluster.jobs.evaluation import EvaluationConfig
from cluster.jobs.robust_teacher import RobustTeacherJobConfig
from cluster.jobs.rpt import RptConfig
from robust.config import load_config
from robust.models.timm_models import TimmConfig, build_timm, export_timm

REPO = Path(__file__).resolve().parents[1]
SHARDS = ("data.train_shards={train}", "data.test_shards={test}", "pools.student.num_workers=2",
          "optim.micro_batch_size=16")
DAD = (*SHARDS, "data.max_in_flight_mb=1", "teacher.kind=timm", "teacher.timm.name=test_resnet", "teacher.timm.num_classes=10",
       "student.name=test_resnet", "student.num_classes=10", "student.pretrained=false", "augment.crop_size=32")
RPT = (*SHARDS, "large.timm.name=test_vit", "large.timm.num_classes=10", "large.timm.img_size=32",
       "large.timm.pretrained=false", "large.tune_fraction=0.2", "robust_teacher.name=test_resnet",
       "robust_teacher.num_classes=10", "augment.crop_size=32")
TEACHER = (*SHARDS, "train.model.name=test_resnet", "train.model.num_classes=10", "augment.crop_size=32")

# (recipe, the override that breaks it, what the message must say)
CASES = [
    ("dad", "run.epochs=two", "run.epochs"),  # a wrong type
    ("dad", "dadd.eps=1", "dadd"),  # an unknown key
    ("dad", "run.epochs=0", "run.epochs"),
    ("dad", "optim.micro_batch_size=-4", "optim.micro_batch_size"),
    ("dad", "pools.teacher.min_actors=0", "pools.teacher"),
    ("dad", "pools.student.cpus_per_worker=-1", "pools.student"),
    ("dad", "pools.teacher.batch_size=0", "pools.teacher.batch_size"),
    ("dad", "data.max_in_flight_mb=0", "data.max_in_flight_mb"),
    ("dad", "pools.teacher.batch_size=3000", "data.max_in_flight_mb=1 holds fewer than two batches"),
    ("dad", "pools.student.nice=20", "pools.student.nice"),
    ("dad", "run.methods=[]", "run.methods"),
    ("dad", "run.methods=[ce,daad]", "run.methods"),
    ("dad", "run.seeds=[1,1]", "run.seeds"),
    ("dad", "dad.mode=sometimes", "dad.mode"),
    ("dad", "dad.steps=0", "dad.steps"),
    ("dad", "dad.norm=l3", "dad.norm"),
    ("dad", "augment.crop_size=0", "augment.crop_size"),
    ("dad", "augment.mixup=-1", "augment.mixup"),
    ("dad", "eval.corruptions=[fog,glare]", "eval.corruptions"),
    ("dad", "eval.severities=[]", "eval.severities"),
    ("dad", "teacher.kind=vit", "teacher.kind"),
    ("dad", "teacher.precision=fp8", "teacher.precision"),
    ("dad", "student.name=resnet_typo", "student.name"),
    ("dad", "student.num_classes=7", "class counts differ.*student 7"),
    ("dad", "data.train_shards=/nonexistent/shards", "/nonexistent/shards does not exist.*robust-distill data convert"),
    ("dad", "data.test_shards=/nonexistent/test", "/nonexistent/test does not exist"),
    ("dad", "teacher.timm.checkpoint=/nonexistent/teacher.safetensors", "teacher.timm.checkpoint"),
    ("dad", "vqgan.checkpoint=/nonexistent/vqgan.ckpt", "vqgan.checkpoint"),
    ("rpt", "run.methods=[rtp]", "run.methods"),
    ("rpt", "run.methods=[rpt,wise_ft]", "add full_finetune to run.methods"),
    ("rpt", "run.wise_alphas=[1.5]", "run.wise_alphas"),
    ("rpt", "large.tune_fraction=1.5", "tune_fraction"),
    ("rpt", "select.passes=1", "passes"),
    ("rpt", "precision=half", "precision"),
    ("rpt", "robust_teacher.num_classes=7", "class counts differ"),
    ("rpt", "robust_teacher.checkpoint=/nonexistent/teacher", "robust_teacher.checkpoint"),
    ("rpt", "large.timm.name=vit_typo", "large.timm.name"),
    ("teacher", "train.augmentations=[augmix,cutout]", "augmentations"),
    ("teacher", "train.deepaugment.copies=0", "train.deepaugment.copies"),
    ("teacher", "train.deepaugment.checkpoint=/nonexistent/cae.pt", "train.deepaugment.checkpoint"),
    ("teacher", "train.model.num_classes=3", "class counts differ"),
    ("teacher", "run.log_every=-1", "run.log_every"),
    ("eval", "models=[]", "no models"),
    ("eval", "sets=[]", "no sets"),
    ("eval", "models=[/nonexistent/model]", "/nonexistent/model"),
    ("eval", "models=[timm:resnet_typo]", "resnet_typo"),
    ("eval", "eval.batch_size=0", "eval.batch_size"),
    ("eval", "pools.min_actors=3", "pools needs 1 <= min_actors <= max_actors"),  # max_actors is 2 in the base
    # fields that nothing read are gone: setting one is a typo like any other
    ("dad", "pools.teacher.max_batches_in_flight=4", "max_batches_in_flight"),
    ("dad", "objective.kind=dad_online", "objective.kind"),  # the method chooses it
    ("dad", "objective.label_smoothing=0.1", "objective.label_smoothing"),  # it is augment.label_smoothing
    ("teacher", "train.epochs=5", "train.epochs"),  # the job's epochs are run.epochs
    ("teacher", "train.lr=0.1", "train.lr"),  # and its optimizer is optim.*
    ("eval", "pools.batch_size=8", "pools.batch_size"),  # the evaluation's batches are eval.batch_size
]

RECIPES = {"dad": (DadConfig, DAD, dad.check), "rpt": (RptConfig, RPT, rpt.check),
           "teacher": (RobustTeacherJobConfig, TEACHER, robust_teacher.check),
           "eval": (EvaluationConfig, (), evaluation.check)}


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    cfg = TimmConfig(name="test_resnet", num_classes=10)
    return export_timm(build_timm(cfg), cfg, tmp_path_factory.mktemp("export"))


def _overrides(recipe: str, shards: dict, export: Path) -> list[str]:
    if recipe == "eval":
        return [f"models=[{export}]", "pools.max_actors=2",
                f"sets=[{{kind: shards, root: {shards['test']}, name: clean, image_size: 32, shifted: false}}]"]
    return [o.format(train=shards["train"], test=shards["test"]) for o in RECIPES[recipe][1]]


@pytest.mark.parametrize("recipe, override, message", CASES)
def test_a_bad_value_fails_before_ray_naming_the_key(small_shards, export, recipe, override, message):
    schema, _, check = RECIPES[recipe]
    base = _overrides(recipe, small_shards, export)
    check(load_config(schema, overrides=base))  # the base config is good
    with pytest.raises(ValueError, match=message):  # check() is what a recipe runs before it starts Ray
        check(load_config(schema, overrides=[*base, override]))


def test_pools_larger_than_the_cluster_fail_with_the_ray_start_flags(ray_cluster, small_shards, tmp_path):
    cfg = load_config(DadConfig, overrides=[*_overrides("dad", small_shards, tmp_path), f"run.out_dir={tmp_path}",
                                            "pools.student.num_workers=5", "pools.student.gpus_per_worker=0",
                                            "pools.teacher.gpus_per_actor=0"])
    with pytest.raises(ValueError, match=re.escape("student: need 5, cluster has 2") + ".*ray start --head"):
        dad.run(cfg)
    assert not (tmp_path / cfg.run.name / "ce").exists()  # no training started


def test_the_recipe_command_says_what_to_pass():
    done = subprocess.run([sys.executable, str(REPO / "recipes" / "dad_imagenet.py"), "run.epochs=1"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert "data.train_shards=" in done.stderr and "preset=local" in done.stderr
