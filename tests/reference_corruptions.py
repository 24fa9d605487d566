"""The reference corruption suite (``imagecorruptions``, the ImageNet-C code), patched to run on NumPy 2
and scikit-image >= 0.19, plus the real images the torch-vs-reference comparisons use.

Support code for tests/test_corruption_fidelity.py and benchmarks/corruptions_*.py; the project code
never imports it. The patches touch only the imported ``imagecorruptions.corruptions`` module:

* ``fog`` (``plasma_fractal``) uses ``np.float_``, removed in NumPy 2: the module gets a numpy view that
  still has the alias (numpy itself is left alone).
* ``gaussian_blur`` and ``glass_blur`` call ``skimage.filters.gaussian(..., multichannel=True)``; the
  keyword became ``channel_axis`` in scikit-image 0.19 and was removed later: it is translated.
* ``impulse_noise`` calls ``skimage.util.random_noise``, which now draws from a fresh, unseeded
  generator; it is given one seeded from numpy's global RNG, as old scikit-image used that RNG.

Small images: the package accepts any H, W >= 32 and all 19 corruptions run at 32x32 with the
ImageNet (224 px) parameters, which is what the torch suite reproduces. One quirk matters at 32 px:
``motion_blur`` stops adding shifted copies once a shift reaches the image border, so its kernel
(width 2*radius+1 = 21..41 px) is truncated and the image darkens; a faithful port does the same.
"""

from __future__ import annotations

import types
import warnings

import numpy as np
import torch
from PIL import Image

from robust.data.digits import digits_arrays

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # pkg_resources deprecation, scipy.ndimage.interpolation
    import imagecorruptions
    import skimage.color
    import skimage.data
    import skimage.filters
    import skimage.util
    from imagecorruptions import corruptions as _ic_module

# Same output for the same input and seed; the rest are random (noise, weather, elastic, motion angle).
DETERMINISTIC: tuple[str, ...] = (
    "defocus_blur", "zoom_blur", "brightness", "contrast", "pixelate", "jpeg_compression",
    "gaussian_blur", "saturate",
)  # fmt: skip
PHOTOS: tuple[str, ...] = ("astronaut", "coffee", "chelsea", "rocket")


class _NumpyWithRemovedAliases(types.ModuleType):
    """numpy as the module sees it, plus the aliases NumPy 2 removed."""

    float_ = np.float64

    def __getattr__(self, name: str):
        return getattr(np, name)


def _gaussian_with_multichannel(image, *args, multichannel: bool = False, **kwargs):
    return skimage.filters.gaussian(image, *args, channel_axis=-1 if multichannel else None, **kwargs)


def _random_noise_from_global_rng(image, *args, **kwargs):
    return skimage.util.random_noise(image, *args, rng=np.random.randint(2**31), **kwargs)


_ic_module.np = _NumpyWithRemovedAliases("numpy")
_ic_module.gaussian = _gaussian_with_multichannel
_ic_module.sk = types.SimpleNamespace(
    util=types.SimpleNamespace(random_noise=_random_noise_from_global_rng), color=skimage.color
)


def reference_corrupt(x_BCHW: torch.Tensor, name: str, severity: int, *, seed: int = 0) -> torch.Tensor:
    """Corrupt each image with ``imagecorruptions`` (uint8 HWC in and out); image i uses numpy seed ``seed + i``.

    Returns float [0, 1] images on the uint8 grid; the package truncates its float result to uint8.
    """
    out = []
    for i, img_HWC in enumerate(to_uint8_hwc(x_BCHW)):
        np.random.seed(seed + i)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out.append(imagecorruptions.corrupt(img_HWC, severity=severity, corruption_name=name))
    return from_uint8_hwc(np.stack(out))


def quantize_like_reference(x_BCHW: torch.Tensor) -> torch.Tensor:
    """The uint8 truncation ``imagecorruptions.corrupt`` ends with, applied to a torch result.

    The 1e-3 (of a grey level) keeps values that are integers up to float32 round-off on their level.
    """
    return torch.floor(x_BCHW.clamp(0, 1) * 255 + 1e-3) / 255


def to_uint8_hwc(x_BCHW: torch.Tensor) -> np.ndarray:
    return (x_BCHW.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def from_uint8_hwc(x_BHWC: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(x_BHWC).permute(0, 3, 1, 2).float() / 255


def psnr(a_BCHW: torch.Tensor, b_BCHW: torch.Tensor, *, cap: float = 99.0) -> float:
    """PSNR in dB of the pooled MSE over the whole batch (peak 1); ``cap`` when identical."""
    mse = (a_BCHW.double() - b_BCHW.double()).pow(2).mean().item()
    return cap if mse == 0 else min(cap, 10 * np.log10(1.0 / mse))


def shift_and_std(out_BCHW: torch.Tensor, clean_BCHW: torch.Tensor) -> tuple[float, float]:
    """Mean over images of the per-image mean and std of (out - clean), in grey levels (0..255)."""
    delta_BN = (out_BCHW - clean_BCHW).flatten(1) * 255
    return delta_BN.mean(1).mean().item(), delta_BN.std(1).mean().item()


def photos(size: int) -> torch.Tensor:
    """scikit-image's shipped photographs, centre-cropped square and resized (PIL bicubic) to ``size``."""
    imgs = []
    for name in PHOTOS:
        img = Image.fromarray(getattr(skimage.data, name)()).convert("RGB")
        side = min(img.size)
        left, top = (img.width - side) // 2, (img.height - side) // 2
        img = img.crop((left, top, left + side, top + side)).resize((size, size), Image.BICUBIC)
        imgs.append(np.asarray(img))
    return from_uint8_hwc(np.stack(imgs))


def digits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The project's digits set (32 px RGB; 1347 train / 450 test) as (x_train, y_train, x_test, y_test) tensors."""
    x_train, y_train, x_test, y_test = digits_arrays()
    return from_uint8_hwc(x_train), torch.from_numpy(y_train), from_uint8_hwc(x_test), torch.from_numpy(y_test)
