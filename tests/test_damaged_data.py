"""Damaged data (issue #14 item 5): unusual image modes convert to the hand-computed RGB, unusable
samples and images raise one error type each, damaged shards fail verify naming the shard, and a
truncated tar read mid-stream yields the samples before the damage and then a DamagedShard."""

from __future__ import annotations

import io
import pickle
import tarfile

import cv2
import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from robust.data import (
    DamagedShard,
    UndecodableImage,
    UndecodableSample,
    convert_folder,
    decode_image,
    decode_row,
    index_shards,
    iter_raw_samples,
    load_shards,
    make_sample,
    read_manifest,
    verify_manifest,
    write_shards,
)

CONVERT = "robust-distill data convert IMAGEFOLDER OUT"


def _save(im: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def _grey(x_HW: np.ndarray) -> np.ndarray:
    return np.repeat(x_HW[..., None], 3, axis=-1)


def _over_white(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Hand computation of alpha compositing over white: round((c a + 255 (255 - a)) / 255)."""
    c, a = rgb.astype(np.int64), alpha.astype(np.int64)[..., None]
    return np.rint((c * a + 255 * (255 - a)) / 255).astype(np.uint8)


# ----- decode_image: every mode to uint8 RGB -----

def test_grey_and_bilevel_repeat_to_three_channels():
    x = np.array([[0, 1, 127, 255]], np.uint8)
    assert np.array_equal(decode_image(_save(Image.fromarray(x), "PNG")), _grey(x))
    bits = Image.fromarray(np.array([[True, False]]))  # mode "1"
    assert bits.mode == "1" and decode_image(_save(bits, "PNG")).tolist() == [[[255] * 3, [0] * 3]]


def test_16_bit_grey_scales_to_8_bit_instead_of_clipping():
    v = np.array([[0, 128, 129, 257, 1000, 32767, 32896, 65278, 65535]], np.uint16)
    expected = np.array([[0, 0, 1, 1, 4, 127, 128, 254, 255]], np.uint8)  # round(v / 257) by hand
    png = _save(Image.fromarray(v), "PNG")
    with Image.open(io.BytesIO(png)) as im:
        assert im.mode == "I;16"
        clipped = np.asarray(im.convert("RGB"))[0, :, 0].tolist()
    assert clipped == [0, 128, 129, 255, 255, 255, 255, 255, 255]  # what PIL's convert("RGB") makes of it
    assert np.array_equal(decode_image(png), _grey(expected))
    big_endian = _save(Image.fromarray(v.astype(">u2")), "TIFF")
    with Image.open(io.BytesIO(big_endian)) as im:
        assert im.mode == "I;16B"
    assert np.array_equal(decode_image(big_endian), _grey(expected))


def test_32_bit_int_and_float_grey():
    i32 = np.array([[-5, 0, 1000, 65535, 70000]], np.int32)  # mode I: the 16-bit scale, clipped
    assert np.array_equal(decode_image(_save(Image.fromarray(i32), "TIFF")), _grey(np.array([[0, 0, 4, 255, 255]])))
    f32 = np.array([[-3.0, 0.4, 0.6, 127.2, 254.7, 300.0, np.nan]], np.float32)  # mode F: PIL's 0..255 scale
    with Image.open(io.BytesIO(_save(Image.fromarray(f32), "TIFF"))) as im:
        assert im.mode == "F"
    assert np.array_equal(decode_image(_save(Image.fromarray(f32), "TIFF")),
                          _grey(np.array([[0, 0, 1, 127, 255, 255, 0]])))


def _palette_image() -> Image.Image:
    im = Image.new("P", (4, 1))
    im.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255, 10, 20, 30])
    im.putdata([0, 1, 2, 3])
    return im


def test_palette_maps_to_its_colours_and_transparency_composites_over_white():
    colours = [[255, 0, 0], [0, 255, 0], [0, 0, 255], [10, 20, 30]]
    assert decode_image(_save(_palette_image(), "PNG")).tolist() == [colours]
    assert decode_image(_save(_palette_image(), "GIF")).tolist() == [colours]
    assert decode_image(_save(_palette_image(), "PNG", transparency=1)).tolist() == [
        [[255, 0, 0], [255, 255, 255], [0, 0, 255], [10, 20, 30]]]
    alpha = np.array([255, 0, 128, 64], np.uint8)  # one alpha per palette entry (PNG tRNS)
    decoded = decode_image(_save(_palette_image(), "PNG", transparency=alpha.tobytes()))
    assert np.array_equal(decoded, _over_white(np.array([colours]), alpha[None]))


def test_alpha_composites_over_white():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (6, 7, 4), dtype=np.uint8)
    x[0, 0, 3], x[0, 1, 3] = 0, 255  # fully transparent: white whatever its stored colour; opaque: as stored
    decoded = decode_image(_save(Image.fromarray(x, "RGBA"), "PNG"))
    assert np.array_equal(decoded, _over_white(x[..., :3], x[..., 3]))
    assert decoded[0, 0].tolist() == [255, 255, 255] and decoded[0, 1].tolist() == x[0, 1, :3].tolist()
    la = np.stack([x[..., 0], x[..., 3]], axis=-1)
    la_over_white = _grey(_over_white(la[..., :1], la[..., 1])[..., 0])
    assert np.array_equal(decode_image(_save(Image.fromarray(la, "LA"), "PNG")), la_over_white)
    rgb = Image.fromarray(np.array([[[1, 2, 3], [4, 5, 6]]], np.uint8))  # tRNS: one colour is transparent
    assert decode_image(_save(rgb, "PNG", transparency=(1, 2, 3))).tolist() == [[[255, 255, 255], [4, 5, 6]]]


def test_16_bit_rgb_png_keeps_the_high_byte():
    rng = np.random.default_rng(1)
    v = rng.integers(0, 65536, (5, 6, 3), dtype=np.uint16)
    v[0, :3] = [[0, 257, 32896], [65535, 65280, 255], [257 * 7, 257 * 200, 257 * 255]]
    ok, png = cv2.imencode(".png", v[..., ::-1])  # OpenCV writes BGR; PIL cannot write 16-bit RGB
    assert ok
    decoded = decode_image(png.tobytes())
    assert np.array_equal(decoded, (v >> 8).astype(np.uint8))
    assert np.abs(decoded.astype(int) - np.rint(v / 257)).max() <= 1  # never more than one level off
    assert decoded[0, 2].tolist() == [7, 200, 255]  # 8-bit data scaled by 257 comes back exactly


def test_cmyk_jpeg_converts_with_adobe_polarity():
    cmyk = (10, 200, 50, 30)
    jpeg = _save(Image.new("CMYK", (16, 16), cmyk), "JPEG", quality=100)
    with Image.open(io.BytesIO(jpeg)) as im:
        assert im.mode == "CMYK" and "adobe" in im.info  # Adobe APP14 segment: inverted CMYK in the file
    c, m, y, k = cmyk
    expected = [(255 - c) * (255 - k) / 255, (255 - m) * (255 - k) / 255, (255 - y) * (255 - k) / 255]  # 216, 49, 181
    decoded = decode_image(jpeg)
    assert decoded.shape == (16, 16, 3)
    assert np.abs(decoded.astype(float) - expected).max() <= 1.5  # JPEG at quality 100 on a flat colour


def test_decompression_bombs_are_refused_before_decoding(monkeypatch):
    # 100 M pixels: over PIL.Image.MAX_IMAGE_PIXELS (89.5 M), under twice that, where PIL only warns
    warned = _save(Image.new("1", (10_000, 10_000)), "PNG")
    with pytest.warns(Image.DecompressionBombWarning), pytest.raises(UndecodableImage, match="MAX_IMAGE_PIXELS"):
        decode_image(warned)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(UndecodableImage, match="DecompressionBombError"):
        decode_image(_save(Image.new("L", (15, 15)), "PNG"))  # 225 > 2 x 100: PIL's own error, wrapped
    assert decode_image(_save(Image.new("L", (10, 10), 9), "PNG")).tolist() == [[[9] * 3] * 10] * 10  # at the limit


@pytest.mark.parametrize("data", [b"", b"not an image", None])
def test_non_images_raise_undecodable_image(data):
    with pytest.raises(UndecodableImage):
        decode_image(data)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_images_raise_undecodable_image(fmt):
    x = np.random.default_rng(2).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    data = _save(Image.fromarray(x), fmt)
    with pytest.raises(UndecodableImage):
        decode_image(data[: len(data) // 2])


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

def test_convert_folder_keeps_or_converts_unusual_modes_and_skips_the_rest(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 8x8 images pass; the bombs below do not
    root = tmp_path / "images"
    (root / "a").mkdir(parents=True)
    (root / "b").mkdir()
    v16 = np.full((8, 8), 257 * 40 + 100, np.uint16)  # round(v / 257) = 40
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 200, 128
    files = {
        "a/grey.png": _save(Image.new("L", (8, 8), 90), "PNG"),
        "a/deep.png": _save(Image.fromarray(v16), "PNG"),
        "a/cmyk.jpg": _save(Image.new("CMYK", (8, 8), (0, 0, 0, 55)), "JPEG", quality=100),
        "a/palette.gif": _save(_palette_image().resize((8, 8)), "GIF"),
        "b/alpha.tiff": _save(Image.fromarray(rgba, "RGBA"), "TIFF"),
        "b/bomb.png": _save(Image.new("L", (11, 11)), "PNG"),  # 121 pixels: PIL would only warn
        "b/cut.jpg": _save(Image.new("RGB", (8, 8), (1, 2, 3)), "JPEG")[:100],
        "b/notes.txt": b"not an image",
    }
    for name, data in files.items():
        (root / name).write_bytes(data)
    with pytest.warns(Image.DecompressionBombWarning):
        report = convert_folder(root, tmp_path / "shards", workers=2)

    reasons = dict(report.skipped)
    assert sorted(reasons) == [str(root / n) for n in ("b/bomb.png", "b/cut.jpg", "b/notes.txt")]
    assert "MAX_IMAGE_PIXELS" in reasons[str(root / "b/bomb.png")]
    assert all(r.startswith("UndecodableImage") for r in reasons.values())
    listed = [line.split("\t") for line in (tmp_path / "shards" / "skipped.tsv").read_text().splitlines()]
    assert listed == [[p, " ".join(r.split())] for p, r in report.skipped]
    kept = ["a/cmyk.jpg", "a/deep.png", "a/grey.png", "a/palette.gif", "b/alpha.tiff"]  # sorted per class
    raw = [dict(r) for r in wds.WebDataset([str(tmp_path / "shards" / s.name) for s in report.manifest.shards],
                                           shardshuffle=False, nodesplitter=None)]
    assert [("jpg" in r, r.get("jpg", r.get("png"))) for r in raw[:3]] == [
        (True, files["a/cmyk.jpg"]), (False, files["a/deep.png"]), (False, files["a/grey.png"])]  # byte for byte
    assert all("png" in r and r["png"][:8] == b"\x89PNG\r\n\x1a\n" for r in raw[3:])  # GIF, TIFF: now PNG
    loaded = load_shards(tmp_path / "shards")
    assert len(loaded.keys) == len(kept) and loaded.y_B.tolist() == [0, 0, 0, 0, 1]
    pixels = (loaded.x_BCHW * 255).round().to(int)[:, :, 0, 0].tolist()  # top-left pixel of each, RGB
    assert np.abs(np.array(pixels[0]) - 200).max() <= 1  # CMYK K=55: 255 - 55, through JPEG
    assert pixels[1:3] == [[40, 40, 40], [90, 90, 90]]
    assert pixels[3] == [255, 0, 0]  # palette entry 0
    assert pixels[4] == _over_white(rgba[:1, :1, :3], rgba[:1, :1, 3])[0, 0].tolist() == [227, 127, 127]
