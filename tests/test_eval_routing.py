"""F_correct routing (issue #11): a set's config says whether it is shifted; corruption keys always are."""

from __future__ import annotations

import pkgutil
from pathlib import Path

import torch
from PIL import Image
from torch import nn

from robust.eval.class_subsets import IMAGENET_R_INDICES
from robust.eval.evaluate import evaluate_set
from robust.eval.sets import EvalSetConfig, build_eval_set
from robust.rpt.select import Selection

WNIDS = pkgutil.get_data("timm.data", "_info/imagenet_synsets.txt").decode().split()
BRIGHT, DARK = 2, 1  # images per class folder: the model routes bright ones to the clean head


class RoutesByBrightness(nn.Module):
    """Routes like a three-head RPT student (``robust.rpt.export.RptClassifier``): the clean head for
    bright images (mean > 0.5), the unclean head otherwise, recorded in ``last_selection``."""

    def forward(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        logits_BK = torch.zeros(len(x_BCHW), 1000)
        self.last_selection = Selection(x_BCHW.mean(dim=(1, 2, 3)) > 0.5, logits_BK, {})
        return logits_BK


def _images(folder: Path) -> None:
    folder.mkdir(parents=True)
    for i in range(BRIGHT + DARK):
        Image.new("RGB", (8, 8), (255,) * 3 if i < BRIGHT else (0,) * 3).save(folder / f"{i}.png")


def _f_correct(cfg: EvalSetConfig, key) -> float:
    tally = evaluate_set(RoutesByBrightness(), build_eval_set(cfg), batch_size=2)
    return tally.f_correct(key)


def test_shifted_sets_count_the_unclean_head_as_right(tmp_path):
    _images(tmp_path / "folder" / "0")
    _images(tmp_path / "r" / WNIDS[IMAGENET_R_INDICES[0]])
    _images(tmp_path / "c" / "fog" / "3" / WNIDS[0])
    unclean = DARK / (BRIGHT + DARK)
    common = dict(image_size=8, crop_pct=1.0)
    # a folder set, ImageNet-R and stored ImageNet-C are shifted by default
    folder = EvalSetConfig(kind="imagefolder", root=str(tmp_path / "folder"), **common)
    assert _f_correct(folder, "imagefolder") == unclean
    assert _f_correct(EvalSetConfig(kind="imagenet-r", root=str(tmp_path / "r"), **common), "imagenet-r") == unclean
    assert _f_correct(EvalSetConfig(kind="imagenet-c", root=str(tmp_path / "c")), ("fog", 3)) == unclean


def test_the_in_distribution_set_counts_the_clean_head_and_its_x_c_the_unclean_one(tmp_path):
    _images(tmp_path / "clean" / "0")
    cfg = EvalSetConfig(kind="imagefolder", root=str(tmp_path / "clean"), name="clean", image_size=8, crop_pct=1.0,
                        shifted=False, corruptions=["brightness"], severities=[1])  # fmt: skip
    tally = evaluate_set(RoutesByBrightness(), build_eval_set(cfg), batch_size=2)
    assert tally.f_correct("clean") == BRIGHT / (BRIGHT + DARK)
    # brightness keeps the white images white and makes the black ones grey (< 0.5): routing unchanged
    assert tally.f_correct(("brightness", 1)) == DARK / (BRIGHT + DARK)
