"""Damaged data (issue #14 item 5): unusable rows raise one error type with their key and reason, damaged
shards fail verify naming the shard, and a truncated tar read mid-stream yields the samples before the
damage and then a DamagedShard (unusual image modes: tests/test_image_modes.py)."""

from __future__ import annotations

import io
import pickle
import tarfile

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from robust.data import (
    DamagedShard,
    UndecodableSample,
    decode_row,
    index_shards,
    iter_raw_samples,
    load_shards,
    make_sample,
    read_manifest,
    verify_manifest,
    write_shards,
)

from tests.conftest import image_bytes as _save

CONVERT = "robust-distill data convert IMAGEFOLDER OUT"


# ----- decode_row: one decode path per row -----

def _png(value: int = 0, size: int = 4) -> bytes:
    return _save(Image.fromarray(np.full((size, size, 3), value, np.uint8)), "PNG")


def test_decode_row_reads_png_and_jpeg_rows_of_one_batch():
    jpeg = _save(Image.new("RGB", (4, 4), (200, 100, 50)), "JPEG", quality=100)
    image, label = decode_row({"__key__": "a", "png": _png(7), "jpg": None, "cls": b"3"}, num_classes=10)
    assert label == 3 and image.tolist() == [[[7] * 3] * 4] * 4
    image, label = decode_row({"__key__": "b", "png": None, "jpg": jpeg, "cls": 9}, num_classes=10)
    assert label == 9 and np.abs(image.astype(int) - [200, 100, 50]).max() <= 2


@pytest.mark.parametrize(("row", "reason"), [
    ({"cls": b"1"}, "no image field"),
    ({"png": None, "jpg": None, "cls": b"1"}, "no image field"),
    ({"png": b"\x89PNG\r\n\x1a\n garbage", "cls": b"1"}, "undecodable image: OSError: Truncated File Read"),
    ({"png": _png()}, r"no label field \(cls\)"),
    ({"png": _png(), "cls": None}, r"no label field \(cls\)"),
    ({"png": _png(), "cls": b"3.0"}, "label b'3.0' is not an integer"),
    ({"png": _png(), "cls": b"cat"}, "label b'cat' is not an integer"),
    ({"png": _png(), "cls": b"10"}, r"label 10 is not in \[0, 10\)"),
    ({"png": _png(), "cls": b"-1"}, r"label -1 is not in \[0, 10\)"),
    ({"png": _png(), "cls": 2.0}, "label 2.0 is not an integer"),
])
def test_decode_row_rejects_unusable_rows_with_key_and_reason(row, reason):
    with pytest.raises(UndecodableSample, match=reason) as caught:
        decode_row({"__key__": "k7", **row}, num_classes=10)
    assert caught.value.key == "k7" and str(caught.value).startswith("sample k7: ")
    again = pickle.loads(pickle.dumps(caught.value))  # Ray ships errors between processes
    assert (again.key, again.reason, str(again)) == (caught.value.key, caught.value.reason, str(caught.value))


def test_decode_row_without_num_classes_accepts_any_label_from_zero():
    assert decode_row({"__key__": "k", "png": _png(), "cls": b"12345"}, num_classes=None)[1] == 12345
    with pytest.raises(UndecodableSample, match="label -1"):
        decode_row({"__key__": "k", "png": _png(), "cls": b"-1"}, num_classes=None)


# ----- damaged shard sets -----

def _write_set(out, n: int = 9, per_shard: int = 3) -> list[dict]:
    samples = [make_sample(f"k{i}", _png(i, 8), i % 3) for i in range(n)]
    write_shards(samples, out, max_per_shard=per_shard, num_classes=3)
    return samples


def _member_offsets(path) -> dict[str, tuple[int, int]]:
    """Tar member name -> (header offset, data offset)."""
    with tarfile.open(path) as tar:
        return {m.name: (m.offset, m.offset_data) for m in tar.getmembers()}


def test_verify_names_a_truncated_shard_in_the_middle_of_the_set(tmp_path):
    _write_set(tmp_path)
    shard = tmp_path / "shard-000001.tar"
    original = shard.read_bytes()
    offsets = _member_offsets(shard)
    shard.write_bytes(original[: offsets["k4.png"][1] + 20])  # cut inside an image's bytes
    with pytest.raises(ValueError, match=r"shard-000001.tar is truncated or not a tar file .*unexpected end of data"
                                         f".*{CONVERT}"):
        verify_manifest(tmp_path)
    shard.write_bytes(original[: offsets["k4.png"][0]])  # cut on a member boundary: tarfile stops silently
    with pytest.raises(ValueError, match="shard-000001.tar ends at byte .* after 2 samples, without the "
                                         "end-of-archive marker"):
        verify_manifest(tmp_path)
    garbled = bytearray(original)
    garbled[offsets["k4.cls"][0] + 100] ^= 0xFF  # a header's checksum no longer matches
    shard.write_bytes(bytes(garbled))
    with pytest.raises(ValueError, match="shard-000001.tar has a garbled member header"):
        verify_manifest(tmp_path)
    shard.write_bytes(original)
    assert verify_manifest(tmp_path).total == 9


