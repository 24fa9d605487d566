"""The student pool on a real multi-node Ray cluster with real DeepSpeed on gloo: ZeRO stages 0, 1 and 3
export what their engines trained (DeepSpeed's own consolidation of the final checkpoint), and make the same
updates whether a step is 2 micro-batches of 8 or one of 16. ZeRO-2, the default, runs in tests/test_faults.py
(with EMA, a lost node and an exact resume)."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
from safetensors.torch import load_file

from cluster.engine.deepspeed_config import OptimConfig
from cluster.engine.pools import PoolsConfig, StudentPoolConfig, TeacherPoolConfig
from cluster.engine.prepare import Augment
from cluster.engine.runner import DataConfig, RunConfig, train
from cluster.engine.streams import ResumePoint, sample_stream
from cluster.engine.tasks import DistillTask
from cluster.engine.tracking import LoggingConfig
from cluster.engine.trainer import CKPT_TAG
from robust.losses.objectives import ObjectiveConfig
from robust.models.timm_models import TimmConfig
from robust.train_transforms import TrainAugConfig
from tests.conftest import EVEN

CROP = TrainAugConfig(crop_size=32, scale=[0.7, 1.0], ratio=[0.9, 1.1], hflip=0.0, interpolation="bilinear",
                      auto_augment="", color_jitter=0.0, re_prob=0.0, mixup=0.0, cutmix=0.0, label_smoothing=0.0)
VIT = TimmConfig(name="test_vit", num_classes=10, img_size=32)  # LayerNorm only: per-sample, like the loss


def _latest_checkpoint(storage: Path) -> Path:
    return sorted(p for p in storage.glob("*/checkpoint_*") if p.is_dir())[-1]


def _export(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


EXPORTS: dict[int, dict[str, torch.Tensor]] = {}


@pytest.mark.parametrize("stage, micro, accum", [(0, 16, 1), (1, 8, 2), (3, 8, 2)])
def test_each_zero_stage_exports_what_its_engine_trained(ray_cluster, even_shards, tmp_path, stage, micro, accum):
    run = RunConfig(name=f"zero{stage}", out_dir=str(tmp_path), epochs=1, checkpoint_every=100, log_every=100)
    pools = PoolsConfig(TeacherPoolConfig(batch_size=32), StudentPoolConfig(2, 0, 1))
    resume = ResumePoint.remote()
    stream = sample_stream(str(even_shards), Augment(CROP, 10), epochs=1, seed=0, batch_size=32, num_classes=10,
                           resume=resume)
    optim = OptimConfig(zero_stage=stage, micro_batch_size=micro, grad_accum=accum, lr=1e-3, warmup_epochs=0.5)
    trained = train({"ce": DistillTask(VIT, "ce", ObjectiveConfig())}, stream, tmp_path / "run", name=run.name, run=run,
                    seed=0, data=DataConfig(max_in_flight_mb=64), pools=pools, optim=optim, total=EVEN,
                    batch_bytes=32 * 32 * 32 * 3, resume=resume, logging=LoggingConfig(tensorboard=False))["ce"]
    exported = _export(trained.path)
    # the engine's own final state: DeepSpeed's checkpoint, consolidated by DeepSpeed (ZeRO-3 partitions too)
    ckpt = _latest_checkpoint(Path(run.out_dir) / run.name / "ray") / "ce"
    if stage == 0:
        engine = torch.load(ckpt / CKPT_TAG / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    else:
        engine = get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag=CKPT_TAG)
    engine = {k.removeprefix("model."): v for k, v in engine.items()}
    assert engine.keys() == exported.keys()
    assert all(torch.equal(exported[k], engine[k].float()) for k in engine)
    # plain timm rebuilds it with the engine's outputs
    rebuilt = timm.create_model(f"local-dir:{trained.path}", pretrained=True).eval()
    reference = timm.create_model("test_vit", num_classes=10, img_size=32).eval()
    reference.load_state_dict(engine)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), reference(x), rtol=0, atol=0)
    # every stage and micro-batching makes the same updates: 2 x 8 accumulated is 1 x 16 (fp32 noise)
    EXPORTS[stage] = exported
    if 0 in EXPORTS and stage != 0:
        first = EXPORTS[0]
        moved = max((first[k] - v).abs().max().item() for k, v in exported.items())
        assert moved < 1e-5, f"ZeRO-{stage} with {micro} x {accum} differs from ZeRO-0 with 16 x 1 by {moved}"

