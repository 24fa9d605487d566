"""Compact soft targets (the teacher's top-k): the functions, the batch schema, the DAD config, the teacher
pool's producer and the students' loss, all without Ray."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cluster.engine import batch as B
from cluster.engine.tasks import DistillTask
from cluster.jobs import dad
from cluster.jobs.dad import DadConfig, DistillProducer
from robust.attacks.dad import DADConfig
from robust.config import load_config
from robust.data.shard_reader import ShardDataset
from robust.data.shards import encode_png, make_sample, write_shards
from robust.distill import TeacherConfig
from robust.losses.kd import kd_loss
from robust.losses.objectives import ObjectiveConfig
from robust.losses.soft_targets import dense_log_probs, topk_soft_targets
from robust.models.timm_models import TimmConfig

RESNET = TimmConfig(name="test_resnet", num_classes=10)
# the base DAD config of tests/test_hostile_configs.py
DAD_OVERRIDES = ("data.train_shards={train}", "data.test_shards={test}", "pools.student.num_workers=2",
                 "optim.micro_batch_size=16", "data.max_in_flight_mb=1", "teacher.kind=timm",
                 "teacher.timm.name=test_resnet", "teacher.timm.num_classes=10", "student.name=test_resnet",
                 "student.num_classes=10", "student.pretrained=false", "augment.crop_size=32")


def test_top2_of_5_by_hand():
    p = torch.tensor([[0.1, 0.5, 0.05, 0.3, 0.05]])
    index, logp = topk_soft_targets(p.log() + 3.0, k=2)  # logits up to a constant
    assert index.dtype == torch.int64 and logp.dtype == torch.float32
    assert index.tolist() == [[1, 3]]
    torch.testing.assert_close(logp, torch.tensor([[math.log(0.5), math.log(0.3)]]))
    dense = dense_log_probs(index, logp, num_classes=5)
    rest = (1 - 0.5 - 0.3) / 3  # the other 3 classes share the remaining 0.2
    torch.testing.assert_close(dense.exp(), torch.tensor([[rest, 0.5, rest, 0.3, rest]]))
    torch.testing.assert_close(dense.exp().sum(), torch.tensor(1.0))


def test_k_equal_to_the_classes_reproduces_log_softmax():
    logits = torch.randn(8, 7, generator=torch.Generator().manual_seed(0)) * 3
    index, logp = topk_soft_targets(logits, k=7)
    dense = dense_log_probs(index, logp, num_classes=7)
    torch.testing.assert_close(dense, F.log_softmax(logits, dim=1))


def test_a_rest_that_rounds_to_zero_is_floored_at_float32_eps():
    logits = torch.tensor([[30.0, 0.0, 0.0, 0.0]])  # p_0 = 1 in float32: the rest rounds to 0
    dense = dense_log_probs(*topk_soft_targets(logits, k=1), num_classes=4)
    torch.testing.assert_close(dense[0, 1:].exp(), torch.full((3,), torch.finfo(torch.float32).eps / 3))
    student = torch.randn(1, 4)
    assert torch.isfinite(kd_loss(student, dense, 4.0))


def test_the_approximation_improves_with_k():
    logits = torch.randn(64, 100, generator=torch.Generator().manual_seed(1)) * 2
    log_p = F.log_softmax(logits, dim=1)

    def kl(k: int) -> float:
        dense = dense_log_probs(*topk_soft_targets(logits, k=k), num_classes=100)
        return F.kl_div(dense, log_p, reduction="batchmean", log_target=True).item()  # KL(teacher || top-k)

    kls = [kl(k) for k in (1, 5, 20, 50, 99)]
    assert all(a > b for a, b in zip(kls, kls[1:])), kls
    assert kls[0] > 0.1 and kls[-1] < 1e-5


def _rows(n: int = 4, **columns) -> dict:
    return {B.KEY: [f"k{i}" for i in range(n)], B.EPOCH: np.zeros(n, np.int64), B.SEED: np.arange(n),
            B.VALID: np.ones(n, bool), B.SKIP_REASON: [""] * n, B.LABEL: np.arange(n) % 3, **columns}


def test_the_schema_carries_compact_columns_and_one_k_per_batch():
    index, logp = topk_soft_targets(torch.randn(4, 10), k=3)
    batch = B.build(_rows(**{B.TEACHER_TOPK_INDEX: index, B.TEACHER_TOPK_LOGP: logp,
                             B.DAD_TEACHER_TOPK_INDEX: index, B.DAD_TEACHER_TOPK_LOGP: logp}))
    assert batch[B.TEACHER_TOPK_INDEX].dtype == np.int32 and batch[B.TEACHER_TOPK_LOGP].dtype == np.float16
    np.testing.assert_array_equal(batch[B.TEACHER_TOPK_INDEX], index.numpy())
    B.validate(batch, needs=B.compact([B.TEACHER_LOGITS, B.DAD_IMAGE, B.DAD_TEACHER_LOGITS])[:2])
    assert B.compact([B.IMAGE, B.DAD_TEACHER_LOGITS]) == [B.IMAGE, B.DAD_TEACHER_TOPK_INDEX, B.DAD_TEACHER_TOPK_LOGP]
    with pytest.raises(ValueError, match="binds it to"):  # the log-probs of a top-2 beside a top-3
        B.build(_rows(**{B.TEACHER_TOPK_INDEX: index, B.TEACHER_TOPK_LOGP: logp[:, :2]}))
    with pytest.raises(ValueError, match="binds it to"):  # the DAD top-k has the same k
        B.build(_rows(**{B.TEACHER_TOPK_INDEX: index, B.DAD_TEACHER_TOPK_INDEX: index[:, :1]}))
    with pytest.raises(ValueError, match="row shape"):  # one k per row, not a matrix
        B.build(_rows(**{B.TEACHER_TOPK_LOGP: np.zeros((4, 3, 2))}))


def test_the_shard_schema_stores_the_compact_fields(tmp_path):
    index, logp = topk_soft_targets(torch.randn(2, 10), k=3)
    batch = B.build(_rows(2, **{B.TEACHER_TOPK_INDEX: index, B.TEACHER_TOPK_LOGP: logp}))
    samples = [{**make_sample(f"s{i}", encode_png(np.zeros((8, 8, 3), np.uint8)), 1),
                **{B.SHARD_FIELDS[c]: batch[c][i] for c in (B.TEACHER_TOPK_INDEX, B.TEACHER_TOPK_LOGP)}}
               for i in range(2)]
    write_shards(samples, tmp_path, prefix="gen", num_classes=10)
    read = sorted(ShardDataset(str(tmp_path), num_classes=10), key=lambda s: s["__key__"])
    for i, sample in enumerate(read):
        np.testing.assert_array_equal(sample["topk_index"], batch[B.TEACHER_TOPK_INDEX][i])
        np.testing.assert_array_equal(sample["topk_logp"], batch[B.TEACHER_TOPK_LOGP][i])


def _config(small_shards, *extra: str) -> DadConfig:
    base = [o.format(train=small_shards["train"], test=small_shards["test"]) for o in DAD_OVERRIDES]
    return load_config(DadConfig, overrides=[*base, *extra])


@pytest.mark.parametrize("k", [10, 11, -1])
def test_the_dad_check_refuses_a_k_outside_1_to_the_classes(small_shards, k):
    assert dad.check(_config(small_shards, "dad.soft_targets_topk=9")) == 10  # k < K is good
    with pytest.raises(ValueError, match=rf"dad.soft_targets_topk={k} must be 0 .* \[1, 10\)"):
        dad.check(_config(small_shards, f"dad.soft_targets_topk={k}"))


def test_batch_bytes_count_the_compact_columns(small_shards):
    full, compact = (dad.batch_bytes(_config(small_shards, f"dad.soft_targets_topk={k}"), 10) for k in (0, 3))
    batch = _config(small_shards).pools.teacher.batch_size
    # per row: the clean and the DAD target, 10 fp16 logits (20 bytes) each or 3 x (int32 + fp16) (18 bytes) each
    assert full - compact == batch * 2 * (20 - 18)


def test_the_producer_emits_the_top_k_of_the_teacher_logits():
    torch.manual_seed(0)
    teacher = TeacherConfig(kind="timm", timm=RESNET, precision="fp32")
    rng = np.random.default_rng(0)
    batch = B.build(_rows(6, **{B.IMAGE: rng.integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)}))
    full_producer, topk_producer = DistillProducer(teacher, None, DADConfig()), DistillProducer(teacher, None, DADConfig(), topk=4)
    models = full_producer.build(torch.device("cpu"))
    full = full_producer.produce(models, batch, device=torch.device("cpu"))
    compact = topk_producer.produce(models, batch, device=torch.device("cpu"))
    assert set(compact) == {B.TEACHER_TOPK_INDEX, B.TEACHER_TOPK_LOGP}
    index, logp = topk_soft_targets(full[B.TEACHER_LOGITS], k=4)
    torch.testing.assert_close(compact[B.TEACHER_TOPK_INDEX], index)
    torch.testing.assert_close(compact[B.TEACHER_TOPK_LOGP], logp)


@pytest.mark.parametrize("kind", ["kd", "dad_online", "dad_offline"])
def test_distill_loss_on_the_top_k_is_the_loss_on_its_dense_log_probs(kind):
    n, k, rng = 6, 3, np.random.default_rng(0)
    images = _rows(n, **{B.IMAGE: rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8),
                         B.DAD_IMAGE: rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)})
    logits = {c: torch.randn(n, 10, generator=torch.Generator().manual_seed(i)) * 3
              for i, c in enumerate((B.TEACHER_LOGITS, B.DAD_TEACHER_LOGITS))}
    compact = B.build({**images, **{c: v for name, t in logits.items()
                                    for c, v in zip(B.TOPK[name], topk_soft_targets(t, k=k))}})
    # the full-logits batch (fp16) carries what the stored top-k (int32, fp16) expands to
    dense = {name: dense_log_probs(torch.from_numpy(compact[i]), torch.from_numpy(compact[lp]), num_classes=10)
             for name, (i, lp) in B.TOPK.items()}
    as_dense, as_full = B.build({**images, **dense}), B.build({**images, **logits})
    torch.manual_seed(0)
    topk_task, full_task = DistillTask(RESNET, kind, ObjectiveConfig(), topk_targets=True), DistillTask(RESNET, kind, ObjectiveConfig())
    student = topk_task.build().eval()
    B.validate(compact, needs=topk_task.needs)
    assert not set(topk_task.needs) & {B.TEACHER_LOGITS, B.DAD_TEACHER_LOGITS}
    with torch.no_grad():
        loss_topk, terms = topk_task.loss(student, compact, device=torch.device("cpu"))
        loss_dense, dense_terms = full_task.loss(student, as_dense, device=torch.device("cpu"))
        loss_full, _ = full_task.loss(student, as_full, device=torch.device("cpu"))
    # equal up to the fp16 rounding of the dense log-probs in the full-logits column
    torch.testing.assert_close(loss_topk, loss_dense, rtol=1e-3, atol=1e-3)
    assert set(terms) == set(dense_terms)
    assert (loss_topk - loss_full).abs() > 1e-2  # a top-3 of 10 classes is not the teacher's full distribution
