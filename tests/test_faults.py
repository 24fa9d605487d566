"""A DAD run on damaged data, with an object store far smaller than an epoch, that loses a teacher node
mid-epoch: it completes; every usable sample is trained on exactly once per epoch; the unusable ones are
counted and named in the metrics; the metrics show the teacher pool shrink and recover; the stream stays
within its bound without spilling."""

from __future__ import annotations

import io
import json
import re
import tarfile
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import ray
from PIL import Image
from ray.util.state import list_actors

from cluster.jobs.dad import check, train_students
from robust.data.digits import digits_arrays
from robust.data.shards import make_sample, write_shards
from tests.test_training import _dad_cfg, _metrics

ROWS = 320  # 5 shards of 64 rows: 5 steps of 64 per epoch
CROP = 64  # 4x the bytes of a digit: an epoch of DAD rows (~7.9 MB) is 4x the object-store bound


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _jpeg(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=95)
    return buf.getvalue()


@pytest.fixture(scope="module")
def damaged_shards(tmp_path_factory) -> tuple[Path, set[str], set[str]]:
    """(shard dir, keys that must train, keys that must be skipped): 4 shards of digits (the third cut
    after 40 of its 64 samples) and a fifth that holds unusual modes, a decompression bomb and a bad label."""
    x, y, _, _ = digits_arrays()
    out = tmp_path_factory.mktemp("damaged")
    digits = [make_sample(f"d{i:04d}", _png(Image.fromarray(x[i])), int(y[i])) for i in range(256)]
    grey = Image.fromarray(x[300][..., 0])
    odd = {"grey": (_png(grey), "png"), "palette": (_png(grey.convert("P")), "png"),
           "rgba": (_png(Image.fromarray(x[301]).convert("RGBA")), "png"),
           "deep": (_png(Image.fromarray(x[302][..., 0].astype(np.uint16) * 257)), "png"),
           "cmyk": (_jpeg(Image.fromarray(x[303]).convert("CMYK")), "jpg")}
    fifth = [make_sample(k, data, 3, image_field=field) for k, (data, field) in odd.items()]
    fifth.append(make_sample("bomb", _png(Image.new("1", (10_000, 10_000))), 1))  # 100 M pixels in a few kB
    fifth.append(make_sample("badlabel", _png(Image.fromarray(x[304])), 12))  # 10 classes: out of range
    fifth += [make_sample(f"f{i:04d}", _png(Image.fromarray(x[310 + i])), int(y[310 + i])) for i in range(64 - 7)]
    write_shards(digits + fifth, out, max_per_shard=64)  # a manifest without a class count: the job's 10 hold
    third = out / "shard-000002.tar"
    with tarfile.open(third) as tar:  # cut inside the 41st sample's image: the shard breaks mid-stream
        member = tar.getmember(f"d{2 * 64 + 40:04d}.png")
    third.write_bytes(third.read_bytes()[: member.offset_data + 100])
    lost = {f"d{i:04d}" for i in range(2 * 64 + 40, 3 * 64)}
    keys = {s["__key__"] for s in digits + fifth} - lost - {"bomb", "badlabel"}
    return out, keys, {"bomb", "badlabel"} | {f"shard-000002:missing:{i}" for i in range(40, 64)}


def _teacher_nodes() -> dict[str, int]:
    gcs = ray.get_runtime_context().gcs_address
    actors = list_actors(address=gcs, filters=[("state", "=", "ALIVE")], detail=True, raise_on_missing_output=False)
    return Counter(a.node_id for a in actors if "teacher" in (a.required_resources or {}))


def _spilled_mib() -> float:
    from ray._private.internal_api import memory_summary

    found = re.search(r"Spilled (\d+) MiB", memory_summary(stats_only=True))
    return float(found.group(1)) if found else 0.0


def test_a_dad_run_survives_damaged_data_a_small_store_and_a_lost_teacher_node(ray_cluster, damaged_shards, tmp_path):
    shards, usable, unusable = damaged_shards
    cfg = _dad_cfg(shards, tmp_path, "faults")
    cfg.run.methods, cfg.run.epochs, cfg.run.log_keys = ["dad"], 3, True
    cfg.augment.crop_size, cfg.data.max_in_flight_mb = CROP, 2
    cfg.pools.teacher.min_actors = cfg.pools.teacher.max_actors = 2
    check(cfg)
    spilled_before = _spilled_mib()
    done: dict = {}
    worker = threading.Thread(target=lambda: done.update(train_students(cfg, seed=0, classes=10)))
    worker.start()
    log = tmp_path / "faults" / "dad"
    deadline = time.monotonic() + 600

    def wait(what: str, condition) -> None:
        while not condition():
            assert worker.is_alive() and time.monotonic() < deadline, f"the run ended (or stalled) before {what}"
            time.sleep(0.2)

    wait("two teacher actors served a logged step", lambda: any(r.get("teacher_actors_alive") == 2 for r in _metrics(log)))
    node_id = next(iter(_teacher_nodes()))
    lost = next(n for n in ray_cluster.teachers if n.node_id == node_id)
    ray_cluster.remove(lost)  # it holds an actor with batches in flight
    wait("a step with one actor", lambda: _metrics(log)[-1].get("teacher_actors_alive") == 1)
    ray_cluster.add("teacher")  # a replacement joins; the pool restarts its actor there
    worker.join(timeout=600)
    assert not worker.is_alive() and set(done) == {"dad"}

    rows = _metrics(log)
    alive = [r["teacher_actors_alive"] for r in rows]
    shrank = alive.index(1)
    assert alive[0] == 2 and 2 in alive[shrank:], f"the pool did not shrink and recover: {alive}"
    assert rows[-1]["step"] == 3 * ROWS // 64
    trained = [json.loads(line) for f in sorted((tmp_path / "faults").glob("keys.rank*.jsonl"))
               for line in f.read_text().splitlines()]
    for epoch in range(3):
        keys = Counter(r["key"] for r in trained if r["epoch"] == epoch)
        assert set(keys) == usable and set(keys.values()) == {1}, f"epoch {epoch}: not every usable key exactly once"
    skipped = Counter(k.split(": ")[0] for r in rows for k in r["skipped_keys"])
    assert skipped == Counter({k: 3 for k in unusable}), "each unusable sample is named once per epoch"
    reasons = {k.split(": ")[0]: k.split(": ", 1)[1] for r in rows for k in r["skipped_keys"]}
    assert "MAX_IMAGE_PIXELS" in reasons["bomb"] and "not in [0, 10)" in reasons["badlabel"]
    assert "shard-000002.tar" in reasons["shard-000002:missing:40"]
    # memory: within the bound (+ Ray Data's block per operator in flight), and nothing spilled to disk
    row_bytes = 2 * CROP * CROP * 3 + 3 * 10 * 4
    assert max(r["object_store_bytes"] for r in rows) <= 2 * 2**20 + 4 * 32 * row_bytes
    assert _spilled_mib() == spilled_before
