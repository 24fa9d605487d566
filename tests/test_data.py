"""robust.data: shards round-trip byte-exact, manifests catch damage, folders convert, digits split."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from robust.data import (
    build_digits_shards,
    class_names_of,
    convert_folder,
    digits_arrays,
    index_shards,
    load_shards,
    make_sample,
    read_manifest,
    verify_manifest,
    write_shards,
)


def _encode(x_HWC: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(x_HWC).save(buf, format=fmt)
    return buf.getvalue()


def _random_image(rng: np.random.Generator, size: int = 12) -> np.ndarray:
    return rng.integers(0, 256, (size, size, 3), dtype=np.uint8)


def _raw_samples(shard_dir) -> list[dict]:
    urls = [str(shard_dir / s.name) for s in read_manifest(shard_dir).shards]
    return list(wds.WebDataset(urls, shardshuffle=False, nodesplitter=None))


def test_shards_round_trip_byte_exact(tmp_path):
    rng = np.random.default_rng(0)
    images = [_random_image(rng) for _ in range(7)]
    fields = ["png" if i % 2 else "jpg" for i in range(7)]
    data = [_encode(x, "PNG" if f == "png" else "JPEG") for x, f in zip(images, fields)]
    labels = [3, 0, 1, 2, 3, 1, 0]
    samples = [make_sample(f"k{i}", d, y, image_field=f) for i, (d, y, f) in enumerate(zip(data, labels, fields))]
    manifest = write_shards(samples, tmp_path, max_per_shard=3, class_names=list("abcd"))

    assert [s.name for s in manifest.shards] == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    assert [s.count for s in manifest.shards] == [3, 3, 1] and manifest.total == 7
    assert json.loads((tmp_path / "manifest.json").read_text())["class_names"] == ["a", "b", "c", "d"]
    raw = _raw_samples(tmp_path)
    assert [r["__key__"] for r in raw] == [f"k{i}" for i in range(7)]
    assert [r[f] for r, f in zip(raw, fields)] == data  # the source bytes, byte for byte
    assert [int(r["cls"]) for r in raw] == labels

    loaded = load_shards(tmp_path)
    assert loaded.y_B.tolist() == labels and loaded.skipped == [] and loaded.extras == {}
    assert loaded.x_BCHW.shape == (7, 3, 12, 12)
    # PNG is lossless: decoded pixels equal the source exactly
    assert torch.equal(loaded.x_BCHW[1], torch.from_numpy(images[1]).permute(2, 0, 1).float() / 255)
    # the same samples give the same tar bytes (fixed mtime), so checksums are reproducible
    again = write_shards(samples, tmp_path / "again", max_per_shard=3)
    assert [s.sha256 for s in again.shards] == [s.sha256 for s in manifest.shards]


def test_extras_round_trip(tmp_path):
    rng = np.random.default_rng(1)
    x, x_dad = _random_image(rng), _random_image(rng)
    logits = rng.normal(size=5).astype(np.float32) * 10
    dad_logits = rng.normal(size=5).astype(np.float32)
    sample = make_sample("s0", _encode(x, "PNG"), 4, logits=logits, dad_image=_encode(x_dad, "PNG"),
                         dad_logits=dad_logits)
    write_shards([sample], tmp_path, num_classes=5)

    raw = _raw_samples(tmp_path)[0]
    assert set(raw) >= {"png", "cls", "logits.npy", "dad.png", "dad.logits.npy"}
    stored = np.load(io.BytesIO(raw["logits.npy"]))
    assert stored.dtype == np.float16 and np.array_equal(stored, logits.astype(np.float16))
    loaded = load_shards(tmp_path)
    assert torch.equal(loaded.extras["logits"][0], torch.from_numpy(logits.astype(np.float16)).float())
    assert torch.equal(loaded.extras["dad_logits"][0], torch.from_numpy(dad_logits.astype(np.float16)).float())
    assert torch.equal(loaded.extras["dad_image"][0], torch.from_numpy(x_dad).permute(2, 0, 1).float() / 255)
    assert loaded.y_B.tolist() == [4]


def test_manifest_detects_changed_missing_and_miscounted_shards(tmp_path):
    rng = np.random.default_rng(2)
    samples = [make_sample(f"k{i}", _encode(_random_image(rng), "PNG"), 0) for i in range(4)]
    write_shards(samples, tmp_path, max_per_shard=2)
    assert verify_manifest(tmp_path).total == 4

    shard = tmp_path / "shard-000001.tar"
    original = shard.read_bytes()
    changed = bytearray(original)
    changed[700] ^= 0xFF
    shard.write_bytes(bytes(changed))
    with pytest.raises(ValueError, match="shard-000001.tar changed"):
        verify_manifest(tmp_path)
    shard.unlink()
    with pytest.raises(ValueError, match="shard-000001.tar .*missing"):
        verify_manifest(tmp_path)
    shard.write_bytes(original)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    manifest["shards"][0]["count"] = 3
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="shard-000000.tar holds 2 samples, the manifest records 3"):
        verify_manifest(tmp_path)


def test_corrupt_sample_is_skipped_and_counted(tmp_path):
    rng = np.random.default_rng(3)
    good = [make_sample(f"k{i}", _encode(_random_image(rng), "PNG"), i) for i in range(3)]
    bad = make_sample("bad", b"\x89PNG\r\n\x1a\n not really a png", 1)
    write_shards([good[0], bad, good[1], good[2]], tmp_path)
    loaded = load_shards(tmp_path)
    assert loaded.skipped == ["bad"]
    assert loaded.keys == ["k0", "k1", "k2"] and loaded.y_B.tolist() == [0, 1, 2]


def test_writer_rejects_bad_samples_and_existing_shards(tmp_path):
    png = _encode(np.zeros((4, 4, 3), np.uint8), "PNG")
    with pytest.raises(ValueError, match="duplicate sample key 'a'"):
        write_shards([make_sample("a", png, 0), make_sample("a", png, 1)], tmp_path / "dup")
    with pytest.raises(ValueError, match="without '.'"):
        write_shards([make_sample("a.b", png, 0)], tmp_path / "dot")
    with pytest.raises(ValueError, match="label 7"):
        write_shards([make_sample("a", png, 7)], tmp_path / "label", num_classes=5)
    write_shards([make_sample("a", png, 0)], tmp_path / "ok")
    with pytest.raises(ValueError, match="already holds shards"):
        write_shards([make_sample("a", png, 0)], tmp_path / "ok")
    assert write_shards([make_sample("b", png, 0)], tmp_path / "ok", overwrite=True).total == 1


def test_folder_with_one_corrupt_image_converts_the_rest(tmp_path, capsys):
    rng = np.random.default_rng(4)
    root = tmp_path / "images"
    sources = {}
    for cls in ("dog", "cat"):
        (root / cls).mkdir(parents=True)
        for i, fmt in enumerate(("PNG", "JPEG", "PNG")):
            path = root / cls / f"{i}.{'png' if fmt == 'PNG' else 'JPEG'}"
            path.write_bytes(_encode(_random_image(rng, 16), fmt))
            sources[path] = path.read_bytes()
    corrupt = root / "dog" / "1.JPEG"
    corrupt.write_bytes(sources.pop(corrupt)[:200])  # truncated JPEG: header fine, pixels missing

    report = convert_folder(root, tmp_path / "shards", max_per_shard=2, workers=2)

    assert report.class_names == ["cat", "dog"]
    assert [p for p, _ in report.skipped] == [str(corrupt)]
    assert report.manifest.total == 5 and read_manifest(tmp_path / "shards").class_names == ["cat", "dog"]
    raw = _raw_samples(tmp_path / "shards")
    stored = [r.get("png", r.get("jpg")) for r in raw]
    expected = sorted(sources, key=lambda p: (p.parent.name, p.name))
    assert stored == [sources[p] for p in expected]  # original bytes, no re-encode, sorted order
    assert [int(r["cls"]) for r in raw] == [0, 0, 0, 1, 1]
    assert str(corrupt) in capsys.readouterr().out


def test_numeric_class_folders_sort_numerically(tmp_path):
    root = tmp_path / "images"
    for name in ("2", "10", "1"):
        (root / name).mkdir(parents=True)
        # the pixel value encodes the folder name, so each label can be traced to its folder
        (root / name / "a.png").write_bytes(_encode(np.full((4, 4, 3), int(name), np.uint8), "PNG"))
    report = convert_folder(root, tmp_path / "shards", workers=1)
    assert report.class_names == ["1", "2", "10"]
    loaded = load_shards(tmp_path / "shards")
    folder_of_label = {int(y): int(round(float(x[0, 0, 0]) * 255)) for x, y in zip(loaded.x_BCHW, loaded.y_B)}
    assert folder_of_label == {0: 1, 1: 2, 2: 10}
    (root / "x").mkdir()
    assert class_names_of(root) == ["1", "10", "2", "x"]  # not all integers: plain lexicographic


def test_digits_split_sizes_and_stratified_balance():
    x_train, y_train, x_test, y_test = digits_arrays()
    assert x_train.shape == (1347, 32, 32, 3) and x_test.shape == (450, 32, 32, 3)
    assert x_train.dtype == np.uint8 and y_train.shape == (1347,) and y_test.shape == (450,)
    assert np.array_equal(x_train[..., 0], x_train[..., 2]) and x_train.max() == 255
    n_k = np.bincount(np.concatenate([y_train, y_test]), minlength=10)
    test_k = np.bincount(y_test, minlength=10)
    assert n_k.tolist() == [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]
    assert np.all(np.abs(test_k - n_k * 450 / 1797) <= 1), test_k  # stratified: each class ~25% in test


def test_build_digits_shards_is_idempotent_and_matches_arrays(tmp_path):
    dirs = build_digits_shards(tmp_path)
    shard = tmp_path / "test" / read_manifest(dirs["test"]).shards[0].name
    mtime = shard.stat().st_mtime_ns
    assert build_digits_shards(tmp_path) == dirs and shard.stat().st_mtime_ns == mtime  # not rewritten
    _, _, x_test, y_test = digits_arrays()
    loaded = load_shards(dirs["test"])
    assert torch.equal(loaded.x_BCHW, torch.from_numpy(x_test).permute(0, 3, 1, 2).float() / 255)
    assert torch.equal(loaded.y_B, torch.from_numpy(y_test))
    assert read_manifest(dirs["train"]).total == 1347
    assert read_manifest(dirs["train"]).class_names == [str(i) for i in range(10)]
    shard.write_bytes(b"damaged")
    build_digits_shards(tmp_path)  # a shard that no longer verifies triggers a rebuild
    assert verify_manifest(dirs["test"]).total == 450


def test_missing_shard_path_is_a_clear_value_error(tmp_path):
    with pytest.raises(ValueError, match="nope.tar does not exist"):
        load_shards(tmp_path / "nope.tar")
    write_shards([make_sample("a", _encode(np.zeros((4, 4, 3), np.uint8), "PNG"), 0)], tmp_path / "s")
    with pytest.raises(ValueError, match="shard-000001.tar does not exist"):
        load_shards(str(tmp_path / "s" / "shard-{000000..000001}.tar"))
    (tmp_path / "s" / "shard-000000.tar").unlink()
    with pytest.raises(ValueError, match="shard-000000.tar does not exist"):
        load_shards(tmp_path / "s")  # listed in the manifest, gone from disk
    with pytest.raises(ValueError, match="no manifest.json"):
        verify_manifest(tmp_path)


def test_index_shards_builds_a_manifest_for_foreign_shards(tmp_path):
    png = _encode(np.zeros((4, 4, 3), np.uint8), "PNG")
    for shard, keys in (("part-b.tar", ["c"]), ("part-a.tar", ["a", "b"])):  # as another writer (Ray) names them
        with wds.TarWriter(str(tmp_path / shard)) as tar:
            for key in keys:
                tar.write({"__key__": key, "png": png, "cls": 1, "logits.npy": np.zeros(3, np.float16)})
    manifest = index_shards(tmp_path, class_names=["x", "y", "z"])
    assert [(s.name, s.count) for s in manifest.shards] == [("part-a.tar", 2), ("part-b.tar", 1)]
    assert verify_manifest(tmp_path) == manifest and manifest.num_classes == 3
    assert load_shards(tmp_path).keys == ["a", "b", "c"]