def test_verify_names_changed_empty_missing_and_miscounted_shards(tmp_path):
    _write_set(tmp_path)
    shard = tmp_path / "shard-000002.tar"
    original = shard.read_bytes()
    changed = bytearray(original)
    changed[_member_offsets(shard)["k7.png"][1] + 30] ^= 0x01  # one image bit: the tar is still well formed
    shard.write_bytes(bytes(changed))
    with pytest.raises(ValueError, match=f"shard-000002.tar changed or is corrupt: sha256 .*re-copy.*{CONVERT}"):
        verify_manifest(tmp_path)
    shard.write_bytes(b"")
    with pytest.raises(ValueError, match=r"shard-000002.tar is empty \(0 bytes\)"):
        verify_manifest(tmp_path)
    with wds.TarWriter(str(shard)):
        pass  # a valid tar without a sample
    with pytest.raises(ValueError, match="shard-000002.tar holds no samples"):
        verify_manifest(tmp_path)
    shard.unlink()
    with pytest.raises(ValueError, match=f"shard-000002.tar listed in the manifest is missing; re-copy.*{CONVERT}"):
        verify_manifest(tmp_path)
    with wds.TarWriter(str(shard), mtime=0) as tar:
        tar.write(make_sample("k6", _png(6, 8), 0))  # a whole tar with one of its three samples
    with pytest.raises(ValueError, match="shard-000002.tar holds 1 samples, the manifest records 3"):
        verify_manifest(tmp_path)


def test_index_shards_refuses_a_damaged_foreign_shard(tmp_path):
    _write_set(tmp_path)
    (tmp_path / "manifest.json").unlink()
    shard = tmp_path / "shard-000000.tar"
    shard.write_bytes(shard.read_bytes()[:1500])
    with pytest.raises(ValueError, match="shard-000000.tar ends at byte 1024, after 1 samples"):
        index_shards(tmp_path)  # the cut is inside the second member's header


def test_verify_decode_lists_unusable_samples(tmp_path):
    with wds.TarWriter(str(tmp_path / "part-0.tar")) as tar:
        tar.write({"__key__": "good", "png": _png(1), "cls": 2})
        tar.write({"__key__": "broken", "png": b"\x89PNG\r\n\x1a\nbroken", "cls": 1})
        tar.write({"__key__": "far", "png": _png(2), "cls": 12})
        tar.write({"__key__": "nolabel", "png": _png(3)})
    index_shards(tmp_path, num_classes=10)
    assert verify_manifest(tmp_path).total == 4  # structure and checksums are fine
    with pytest.raises(ValueError) as caught:
        verify_manifest(tmp_path, decode=True)
    message = str(caught.value)
    assert message.startswith(f"3 of 4 samples in {tmp_path} cannot be used: ")
    assert "part-0.tar: sample broken: undecodable image" in message
    assert "part-0.tar: sample far: label 12 is not in [0, 10)" in message
    assert "part-0.tar: sample nolabel: no label field (cls)" in message
    assert "sample good" not in message and "robust-distill data convert" in message


