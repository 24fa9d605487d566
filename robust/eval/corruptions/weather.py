"""Weather corruptions: snow, frost, fog, spatter.

Per-severity parameters are imagecorruptions' (the ImageNet-C code). Frost overlays that package's
frost photographs, read from its installed folder (a runtime dependency; the package itself is never
imported, as it needs pkg_resources): ``frost_texture_source()`` names them for reports.
"""

from __future__ import annotations

import functools
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

import torch
import torch.nn.functional as F
from torchvision.io import ImageReadMode, decode_image

from robust.eval.corruptions import register
from robust.eval.corruptions._filters import (
    box3, canny, chamfer_distance, clipped_zoom, equalize_hist, filter2d, gaussian_blur, motion_blur,
    plasma_fractal, rand, randint, randn, rgb_to_gray,
)  # fmt: skip

Tensor = torch.Tensor

# The reference draws randint(5) over its six files, so frost6.jpg is never used.
FROST_FILES: tuple[str, ...] = ("frost1.png", "frost2.png", "frost3.png", "frost4.jpg", "frost5.jpg")


@register("fog")
def fog(x: Tensor, severity: int, generator: torch.Generator | None) -> Tensor:
    strength, decay = ((1.5, 2), (2.0, 2), (2.5, 1.7), (2.5, 1.5), (3.0, 1.4))[severity - 1]
    b, _, h, w = x.shape
    mapsize = 1 << (max(h, w) - 1).bit_length()  # next power of two
    haze = plasma_fractal(b, mapsize, decay, like=x, generator=generator)[:, None, :h, :w]
    peak = x.amax((1, 2, 3), keepdim=True)
    return torch.add(x, haze, alpha=strength).mul_(peak / (peak + strength))


@register("snow")
def snow(x: Tensor, severity: int, generator: torch.Generator | None) -> Tensor:
    mean, std, zoom, threshold, radius, sigma, keep = (
        (0.1, 0.3, 3, 0.5, 10, 4, 0.8),
        (0.2, 0.3, 2, 0.5, 12, 4, 0.7),
        (0.55, 0.3, 4, 0.9, 12, 8, 0.7),
        (0.55, 0.3, 4.5, 0.85, 12, 8, 0.65),
        (0.55, 0.3, 2.5, 0.85, 12, 12, 0.55),
    )[severity - 1]
    b, _, h, w = x.shape
    flakes = clipped_zoom(randn(b, 1, h, w, like=x, generator=generator).mul_(std).add_(mean), zoom)
    flakes = flakes.masked_fill_(flakes < threshold, 0.0).clamp_(0, 1)
    angle_B = rand(b, like=x, generator=generator) * 90 - 135  # degrees, uniform(-135, -45)
    flakes = motion_blur(flakes, radius, sigma, angle_B)[..., :h, :w].mul(255).round_().div_(255)
    out = torch.maximum(x, rgb_to_gray(x).mul_(1.5).add_(0.5)).mul_(1 - keep).add_(x, alpha=keep)
    return out.add_(flakes).add_(flakes.flip(-2, -1))


@register("spatter")
def spatter(x: Tensor, severity: int, generator: torch.Generator | None) -> Tensor:
    mean, std, sigma, threshold, strength, mud = (
        (0.65, 0.3, 4, 0.69, 0.6, 0),
        (0.65, 0.3, 3, 0.68, 0.6, 0),
        (0.65, 0.3, 2, 0.68, 0.5, 0),
        (0.65, 0.3, 1, 0.65, 1.5, 1),
        (0.67, 0.4, 1, 0.65, 1.5, 1),
    )[severity - 1]
    b, _, h, w = x.shape
    liquid = gaussian_blur(randn(b, 1, h, w, like=x, generator=generator).mul_(std).add_(mean), sigma)
    liquid = liquid.masked_fill_(liquid < threshold, 0.0)
    if mud:
        m = gaussian_blur((liquid > threshold).float(), strength)
        m = m.masked_fill_(m < 0.8, 0.0)
        return torch.lerp(x, _colour((63, 42, 20), x), m)  # x (1 - m) + m colour
    return torch.addcmul(x, _water(liquid, strength), _colour((175, 238, 238), x))


