"""The torch corruption suite: contract of ``corrupt`` for all 19 corruptions x 5 severities, and its
building blocks against the code they reproduce (imagecorruptions, scipy, OpenCV) on the same inputs.

The statistical comparison with ``imagecorruptions`` is tests/test_corruption_fidelity.py.
"""

from __future__ import annotations

import json
import warnings
from importlib.metadata import version
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from reference_corruptions import from_uint8_hwc, to_uint8_hwc
from scipy.ndimage import gaussian_filter, map_coordinates

import robust.eval.corruptions as corruptions
from robust.eval.corruptions import ALL, corrupt
from robust.eval.corruptions import _filters as ops
from robust.eval.corruptions.blur import local_copies
from robust.eval.corruptions.digital import box_then_nearest
from robust.eval.corruptions.noise import poisson_8bit
from robust.eval.corruptions.weather import FROST_FILES, frost_photo_paths, frost_texture_source

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # pkg_resources deprecation
    import imagecorruptions
    from imagecorruptions import corruptions as ic

SEVERITIES = (1, 2, 3, 4, 5)
# Same output whatever the generator; the other eleven draw from it.
DETERMINISTIC = (
    "defocus_blur", "zoom_blur", "gaussian_blur", "brightness", "contrast", "saturate", "pixelate",
    "jpeg_compression",
)  # fmt: skip
RANDOM = tuple(n for n in ALL if n not in DETERMINISTIC)
# Mean |change| grows with severity in the reference (checked on photos and digits). Not here: glass_blur,
# snow, frost, fog, spatter and saturate have severities whose parameters do less damage than the one
# before; pixelate's damage hangs on how its grid meets the edges (the reference is not monotone on
# these images either).
MONOTONE = (
    "gaussian_noise", "shot_noise", "impulse_noise", "speckle_noise", "defocus_blur", "motion_blur",
    "zoom_blur", "gaussian_blur", "brightness", "contrast", "elastic_transform", "jpeg_compression",
)  # fmt: skip


