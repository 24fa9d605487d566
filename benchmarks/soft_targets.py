"""Compact soft targets: bytes per sample of the teacher's top-k versus its full logits, and what the top-k loses.

Run from the repository root:  .venv/bin/python -m benchmarks.soft_targets     (~10 s, no Ray)
Writes benchmarks/results/soft_targets.json. At K = 1000 classes, for the clean and the DAD targets together
(``teacher_logits`` + ``dad_teacher_logits``, or their top-k columns ``batch.TOPK``):
  - ``schema_bytes``: ``batch.nbytes`` of the columns, what a row costs in the object store and in
    ``batch_bytes``' bound;
  - ``npy_bytes``: the .npy files of an offline shard's fields (``np.save`` of one row's arrays, as
    webdataset encodes them);
  - ``tar_bytes``: what a sample's target fields add to a shard, measured with ``webdataset.TarWriter``
    (each member is a 512-byte header plus its data padded to 512-byte blocks).
And the mean ``KL(full || top-k dense)`` (``robust.losses.kd.kd_loss(dense, full, tau) / tau^2``) over random
teacher logits shaped like a confident ImageNet teacher, at temperature 1 and at the KD temperature 4
(``ObjectiveConfig.tau``), with the top-k stored as the schema stores it (int32, float16) and expanded by
``dense_log_probs`` (and, for the schema's choice, with float32 log-probs: ``kl_tau4_fp32_logp``). The logits: per class 1.5 * N(0, 1); one "true" class per row plus m ~ U(8, 16), and 4
confusable classes plus m * U(0.3, 0.9) each (their statistics are in ``teacher``).
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
import webdataset as wds

from benchmarks.machine import machine, save_result
from cluster.engine import batch as B
from robust.losses.kd import kd_loss
from robust.losses.objectives import ObjectiveConfig
from robust.losses.soft_targets import REST_FLOOR, dense_log_probs, topk_soft_targets

CLASSES, ROWS, KS = 1000, 4096, (5, 10, 20, 50)
FULL = [B.TEACHER_LOGITS, B.DAD_TEACHER_LOGITS]
OUT = Path(__file__).parent / "results" / "soft_targets.json"


def teacher_logits(rows: int, *, generator: torch.Generator) -> torch.Tensor:
    """Confident, ImageNet-like teacher logits (B, CLASSES): see the module docstring."""
    z = 1.5 * torch.randn(rows, CLASSES, generator=generator)
    m = 8 + 8 * torch.rand(rows, 1, generator=generator)
    bonus = m * torch.cat([torch.ones(rows, 1), 0.3 + 0.6 * torch.rand(rows, 4, generator=generator)], dim=1)
    classes = torch.rand(rows, CLASSES, generator=generator).argsort(dim=1)[:, :5]
    return z.scatter_add(1, classes, bonus)


def kl_tau(approx_BK: torch.Tensor, full_BK: torch.Tensor, tau: float) -> float:
    """Mean KL(softmax(full / tau) || softmax(approx / tau)): kd_loss without its tau^2."""
    return (kd_loss(approx_BK, full_BK, tau) / tau**2).item()


def tar_bytes(sample: dict[str, np.ndarray], n: int = 200) -> float:
    """Bytes per sample that ``sample``'s fields take in a webdataset tar (the difference of 2n and n samples)."""
    def size(count: int) -> int:
        buf = io.BytesIO()
        with wds.TarWriter(buf, mtime=0) as tar:
            for i in range(count):
                tar.write({"__key__": f"s{i:06d}", **sample})
        return len(buf.getvalue())

    return (size(2 * n) - size(n)) / n


def storage(columns: dict[str, np.ndarray]) -> dict:
    """A row's target columns (built by the schema) as the object store and an offline shard hold them."""
    row = {B.SHARD_FIELDS[c]: a[0] for c, a in columns.items()}

    def npy(a: np.ndarray) -> int:
        buf = io.BytesIO()
        np.save(buf, a)
        return buf.tell()

    return {"schema_bytes": B.nbytes({c: a.shape[1:] for c, a in columns.items()}),
            "npy_bytes": sum(npy(a) for a in row.values()), "tar_bytes": tar_bytes(row)}


def main() -> None:
    z = teacher_logits(ROWS, generator=torch.Generator().manual_seed(0))
    p = z.softmax(dim=1)
    full = B.build({c: z for c in FULL})
    result = {"classes": CLASSES, "rows": ROWS, "machine": machine(),
              "teacher": {"mean_top1_prob": p.max(1).values.mean().item(),
                          "mean_top5_mass": p.topk(5, dim=1).values.sum(1).mean().item(),
                          "mean_entropy_nats": -(p * p.log()).sum(1).mean().item()},
              "full": storage({c: full[c][:1] for c in FULL}), "topk": {}}
    for k in KS:
        index, logp = topk_soft_targets(z, k=k)
        stored = B.build({c: v for name in FULL for c, v in zip(B.TOPK[name], (index, logp))})  # int32, fp16
        dense = dense_log_probs(*(torch.from_numpy(stored[c]) for c in B.TOPK[B.TEACHER_LOGITS]), num_classes=CLASSES)
        result["topk"][str(k)] = {
            **storage({c: stored[c][:1] for c in B.compact(FULL)}),
            "mean_top_k_mass": logp.exp().sum(1).mean().item(),
            "rows_rest_floored": (1 - logp.half().float().exp().sum(1) < REST_FLOOR).float().mean().item(),
            "kl_tau1": kl_tau(dense, z, 1.0),
            "kl_tau4": kl_tau(dense, z, ObjectiveConfig.tau),
            # the schema's choice of float16 log-probs: the same top-k kept in float32
            "kl_tau4_fp32_logp": kl_tau(dense_log_probs(index, logp, num_classes=CLASSES), z, ObjectiveConfig.tau)}
        print(k, result["topk"][str(k)])
    print("full", result["full"], result["teacher"])
    save_result(OUT, result)


if __name__ == "__main__":
    main()
