"""The shard reader: all epochs in one stream, epoch tags, resume skipping, and remote URIs (pyarrow)."""

from __future__ import annotations

from collections import Counter

import ray

from cluster.pipeline import ResumePoint, count_samples, read_raw
from tests.conftest import N_SMALL


def _rows(ds: ray.data.Dataset) -> list[tuple[int, str]]:
    return [(int(e), str(k)) for b in ds.iter_batches(batch_size=None) for e, k in zip(b["epoch"], b["__key__"])]


def test_epochs_are_tagged_passes_in_one_stream(ray_local, small_shards):
    rows = _rows(read_raw(str(small_shards["train"]), epochs=3, seed=1))
    per_epoch = Counter(e for e, _ in rows)
    assert per_epoch == {0: N_SMALL + 1, 1: N_SMALL + 1, 2: N_SMALL + 1}  # + the corrupt sample
    for epoch in range(3):
        assert sorted(k for e, k in rows if e == epoch) == sorted(small_shards["keys"])


def test_resume_point_skips_finished_epochs(ray_local, small_shards):
    resume = ResumePoint.remote()
    ray.get(resume.set.remote(2))
    rows = _rows(read_raw(str(small_shards["train"]), epochs=3, resume=resume))
    assert {e for e, _ in rows} == {2} and len(rows) == N_SMALL + 1


def test_file_uri_reads_like_a_local_path(ray_local, small_shards):
    uri = small_shards["train"].resolve().as_uri()  # file://... goes through pyarrow's filesystem layer
    assert count_samples(uri) == N_SMALL + 1
    assert sorted(_rows(read_raw(uri, shuffle=False))) == sorted(_rows(read_raw(str(small_shards["train"]), shuffle=False)))
