"""The torch corruption suite against the ``imagecorruptions`` reference, on small real images.

Deterministic corruptions: PSNR(torch, reference) per severity must reach a per-corruption floor.
Random ones: the std of (corrupted - clean) must match within a band and its mean within a tolerance.
The bounds come from benchmarks/corruptions_fidelity.py and the spread of the reference between seeds
(README, evaluation section); the noise bands also exclude the neighbouring severities. A corruption that is
not registered fails here.
"""

from __future__ import annotations

import pytest
import torch
from reference_corruptions import (
    DETERMINISTIC, digits, photos, psnr, quantize_like_reference, reference_corrupt,
    shift_and_std,
)  # fmt: skip

from robust.eval.corruptions import ALL, corrupt

SEVERITIES = (1, 2, 3, 4, 5)
RANDOM = tuple(name for name in ALL if name not in DETERMINISTIC)
# Independent draws per image for the random corruptions (default 4); the reference's glass blur is slow.
REPEATS: dict[str, int] = {"glass_blur": 2}

# Lowest PSNR (dB) between torch and reference allowed at any severity, on photos and on digits. Every
# floor is above 38 dB, the highest PSNR between neighbouring severities of the reference (contrast 4-5),
# so a severity off by one fails (except saturate on grey digits, which no severity changes).
PSNR_MIN: dict[str, float] = {
    "defocus_blur": 55.0, "zoom_blur": 60.0, "brightness": 55.0, "contrast": 60.0, "pixelate": 60.0,
    "jpeg_compression": 60.0, "gaussian_blur": 60.0, "saturate": 50.0,
}  # fmt: skip
# Random: (lowest, highest) std ratio torch/reference, and the largest |mean shift difference| in grey levels.
STD_RATIO: dict[str, tuple[float, float]] = {
    "gaussian_noise": (0.9, 1.11), "shot_noise": (0.9, 1.11), "impulse_noise": (0.9, 1.11),
    "speckle_noise": (0.9, 1.11), "glass_blur": (0.88, 1.13), "motion_blur": (0.85, 1.18),
    "elastic_transform": (0.88, 1.13), "snow": (0.7, 1.4), "frost": (0.8, 1.25), "fog": (0.82, 1.22),
    "spatter": (0.5, 2.0),
}  # fmt: skip
SHIFT_TOL: dict[str, float] = {
    "gaussian_noise": 2.0, "shot_noise": 2.0, "impulse_noise": 2.0, "speckle_noise": 2.0,
    "glass_blur": 5.0, "motion_blur": 10.0, "elastic_transform": 2.5, "snow": 14.0, "frost": 30.0,
    "fog": 28.0, "spatter": 14.0,
}  # fmt: skip


@pytest.fixture(scope="module")
def batches() -> dict[str, torch.Tensor]:
    return {"photos": photos(64)[:2], "digits": digits()[2][:6]}


def test_thresholds_cover_every_corruption():
    assert set(PSNR_MIN) == set(DETERMINISTIC) and set(STD_RATIO) == set(SHIFT_TOL) == set(RANDOM)
    assert len(ALL) == 19


@pytest.mark.parametrize("name", DETERMINISTIC)
def test_deterministic_corruption_matches_reference(name: str, batches: dict[str, torch.Tensor]):
    too_low = {}
    for data, x_BCHW in batches.items():
        for severity in SEVERITIES:
            ours = quantize_like_reference(corrupt(x_BCHW, name, severity))
            db = psnr(ours, reference_corrupt(x_BCHW, name, severity))
            if db < PSNR_MIN[name]:
                too_low[f"{data} severity {severity}"] = round(db, 1)
    assert not too_low, f"PSNR below {PSNR_MIN[name]} dB: {too_low}"


@pytest.mark.parametrize("name", RANDOM)
def test_random_corruption_statistics_match_reference(name: str, batches: dict[str, torch.Tensor]):
    lo, hi = STD_RATIO[name]
    off = {}
    for data, x_BCHW in batches.items():
        x_BCHW = x_BCHW.repeat(REPEATS.get(name, 4), 1, 1, 1)
        for severity in SEVERITIES:
            ours = corrupt(x_BCHW, name, severity, generator=torch.Generator().manual_seed(severity))
            shift_t, std_t = shift_and_std(quantize_like_reference(ours), x_BCHW)
            shift_r, std_r = shift_and_std(reference_corrupt(x_BCHW, name, severity, seed=100 * severity), x_BCHW)
            if not (lo <= std_t / std_r <= hi and abs(shift_t - shift_r) <= SHIFT_TOL[name]):
                off[f"{data} severity {severity}"] = {"std": (round(std_t, 2), round(std_r, 2)),
                                                      "shift": (round(shift_t, 2), round(shift_r, 2))}  # fmt: skip
    assert not off, f"torch vs reference (std ratio band {lo}-{hi}, shift tol {SHIFT_TOL[name]}): {off}"