def images(size: int, batch: int = 3, seed: int = 0) -> torch.Tensor:
    """Smooth colour fields with a few sharp edges: blur, JPEG and pixelation all have work to do."""
    g = torch.Generator().manual_seed(seed)
    x = F.interpolate(torch.rand(batch, 3, 6, 6, generator=g), size=(size, size), mode="bicubic")
    x[..., size // 3 : size // 2, :] = torch.rand(batch, 3, 1, 1, generator=g)
    x[..., :, size // 4 : size // 4 + 3] = 0.9
    return x.clamp(0, 1)


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def mean_change(name: str, x: torch.Tensor, severity: int) -> float:
    return (corrupt(x, name, severity, generator=seeded(1)) - x).abs().mean().item()


# ---- the contract of corrupt()


@pytest.mark.parametrize("name", ALL)
def test_every_severity_keeps_shape_dtype_range_and_changes_the_image(name: str):
    x = images(32)
    for severity in SEVERITIES:
        out = corrupt(x, name, severity, generator=seeded(severity))
        assert out.shape == x.shape and out.dtype == torch.float32
        assert out.min() >= 0 and out.max() <= 1
        assert (out - x).abs().mean() > 1.5 / 255, f"{name} severity {severity} is nearly a no-op"
    out64 = corrupt(images(48, batch=2).double(), name, 3, generator=seeded(0))
    assert out64.dtype == torch.float64 and out64.shape == (2, 3, 48, 48) and 0 <= out64.min() <= out64.max() <= 1


@pytest.mark.parametrize("shape", [(1, 3, 3, 2), (2, 3, 19, 45)])
def test_any_image_size_works(shape: tuple[int, ...]):
    # The reference needs 32 px or more; here blurs pad past tiny borders and pixelate keeps >= 1 block.
    x = torch.rand(shape, generator=seeded(0))
    for name in ALL:
        for severity in (1, 5):
            out = corrupt(x, name, severity, generator=seeded(1))
            assert out.shape == x.shape and torch.isfinite(out).all() and 0 <= out.min() <= out.max() <= 1, name


def test_strided_inputs_give_the_same_images():
    # Images decoded from HWC arrays arrive channels-last; crops arrive as views.
    x = images(32, batch=2)
    for strided in (x.contiguous(memory_format=torch.channels_last), torch.cat([x, x], -1)[..., 32:]):
        for name in ALL:
            a, b = corrupt(x, name, 3, generator=seeded(2)), corrupt(strided, name, 3, generator=seeded(2))
            assert (a - b).abs().mean() < 1e-4, name


def test_cpu_chunks_give_the_same_images_as_one_batch(monkeypatch: pytest.MonkeyPatch):
    x = images(32, batch=5)
    whole = {name: corrupt(x, name, 2) for name in DETERMINISTIC}
    monkeypatch.setattr(corruptions, "CPU_CHUNK_BYTES", 2 * 4 * x[0].numel())  # chunks of 2, 2 and 1 images
    for name in DETERMINISTIC:
        torch.testing.assert_close(corrupt(x, name, 2), whole[name], atol=1e-6, rtol=0)
    noisy = corrupt(x, "gaussian_noise", 3, generator=seeded(4))  # random ones still follow the generator
    assert torch.equal(noisy, corrupt(x, "gaussian_noise", 3, generator=seeded(4)))


def test_cpu_batches_above_a_huge_page_give_the_same_images():
    # Their output is memory advised for huge pages; image by image it is an ordinary tensor.
    x = images(192, batch=5)
    assert x.numel() * 4 >= corruptions.HUGE_PAGE_BYTES > x[:1].numel() * 4
    for name in ("contrast", "pixelate", "jpeg_compression"):
        alone = torch.cat([corrupt(x[i : i + 1], name, 3) for i in range(5)])
        torch.testing.assert_close(corrupt(x, name, 3), alone, atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", RANDOM)
def test_random_corruptions_follow_the_generator(name: str):
    x = images(32, batch=2)
    a = corrupt(x, name, 3, generator=seeded(5))
    assert torch.equal(a, corrupt(x, name, 3, generator=seeded(5)))
    assert not torch.equal(a, corrupt(x, name, 3, generator=seeded(6)))


@pytest.mark.parametrize("name", DETERMINISTIC)
def test_deterministic_corruptions_ignore_the_generator_and_treat_images_independently(name: str):
    x = images(64, batch=3)
    batch = corrupt(x, name, 4, generator=seeded(0))
    assert torch.equal(batch, corrupt(x, name, 4, generator=seeded(1)))
    alone = torch.cat([corrupt(x[i : i + 1], name, 4) for i in range(3)])
    torch.testing.assert_close(batch, alone, atol=1e-6, rtol=0)


@pytest.mark.parametrize("size", [32, 64])
def test_damage_grows_with_severity_where_the_reference_parameters_make_it_grow(size: int):
    x = images(size, batch=4)
    for name in MONOTONE:
        damage = [mean_change(name, x, s) for s in SEVERITIES]
        assert all(a < b for a, b in zip(damage, damage[1:])), (name, damage)


def test_bad_arguments_raise_value_error():
    x = images(32, batch=1)
    with pytest.raises(ValueError, match="unknown corruption"):
        corrupt(x, "fogg", 1)
    for severity in (0, 6):
        with pytest.raises(ValueError, match="severity"):
            corrupt(x, "fog", severity)
    with pytest.raises(ValueError, match="3 channels"):
        corrupt(x[:, :1], "contrast", 1)
    with pytest.raises(ValueError, match="float"):
        corrupt((x * 255).to(torch.uint8), "contrast", 1)


# ---- exact values against imagecorruptions


def _photo(size: int) -> tuple[np.ndarray, torch.Tensor]:
    from PIL import Image
    from skimage.data import astronaut

    img = np.array(Image.fromarray(astronaut()).resize((size, size), Image.BICUBIC))
    return img, torch.from_numpy(img).permute(2, 0, 1)[None].float() / 255


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return (10 * torch.log10(1 / (a.double() - b.double()).pow(2).mean())).item()


@pytest.mark.parametrize("size", [32, 64])
@pytest.mark.parametrize("name", ["brightness", "contrast", "saturate", "zoom_blur", "defocus_blur", "pixelate"])
def test_deterministic_corruptions_match_imagecorruptions(name: str, size: int):
    img, x = _photo(size)
    for severity in SEVERITIES:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ref = imagecorruptions.corrupt(img, severity=severity, corruption_name=name)
        ref = torch.from_numpy(np.array(ref)).permute(2, 0, 1)[None].float() / 255
        ours = torch.floor(corrupt(x, name, severity) * 255 + 1e-3) / 255  # the package truncates to uint8
        assert _psnr(ours, ref) > 40, (name, severity, _psnr(ours, ref))


@pytest.mark.parametrize("name", ["pixelate", "jpeg_compression"])
def test_pixelate_and_jpeg_equal_imagecorruptions_exactly(name: str):
    img, x = _photo(61)
    for severity in SEVERITIES:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ref = np.array(imagecorruptions.corrupt(img, severity=severity, corruption_name=name))
        assert torch.equal(corrupt(x, name, severity), from_uint8_hwc(ref[None])), (name, severity)


def test_pixelate_off_the_cpu_equals_pil_resizing():
    # Other devices take products of banded matrices instead of PIL's own resize; run them here.
    from PIL import Image

    x = torch.floor(torch.cat([images(61, batch=2), _photo(61)[1]]) * 255 + 0.5) / 255  # on the 8-bit grid
    for small_h, small_w in ((36, 36), (30, 18), (24, 24), (18, 30), (15, 15), (1, 2)):
        ours = box_then_nearest(x, small_h, small_w)
        for img, out in zip(to_uint8_hwc(x), ours):
            ref = Image.fromarray(img).resize((small_w, small_h), Image.BOX).resize((61, 61), Image.NEAREST)
            assert torch.equal(out, from_uint8_hwc(np.array(ref)[None])[0]), (small_h, small_w)


def test_motion_blur_equals_the_reference_kernel_at_a_given_angle():
    img, x = _photo(40)  # the severity-5 kernel (41 px) overruns 40 px: the reference truncates it
    for radius, sigma, angle in ((10, 3, -30.0), (20, 15, 44.0), (12, 8, -100.0)):
        ref = ic._motion_blur(img.astype(np.float32) / 255, radius=radius, sigma=sigma, angle=angle)
        ours = ops.motion_blur(x, radius, sigma, torch.tensor([angle]))[0].permute(1, 2, 0).numpy()
        np.testing.assert_allclose(ours, ref, atol=1e-5)


def test_clipped_zoom_and_disk_equal_the_reference_helpers():
    img, x = _photo(37)
    for zoom in (1.06, 1.3, 2.5):
        ref = ic.clipped_zoom(img.astype(np.float64) / 255, zoom)
        np.testing.assert_allclose(ops.clipped_zoom(x, zoom)[0].permute(1, 2, 0).numpy(), ref, atol=1e-5)
    for radius, alias in ((3, 0.1), (8, 0.5), (10, 0.5)):
        np.testing.assert_allclose(ops.disk_kernel(radius, alias).numpy(), ic.disk(radius, alias), atol=1e-6)


def test_glass_blur_shuffle_replays_the_reference_loop_exactly():
    # The reference's tuple "swap" of numpy rows copies x[i', j'] into x[i, j]; replay it pixel by pixel.
    g = seeded(3)
    for d, (h, w) in ((1, (9, 12)), (2, (14, 11)), (4, (20, 20))):
        dy, dx = torch.randint(-d, d, (2, 2, h, w), generator=g)
        img = np.arange(2 * h * w).reshape(2, h, w, 1).repeat(3, axis=3)
        for b in range(2):
            for i in range(h - d, d, -1):
                for j in range(w - d, d, -1):
                    i2, j2 = i + int(dy[b, i, j]), j + int(dx[b, i, j])
                    img[b, i, j], img[b, i2, j2] = img[b, i2, j2], img[b, i, j]
        src = local_copies(dy, dx, d)
        expected = torch.from_numpy(img[..., 0].reshape(2, -1) - np.arange(2)[:, None] * h * w)
        assert torch.equal(src, expected)


# ---- building blocks against scipy and OpenCV


@pytest.mark.parametrize("scale", [60, 12, 3])
def test_poisson_8bit_draws_follow_the_poisson_law(scale: int):
    from scipy.stats import poisson

    n = 200_000
    for level in (0.0, 7 / 255, 200 / 255, 1.0, 0.12345, 0.5 + 0.4 / 255):  # the last two are off the 8-bit grid
        k = poisson_8bit(torch.full((n,), level), scale, generator=seeded(0))
        freq = torch.bincount(k.long(), minlength=200)[:200].double() / n
        pmf = torch.from_numpy(poisson.pmf(np.arange(200), scale * level))
        assert ((freq - pmf).abs() <= 5 * (pmf * (1 - pmf) / n).sqrt() + 2e-5).all(), (scale, level)


def test_filter2d_equals_opencv_and_axis_maps_equal_their_dense_matrix():
    img = np.random.default_rng(0).uniform(size=(23, 37))
    k = ops.disk_kernel(6, 0.5)
    ours = ops.filter2d(torch.from_numpy(img)[None, None], k, "reflect")[0, 0].numpy()
    np.testing.assert_allclose(ours, cv2.filter2D(img, -1, k.numpy()), atol=1e-6)  # default border: reflect-101
    tiny = ops.filter2d(torch.from_numpy(img[:5, :4].copy())[None, None], k, "reflect")[0, 0].numpy()  # pad > size
    np.testing.assert_allclose(tiny, cv2.filter2D(img[:5, :4], -1, k.numpy()), atol=1e-6)
    m = torch.zeros(70, 50, dtype=torch.float64)  # a band that moves like a zoom's, with empty columns
    for o in range(45):
        m[o + o // 3 : o + o // 3 + 4, o] = torch.arange(1.0, 5.0)
    amap = ops.axis_map(m, torch.device("cpu"), torch.float64)
    x = torch.from_numpy(np.random.default_rng(1).uniform(size=(2, 3, 70, 70)))
    torch.testing.assert_close(ops.along_w(x, amap), x @ m)
    torch.testing.assert_close(ops.along_h(x, amap), m.T @ x)


def test_gaussian_blur_and_warp_match_scipy():
    f = np.random.default_rng(0).uniform(size=(30, 41))
    t = torch.from_numpy(f)[None, None]
    nearest = ops.gaussian_blur(t, 6.0)[0, 0].numpy()
    np.testing.assert_allclose(nearest, gaussian_filter(f, 6, mode="nearest"), atol=1e-12)
    sym = ops.gaussian_blur(t, (1.3, 2.2), truncate=3.0, mode="symmetric")[0, 0].numpy()
    np.testing.assert_allclose(sym, gaussian_filter(f, (1.3, 2.2), mode="reflect", truncate=3), atol=1e-12)
    dy, dx = np.random.default_rng(1).uniform(-5, 5, size=(2, 30, 41))  # reaches past every border
    rows, cols = np.meshgrid(np.arange(30), np.arange(41), indexing="ij")
    ref = map_coordinates(f, (rows + dy, cols + dx), order=1, mode="reflect")
    ours = ops.warp(t, torch.from_numpy(dy)[None], torch.from_numpy(dx)[None])[0, 0].numpy()
    np.testing.assert_allclose(ours, ref, atol=1e-10)


def test_spatter_edge_pipeline_matches_opencv():
    rng = np.random.default_rng(0)
    for sigma in (2, 3, 4):
        liquid = gaussian_filter(rng.normal(0.65, 0.3, (48, 64)), sigma, mode="nearest")
        u8 = (np.where(liquid < 0.68, 0, liquid) * 255).astype(np.uint8)
        edges = cv2.Canny(u8, 50, 150)
        ours = ops.canny(torch.from_numpy(u8).float()[None, None], 50, 150)[0, 0].numpy()
        assert edges.sum() > 0 and np.array_equal(ours, edges > 0)
        _, dist = cv2.threshold(cv2.distanceTransform(255 - edges, cv2.DIST_L2, 5), 20, 20, cv2.THRESH_TRUNC)
        d = ops.chamfer_distance(torch.from_numpy(edges > 0)[None, None], 20)
        np.testing.assert_allclose(d[0, 0].numpy(), dist, atol=1e-4)
        levels = cv2.blur(dist, (3, 3)).astype(np.uint8)
        assert np.array_equal(torch.floor(ops.box3(torch.from_numpy(dist)[None, None]))[0, 0].numpy(), levels)
        eq = ops.equalize_hist(torch.from_numpy(levels).float()[None, None])[0, 0].numpy()
        assert np.array_equal(eq, cv2.equalizeHist(levels))


# ---- the docs show the benchmark results


def test_readme_tables_are_the_benchmark_results():
    from benchmarks import corruptions_fidelity, corruptions_speed

    doc = (Path(__file__).parents[1] / "README.md").read_text()
    for bench in (corruptions_fidelity, corruptions_speed):
        assert bench.markdown(json.loads(bench.RESULTS.read_text())) in doc, f"rerun {bench.__name__} --markdown-only"


# ---- frost textures, devices


def test_frost_source_is_the_installed_package_photographs():
    folder = Path(imagecorruptions.__file__).parent / "frost"
    assert frost_photo_paths() == tuple(folder / name for name in FROST_FILES)
    assert frost_texture_source() == f"imagecorruptions {version('imagecorruptions')} frost photographs"


def test_frost_overlays_a_window_of_a_package_photograph_as_the_reference_scales_it():
    # On a black image frost is amount * a crop of one photo, resized like the reference (cv2, BGR file).
    amount = 0.4  # severity 1
    out = corrupt(torch.zeros(1, 3, 40, 48), "frost", 1, generator=seeded(3))[0].permute(1, 2, 0).numpy() / amount
    h, w = out.shape[:2]
    for path in frost_photo_paths():
        photo = cv2.imread(str(path))
        scale = 1.1 * max(1.0, h / photo.shape[0], w / photo.shape[1])
        size = (int(np.ceil(photo.shape[1] * scale)), int(np.ceil(photo.shape[0] * scale)))
        big = cv2.resize(photo, dsize=size, interpolation=cv2.INTER_CUBIC)[..., ::-1].astype(np.float64) / 255
        close = np.abs(big[: big.shape[0] - h, : big.shape[1] - w] - out[0, 0]).max(-1) <= 1.5 / 255
        for top, left in zip(*np.nonzero(close)):
            if np.abs(big[top : top + h, left : left + w] - out).max() <= 1.5 / 255:
                return
    raise AssertionError("the frost overlay is no window of the package's photographs")


def test_frost_without_the_package_photographs_says_to_install_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    # An installed imagecorruptions distribution without its frost folder shadows the real one.
    info = tmp_path / "imagecorruptions-0.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: imagecorruptions\nVersion: 0.0\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ValueError, match="pip install"):
        frost_photo_paths()
    with pytest.raises(ValueError, match="pip install"):
        frost_texture_source()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", ALL)
def test_cuda_batches_match_the_cpu(name: str):
    x = images(64, batch=2)
    gen_cpu, gen_gpu = seeded(0), torch.Generator("cuda").manual_seed(0)
    out = corrupt(x.cuda(), name, 3, generator=gen_gpu)
    assert out.is_cuda and out.shape == x.shape and 0 <= out.min() <= out.max() <= 1
    if name in DETERMINISTIC:
        assert (out.cpu() - corrupt(x, name, 3)).abs().mean() < 1e-4
    else:  # a CPU generator also drives a CUDA batch
        cpu_drawn = corrupt(x.cuda(), name, 3, generator=gen_cpu)
        assert cpu_drawn.is_cuda and (cpu_drawn.cpu() - corrupt(x, name, 3, generator=seeded(0))).abs().mean() < 1e-3
