"""The shard reader: all epochs in one stream, epoch tags, resume skipping, remote URIs (pyarrow), and a
truncated shard that does not end the epoch early."""

from __future__ import annotations

import io
import tarfile
from collections import Counter

import ray
from PIL import Image

from cluster.engine.streams import SKIP, ResumePoint, count_samples, read_raw
from robust.data.shards import make_sample, write_shards
from tests.conftest import N_SMALL


def _rows(ds: ray.data.Dataset) -> list[tuple[int, str]]:
    return [(int(e), str(k)) for b in ds.iter_batches(batch_size=None) for e, k in zip(b["epoch"], b["__key__"])]


def test_epochs_are_tagged_passes_in_one_stream(ray_cluster, small_shards):
    rows = _rows(read_raw(str(small_shards["train"]), epochs=3, seed=1))
    per_epoch = Counter(e for e, _ in rows)
    assert per_epoch == {0: N_SMALL + 1, 1: N_SMALL + 1, 2: N_SMALL + 1}  # + the corrupt sample
    for epoch in range(3):
        assert sorted(k for e, k in rows if e == epoch) == sorted(small_shards["keys"])


def test_resume_point_skips_finished_epochs(ray_cluster, small_shards):
    resume = ResumePoint.remote()
    ray.get(resume.set.remote(2))
    rows = _rows(read_raw(str(small_shards["train"]), epochs=3, resume=resume))
    assert {e for e, _ in rows} == {2} and len(rows) == N_SMALL + 1


def test_file_uri_reads_like_a_local_path(ray_cluster, small_shards):
    uri = small_shards["train"].resolve().as_uri()  # file://... goes through pyarrow's filesystem layer
    assert count_samples(uri) == N_SMALL + 1
    assert sorted(_rows(read_raw(uri, shuffle=False))) == sorted(_rows(read_raw(str(small_shards["train"]), shuffle=False)))


def test_a_truncated_middle_shard_keeps_the_epoch_count(ray_cluster, tmp_path):
    png = io.BytesIO()
    Image.new("RGB", (4, 4)).save(png, format="PNG")
    write_shards([make_sample(f"k{i}", png.getvalue(), i % 10) for i in range(9)], tmp_path, max_per_shard=3,
                 num_classes=10)
    shard = tmp_path / "shard-000001.tar"  # k3, k4, k5: cut before k4's image, on a member boundary
    with tarfile.open(shard) as tar:
        cut = tar.getmember("k4.png").offset
    shard.write_bytes(shard.read_bytes()[:cut])
    batches = read_raw(str(tmp_path), shuffle=False).iter_batches(batch_size=None)
    rows = [(str(k), str(s), png is not None) for b in batches for k, s, png in zip(b["__key__"], b[SKIP], b["png"])]
    assert len(rows) == 9  # the epoch keeps the manifest's count: placeholders for what the damage took
    assert sorted(k for k, skip, has_png in rows if not skip and has_png) == ["k0", "k1", "k2", "k3", "k6", "k7", "k8"]
    assert all("shard-000001" in skip for _, skip, _ in rows if skip)