def test_missing_paths_name_the_cli_commands(tmp_path):
    for call in (read_manifest, verify_manifest, load_shards):
        with pytest.raises(ValueError) as caught:
            call(tmp_path / "nonexistent")
        message = str(caught.value)
        assert "nonexistent" in message and "does not exist" in message and CONVERT in message, message
        assert "robust-distill data digits OUT" in message and "write_shards" not in message
    with pytest.raises(ValueError, match=f"has no manifest.json, so it is not a complete shard set; .*{CONVERT}"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(ValueError, match=f"is not a valid shard manifest .*{CONVERT}"):
        read_manifest(tmp_path)
    (tmp_path / "x.tar").write_bytes(b"")
    with pytest.raises(ValueError, match="x.tar is a file, not a shard directory"):
        read_manifest(tmp_path / "x.tar")


# ----- iter_raw_samples: a truncated tar read as a stream -----

@pytest.fixture
def tar_bytes(tmp_path):
    """Six samples (key, png, cls) written with webdataset's TarWriter, and their member offsets."""
    path = tmp_path / "six.tar"
    with wds.TarWriter(str(path), mtime=0) as tar:
        for i in range(6):
            tar.write(make_sample(f"k{i}", _png(i), i))
    return path.read_bytes(), _member_offsets(path)


def _read(data: bytes, expected: int | None) -> tuple[list[dict], DamagedShard | None]:
    samples = []
    try:
        for sample in iter_raw_samples(io.BytesIO(data), url="six.tar", expected=expected):
            samples.append(sample)
    except DamagedShard as err:
        return samples, err
    return samples, None


def _keys(samples: list[dict]) -> list[str]:
    return [s["__key__"] for s in samples]


def test_a_whole_stream_yields_every_sample_byte_for_byte(tar_bytes):
    data, _ = tar_bytes
    samples, err = _read(data, expected=6)
    assert err is None and _keys(samples) == [f"k{i}" for i in range(6)]
    assert [s["png"] for s in samples] == [_png(i) for i in range(6)]
    assert [s["cls"] for s in samples] == [str(i).encode() for i in range(6)]
    assert _keys(_read(data, expected=None)[0]) == _keys(samples)


def test_a_stream_cut_inside_a_member_ends_with_damaged_shard(tar_bytes):
    data, offsets = tar_bytes
    samples, err = _read(data[: offsets["k3.png"][1] + 10], expected=None)  # tarfile raises: no count needed
    assert _keys(samples) == ["k0", "k1", "k2"] and all({"png", "cls"} <= set(s) for s in samples)
    assert (err.url, err.samples_read, err.dropped) == ("six.tar", 3, "k3")
    assert err.reason.startswith("ReadError: unexpected end of data")
    assert str(err).startswith("shard six.tar is damaged: ReadError") and "robust-distill data verify" in str(err)
    samples, err = _read(b"", expected=None)
    assert samples == [] and (err.samples_read, err.dropped) == (0, None) and "empty file" in err.reason


def test_a_stream_cut_on_a_member_boundary_needs_the_manifest_count(tar_bytes):
    data, offsets = tar_bytes
    cut = data[: offsets["k3.png"][0]]  # k3.cls is in, k3.png is not: webdataset stops silently
    samples, err = _read(cut, expected=6)
    assert _keys(samples) == ["k0", "k1", "k2"] and (err.samples_read, err.dropped) == (3, "k3")
    assert "ends after 4 of the 6 samples the manifest records" in err.reason
    samples, err = _read(data[: offsets["k3.cls"][0]], expected=6)  # a cut between samples looks the same
    assert _keys(samples) == ["k0", "k1"] and err.dropped == "k2"
    samples, err = _read(cut, expected=None)  # without the count the cut is invisible: half of k3 comes out
    assert err is None and _keys(samples) == ["k0", "k1", "k2", "k3"] and "png" not in samples[-1]


def test_a_count_the_stream_does_not_match(tar_bytes):
    data, _ = tar_bytes
    samples, err = _read(data, expected=5)
    assert len(samples) == 6 and err.dropped is None and "holds 6 samples, the manifest records 5" in err.reason


def test_shard_dataset_reads_past_a_truncated_middle_shard(tmp_path):
    _write_set(tmp_path)
    shard = tmp_path / "shard-000001.tar"
    shard.write_bytes(shard.read_bytes()[: _member_offsets(shard)["k5.png"][1] + 5])
    loaded = load_shards(tmp_path)
    assert loaded.keys == ["k0", "k1", "k2", "k3", "k4", "k6", "k7", "k8"]  # k5 was in progress: dropped
    assert loaded.skipped == ["k5"] and len(loaded.damaged) == 1
    assert loaded.damaged[0].startswith(f"shard {shard} is damaged: ReadError")
    assert loaded.y_B.tolist() == [0, 1, 2, 0, 1, 0, 1, 2]


def test_shard_dataset_skips_labels_out_of_range(tmp_path):
    with wds.TarWriter(str(tmp_path / "p.tar")) as tar:
        for key, label in (("a", 0), ("b", 5), ("c", 2)):
            tar.write({"__key__": key, "png": _png(label), "cls": label})
    assert load_shards(tmp_path / "p.tar").keys == ["a", "b", "c"]
    loaded = load_shards(tmp_path / "p.tar", num_classes=3)
    assert loaded.keys == ["a", "c"] and loaded.skipped == ["b"]


# ----- convert_folder: unusual modes converted or kept, the rest skipped and listed -----
