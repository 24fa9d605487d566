"""Weather corruptions: snow, frost, fog, spatter.

Per-severity parameters are imagecorruptions' (the ImageNet-C code). Frost overlays the package's
frost photographs when it is installed (read from its folder at run time, never copied into this repo),
else procedural textures: ``frost_texture_source()`` says which.
"""

from __future__ import annotations

import functools
import importlib.util
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
    textures = _fitted_frost(frost_texture_source(), h, w, x.device)
    pick = randint(0, len(textures), b, like=x, generator=generator).tolist()
    corner = rand(b, 2, like=x, generator=generator).tolist()
    out = x * keep
    for n, (k, (cy, cx)) in enumerate(zip(pick, corner)):
        tex = textures[k]
        top, left = int(cy * (tex.shape[1] - h)), int(cx * (tex.shape[2] - w))  # the reference's randint(0, free)
        out[n].add_(tex[:, top : top + h, left : left + w], alpha=amount)
    return out


@functools.cache
def frost_texture_source() -> str:
    """The folder of imagecorruptions' frost photos when the package is installed, else "procedural"."""
    spec = importlib.util.find_spec("imagecorruptions")  # finds the folder without importing the package
    if spec is not None and spec.submodule_search_locations:
        folder = Path(next(iter(spec.submodule_search_locations))) / "frost"
        if all((folder / name).is_file() for name in FROST_FILES):
            return str(folder)
    return "procedural"


@functools.lru_cache(maxsize=2)
def frost_textures(source: str) -> tuple[Tensor, ...]:
    """Five uint8 RGB (3, h, w) frost textures on the CPU, from ``frost_texture_source()``'s answer."""
    if source == "procedural":
        return tuple(_procedural_frost(seed) for seed in range(len(FROST_FILES)))
    return tuple(decode_image(str(Path(source) / name), mode=ImageReadMode.RGB) for name in FROST_FILES)


@functools.lru_cache(maxsize=8)
def _fitted_frost(source: str, h: int, w: int, device: torch.device) -> tuple[Tensor, ...]:
    """The textures as the reference scales them: 1.1x the scale that covers (h, w) (never below 1.1),
    bicubic like cv2.INTER_CUBIC, back on the 8-bit grid; float [0, 1] on ``device``."""
    out = []
    for tex in frost_textures(source):
        th, tw = tex.shape[-2:]
        scale = max(1.0, h / th, w / tw) * 1.1
        size = (int(-(-th * scale // 1)), int(-(-tw * scale // 1)))  # ceil
        big = F.interpolate(tex[None].to(device, torch.float32), size=size, mode="bicubic", align_corners=False)
        out.append(big[0].round().clamp(0, 255) / 255)
    return tuple(out)


def _procedural_frost(seed: int, size: tuple[int, int] = (320, 448)) -> Tensor:
    """A frost-like texture for when the package's photos are absent: a cloudy diamond-square layer plus
    ice needles (sparse seeds, denser where the cloud is bright, smeared along four directions), pale
    blue-grey; uint8 (3, *size) on the CPU."""
    g = torch.Generator().manual_seed(seed)
    like = torch.empty(0)
    h, w = size
    mapsize = 1 << (max(h, w) - 1).bit_length()
    cloud = plasma_fractal(1, mapsize, 1.8, like=like, generator=g)[:, None, :h, :w]
    seeds = (rand(1, 1, h, w, like=like, generator=g) < 0.02 * cloud).float().expand(4, 1, h, w)
    angles = torch.tensor([0.0, 45.0, 90.0, 135.0]) + rand(4, like=like, generator=g) * 30
    needles = motion_blur(seeds, 8, 4.0, angles).sum(0, keepdim=True)
    needles = needles / needles.amax()
    grey = (0.25 + 0.45 * cloud + 0.6 * needles.sqrt()).clamp(0, 1)
    tint = torch.tensor([0.85, 0.93, 1.0]).view(1, 3, 1, 1)
    return (grey * tint * 255).round().to(torch.uint8)[0]
