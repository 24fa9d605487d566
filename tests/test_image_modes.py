"""Unusual image modes (issue #14 item 5): every mode decodes to the hand-computed uint8 RGB, unusable
images raise UndecodableImage, and `robust-distill data convert` keeps or converts them and skips the rest."""

from __future__ import annotations

import io

import cv2
import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from robust.data import UndecodableImage, convert_folder, decode_image, load_shards
from tests.conftest import image_bytes as _save


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


# ----- convert_folder: the unusual modes of a folder -----

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
