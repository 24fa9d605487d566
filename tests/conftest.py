"""Shared fixtures: a real multi-node Ray cluster on this machine, and small digits shards (one corrupt sample)."""

from __future__ import annotations

import io
import os
import time
from dataclasses import dataclass, field

import pytest
from PIL import Image

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
# Ray Train's controller polls its workers every 2 s by default; on these short runs that is most of a
# transition (start, checkpoint registration, finish). The product keeps Ray's default.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")

N_SMALL = 192  # digits in the small training shard set
EVEN = 256  # digits in 4 shards of 64: 8 teacher batches of 32 per epoch, equal halves for two ranks
STORE = 150 * 2**20  # object store bytes of each node


def pytest_collection_modifyitems(config, items):
    """Tests marked ``cuda`` run where there is a GPU (benchmarks/gpu_check.sh runs them) and skip elsewhere."""
    import torch

    if not torch.cuda.is_available():
        for item in items:
            if "cuda" in item.keywords:
                item.add_marker(pytest.mark.skip(reason="needs a CUDA device (benchmarks/gpu_check.sh runs it)"))


@dataclass
class LocalCluster:
    """``ray.cluster_utils.Cluster``: a head (the driver, read tasks) plus teacher nodes (the "teacher"
    resource) and student nodes (the "student" resource), each its own raylet and object store."""

    cluster: object
    teachers: list = field(default_factory=list)
    students: list = field(default_factory=list)

    def add(self, kind: str):
        cpus = 2 if kind == "teacher" else 1
        node = self.cluster.add_node(num_cpus=cpus, resources={kind: 1}, object_store_memory=STORE)
        (self.teachers if kind == "teacher" else self.students).append(node)
        self.cluster.wait_for_nodes()
        return node

    def remove(self, node) -> None:
        """Kill the node's raylet (as a preempted or crashed node goes) and wait until the GCS says it is dead."""
        import ray

        self.cluster.remove_node(node, allow_graceful=False)
        for nodes in (self.teachers, self.students):
            if node in nodes:
                nodes.remove(node)
        deadline = time.monotonic() + 60
        while any(n["NodeID"] == node.node_id and n["Alive"] for n in ray.nodes()):
            assert time.monotonic() < deadline, "the removed node is still alive in the GCS"
            time.sleep(0.2)

    def restore(self) -> None:
        """Back to two nodes of each pool (after a test removed some)."""
        for kind, nodes in (("teacher", self.teachers), ("student", self.students)):
            while len(nodes) < 2:
                self.add(kind)


@pytest.fixture(scope="session")
def ray_cluster():
    """One cluster for the session: a head with 2 CPUs, 2 teacher nodes (2 CPUs each), 2 student nodes."""
    import ray
    from ray.cluster_utils import Cluster

    # The GCS declares a node dead after 3 missed health checks of 1 s (Ray's default: 5 of 3 s), so a removed
    # node stops receiving work in seconds, as a cluster tuned for preemptible nodes would.
    fast_failure = {"health_check_period_ms": 1000, "health_check_failure_threshold": 3, "health_check_timeout_ms": 1000}
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "object_store_memory": STORE,
                                                            "include_dashboard": True, "_system_config": fast_failure})
    handle = LocalCluster(cluster)
    handle.restore()
    ray.init(address=cluster.address, log_to_driver=False)
    yield handle
    ray.shutdown()
    cluster.shutdown()


def image_bytes(im: Image.Image, fmt: str, **kwargs) -> bytes:
    """``im`` encoded by PIL as ``fmt`` (PNG, JPEG, GIF, TIFF ...)."""
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


@pytest.fixture(scope="session")
def small_shards(tmp_path_factory):
    """N_SMALL digits (32 px) in 3 shards (and the same in 25 small ones), plus one sample with
    undecodable image bytes."""
    from robust.data.digits import digits_arrays
    from robust.data.shards import make_sample, write_shards

    x, y, x_test, y_test = digits_arrays()
    root = tmp_path_factory.mktemp("shards")
    samples = [make_sample(f"d{i:04d}", image_bytes(Image.fromarray(x[i]), "PNG"), int(y[i])) for i in range(N_SMALL)]
    samples.insert(50, make_sample("corrupt", b"\x89PNG\r\n\x1a\nthis is not an image", 3))
    write_shards(samples, root / "train", prefix="train", max_per_shard=70, num_classes=10)
    write_shards(samples, root / "train_fine", prefix="train", max_per_shard=8, num_classes=10)  # 25 shards
    test = [make_sample(f"t{i:04d}", image_bytes(Image.fromarray(x_test[i]), "PNG"), int(y_test[i])) for i in range(96)]
    write_shards(test, root / "test", prefix="test", max_per_shard=50, num_classes=10)
    return {"train": root / "train", "train_fine": root / "train_fine", "test": root / "test",
            "keys": [s["__key__"] for s in samples]}


TINY_CLIP = {  # a CLIP architecture small enough for a test: ViT 2 x 32 wide at 32 px, text 2 x 32
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory):
    """``local-dir:<folder>`` of a random-weight tiny CLIP (open_clip's own folder format: config + weights),
    so that every process (teacher actors included) builds the same model; nothing is downloaded."""
    import json

    import open_clip
    import torch
    from safetensors.torch import save_file

    folder = tmp_path_factory.mktemp("tiny_clip")
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_CLIP}))
    torch.manual_seed(0)
    model = open_clip.create_model(f"local-dir:{folder}")
    save_file(model.state_dict(), folder / "open_clip_model.safetensors")
    return f"local-dir:{folder}"


@pytest.fixture(scope="session")
def even_shards(tmp_path_factory):
    """EVEN digits in 4 shards of 64, nothing damaged."""
    from robust.data.digits import digits_arrays
    from robust.data.shards import encode_png, make_sample, write_shards

    x, y, _, _ = digits_arrays()
    out = tmp_path_factory.mktemp("even")
    write_shards((make_sample(f"e{i:04d}", encode_png(x[i]), int(y[i])) for i in range(EVEN)), out,
                 max_per_shard=64, num_classes=10)
    return out