def _water(liquid_B1HW: Tensor, strength: float) -> Tensor:
    """The reference's water-drop intensity: 8-bit edges, their distance map, equalised and embossed."""
    levels = torch.floor(liquid_B1HW * 255).clamp(0, 255)
    dist = box3(chamfer_distance(canny(levels, 50, 150), 20)).floor_()
    dist = equalize_hist(dist)
    emboss = torch.tensor([[-2.0, -1.0, 0.0], [-1.0, 1.0, 1.0], [0.0, 1.0, 2.0]], dtype=torch.float64)
    dist = torch.round(box3(torch.round(filter2d(dist, emboss, "reflect")).clamp(0, 255)))
    m = levels * dist
    return m / m.amax((2, 3), keepdim=True).clamp_min(1e-6) * strength


def _colour(rgb: tuple[int, int, int], like: Tensor) -> Tensor:
    return torch.tensor(rgb, dtype=like.dtype, device=like.device).view(1, 3, 1, 1) / 255


@register("frost")
def frost(x: Tensor, severity: int, generator: torch.Generator | None) -> Tensor:
    keep, amount = ((1, 0.4), (0.8, 0.6), (0.7, 0.7), (0.65, 0.7), (0.6, 0.75))[severity - 1]
    b, _, h, w = x.shape
    textures = _fitted_frost(h, w, x.device)
    pick = randint(0, len(textures), b, like=x, generator=generator).tolist()
    corner = rand(b, 2, like=x, generator=generator).tolist()
    out = x * keep
    for n, (k, (cy, cx)) in enumerate(zip(pick, corner)):
        tex = textures[k]
        top, left = int(cy * (tex.shape[1] - h)), int(cx * (tex.shape[2] - w))  # the reference's randint(0, free)
        out[n].add_(tex[:, top : top + h, left : left + w], alpha=amount)
    return out


def frost_texture_source() -> str:
    """What frost overlays, in words for reports: "imagecorruptions <version> frost photographs"."""
    frost_photo_paths()  # raises if they are missing
    return f"imagecorruptions {distribution('imagecorruptions').version} frost photographs"


def frost_photo_paths() -> tuple[Path, ...]:
    """The installed imagecorruptions' frost photographs that the reference draws from, found through the
    package's metadata (importing the package would need pkg_resources)."""
    try:
        folder = Path(distribution("imagecorruptions").locate_file("imagecorruptions/frost"))
    except PackageNotFoundError:
        raise ValueError("frost overlays the imagecorruptions package's photos: pip install imagecorruptions") from None
    paths = tuple(folder / name for name in FROST_FILES)
    if not all(path.is_file() for path in paths):
        raise ValueError(f"{folder} lacks some of {FROST_FILES}: pip install --force-reinstall imagecorruptions")
    return paths


@functools.cache
def frost_textures() -> tuple[Tensor, ...]:
    """The frost photographs, uint8 RGB (3, h, w) on the CPU."""
    return tuple(decode_image(str(path), mode=ImageReadMode.RGB) for path in frost_photo_paths())


@functools.lru_cache(maxsize=8)
def _fitted_frost(h: int, w: int, device: torch.device) -> tuple[Tensor, ...]:
    """The textures as the reference scales them: 1.1x the scale that covers (h, w) (never below 1.1),
    bicubic like cv2.INTER_CUBIC, back on the 8-bit grid; float [0, 1] on ``device``."""
    out = []
    for tex in frost_textures():
        th, tw = tex.shape[-2:]
        scale = max(1.0, h / th, w / tw) * 1.1
        size = (int(-(-th * scale // 1)), int(-(-tw * scale // 1)))  # ceil
        big = F.interpolate(tex[None].to(device, torch.float32), size=size, mode="bicubic", align_corners=False)
        out.append(big[0].round().clamp(0, 255) / 255)
    return tuple(out)
