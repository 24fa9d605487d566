"""PixMix (Hendrycks et al. 2022, "PixMix: Dreamlike Pictures Comprehensively Improve Safety Measures").

Per image, as the official code (github.com/andyzoujm/pixmix) does it: start from the image or an
augmented copy (probability 1/2 each); then for r ~ U{0..k} rounds mix in either a fresh augmented
copy of the image or the image's mixing picture (1/2 each) with additive or multiplicative mixing
(1/2 each), clipping to [0, 1] after every round. "Augmented copy" = one op drawn uniformly from the
AugMix op list (timm's ops, ``robust.augment.augment_ops``).

Mixing weights (a, b) (the official ``get_ab``): with probability 1/2, a ~ Beta(beta, 1) and
b ~ Beta(1, beta); else a = 1 + Beta(1, beta) and b = -Beta(1, beta). Then

    add:      m' = (a (2m - 1) + b (2y - 1) + 1) / 2
    multiply: m' = (2m)^a (2y)^b / 2      ((2y) floored at 1e-37 so that b < 0 stays finite)

The random draws of a batch are one ``PixMixPlan`` (``sample_pixmix_plan``), applied by
``apply_pixmix``; ``pixmix`` does both. The mixing set is the procedural fractals of
``robust.fractals``, any image folder, or shards (``load_mixing_set``).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from timm.data.auto_augment import AugmentOp
from torch import Tensor
from torchvision.transforms.functional import center_crop, resize

from robust.augment import as_unit_float, augment_ops, to_dtype_of
from robust.data.images import decode_image
from robust.data.shard_reader import ShardDataset
from robust.data.shards import MANIFEST
from robust.fractals import FractalConfig, render_fractals

FRACTALS = "fractals"
_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


@dataclass
class MixingSetConfig:
    """The pictures PixMix mixes in: ``source`` is "fractals" (generated, seeded by ``seed``) or a
    path: a shard directory / ``.tar`` / brace pattern, or a folder of images (searched recursively).
    ``num_images``: how many fractals are generated, or how many images are read (a seeded random
    subset of a folder's files; the first ones of shards)."""

    source: str = FRACTALS
    num_images: int = 1000
    seed: int = 0
    fractals: FractalConfig = field(default_factory=FractalConfig)


@dataclass
class PixMixConfig:
    """PixMix as in the paper's ImageNet setting: k = 4 rounds at most, beta = 4. ``aug_severity``
    and ``all_ops`` select the augmentation ops as in AugMix (the official code: severity 3 on CIFAR,
    1 on ImageNet; all_ops off, since the colour ops overlap ImageNet-C)."""

    k: int = 4
    beta: float = 4.0
    aug_severity: int = 3
    all_ops: bool = False
    mixing: MixingSetConfig = field(default_factory=MixingSetConfig)


@dataclass
class PixMixPlan:
    """Every random choice of one PixMix batch; rounds j >= ``rounds`` are not applied."""

    start_augmented: Tensor  # (B,) bool: start from an augmented copy
    rounds: Tensor  # (B,) int in [0, k]
    with_augmented: Tensor  # (B, k) bool: mix in an augmented copy (else the mixing picture)
    multiply: Tensor  # (B, k) bool: multiplicative mixing (else additive)
    a: Tensor  # (B, k) mixing weight of the running image
    b: Tensor  # (B, k) mixing weight of the mixed-in image
    op_index: Tensor  # (B, k + 1) augmentation op of the starting copy (column 0) and of each round
    op_seed: Tensor  # (B, k + 1) seed of Python's RNG for that op's magnitude, sign and filter


def pixmix(x_BCHW: Tensor, mixing_BCHW: Tensor, cfg: PixMixConfig, *, generator: torch.Generator) -> Tensor:
    """PixMix of each image with its own mixing picture; uint8 or [0, 1] float in, same dtype out.
    Deterministic given ``generator`` (a CPU generator)."""
    plan = sample_pixmix_plan(len(x_BCHW), cfg, generator=generator)
    return apply_pixmix(x_BCHW, mixing_BCHW, plan, augment_ops(cfg.aug_severity, all_ops=cfg.all_ops))


def sample_pixmix_plan(batch: int, cfg: PixMixConfig, *, generator: torch.Generator) -> PixMixPlan:
    """The random choices of PixMix for ``batch`` images (module docstring), all from ``generator``."""
    if cfg.k < 0 or cfg.beta <= 0:
        raise ValueError(f"PixMix needs k >= 0 rounds and beta > 0, got k={cfg.k}, beta={cfg.beta}")
    g, k = generator, cfg.k
    n_ops = len(augment_ops(cfg.aug_severity, all_ops=cfg.all_ops))
    a, b = mixing_weights((batch, k), cfg.beta, generator=g)
    return PixMixPlan(
        start_augmented=torch.rand(batch, generator=g) < 0.5,
        rounds=torch.randint(0, k + 1, (batch,), generator=g),
        with_augmented=torch.rand(batch, k, generator=g) < 0.5,
        multiply=torch.rand(batch, k, generator=g) < 0.5,
        a=a,
        b=b,
        op_index=torch.randint(0, n_ops, (batch, k + 1), generator=g),
        op_seed=torch.randint(0, 2**31, (batch, k + 1), generator=g),
    )


def mixing_weights(shape: tuple[int, ...], beta: float, *, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """The official ``get_ab`` drawn elementwise. Beta(beta, 1) and Beta(1, beta) have closed-form
    inverse CDFs (u^(1/beta) and 1 - u^(1/beta)), so they are sampled from ``generator``'s uniforms."""
    u_a, u_b = (torch.rand(shape, generator=generator) for _ in range(2))
    first = torch.rand(shape, generator=generator) < 0.5
    beta_1_b = 1 - u_b.pow(1 / beta)
    a = torch.where(first, u_a.pow(1 / beta), 1 + (1 - u_a.pow(1 / beta)))
    b = torch.where(first, beta_1_b, -beta_1_b)
    return a, b


def mix_add(m: Tensor, y: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """Additive PixMix mixing in [-1, 1] space; a, b broadcast over (C, H, W)."""
    return (a * (2 * m - 1) + b * (2 * y - 1) + 1) / 2


def mix_multiply(m: Tensor, y: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """Multiplicative PixMix mixing (weighted geometric mixing in [0, 2] space); a, b broadcast over (C, H, W)."""
    return (2 * m).pow(a) * (2 * y).clamp_min(1e-37).pow(b) / 2


def apply_pixmix(x_BCHW: Tensor, mixing_BCHW: Tensor, plan: PixMixPlan, ops: list[AugmentOp]) -> Tensor:
    """Run ``plan`` on the batch with the augmentation ``ops``; uint8 or [0, 1] float, same dtype out."""
    if x_BCHW.shape != mixing_BCHW.shape:
        raise ValueError(f"need one mixing picture per image of the same size: images {tuple(x_BCHW.shape)}, "
                         f"mixing pictures {tuple(mixing_BCHW.shape)}; sample them with sample_mixing")
    x = as_unit_float(x_BCHW)
    mix = as_unit_float(mixing_BCHW).to(x)
    mixed = _augmented_where(x, plan.start_augmented, plan.op_index[:, 0], plan.op_seed[:, 0], ops)
    for j in range(plan.a.shape[1]):
        active = plan.rounds > j
        use_aug = plan.with_augmented[:, j] & active  # augment only the copies that get mixed in
        augmented = _augmented_where(x, use_aug, plan.op_index[:, j + 1], plan.op_seed[:, j + 1], ops)
        other = torch.where(_b111(use_aug, x), augmented, mix)
        a, b = (_b111(w[:, j], x) for w in (plan.a, plan.b))
        step = torch.where(_b111(plan.multiply[:, j], x), mix_multiply(mixed, other, a, b), mix_add(mixed, other, a, b))
        mixed = torch.where(_b111(active, x), step.clamp(0, 1), mixed)
    return to_dtype_of(mixed, x_BCHW)


def load_mixing_set(cfg: MixingSetConfig, *, size: tuple[int, int]) -> Tensor:
    """The mixing pictures as uint8 (M, 3, H, W) at ``size`` = (H, W) (shorter side resized, then
    centre-cropped), held in memory: keep ``num_images`` small enough for that."""
    if cfg.num_images < 1:
        raise ValueError(f"mixing set num_images must be >= 1, got {cfg.num_images}")
    generator = torch.Generator().manual_seed(cfg.seed)
    if cfg.source == FRACTALS:
        return render_fractals(cfg.num_images, size, cfg.fractals, generator=generator)
    path = Path(cfg.source).expanduser()
    if path.is_dir() and not (path / MANIFEST).is_file() and not any(path.glob("*.tar")):
        images = _folder_images(path, cfg.num_images, generator)
    else:
        images = _shard_images(cfg.source, cfg.num_images)
    return torch.stack([_fit(torch.tensor(im).permute(2, 0, 1), size) for im in images])


def sample_mixing(bank_M3HW: Tensor, n: int, *, generator: torch.Generator) -> Tensor:
    """``n`` mixing pictures drawn uniformly with replacement from ``load_mixing_set``'s bank."""
    return bank_M3HW[torch.randint(0, len(bank_M3HW), (n,), generator=generator)]


def _augmented_where(x_BCHW: Tensor, which_B: Tensor, op_index_B: Tensor, op_seed_B: Tensor,
                     ops: list[AugmentOp]) -> Tensor:
    """``x`` with the images flagged in ``which_B`` replaced by one augmentation op each (timm's PIL
    ops, quantised to uint8 as PIL works)."""
    out = x_BCHW.clone()
    for i in which_B.nonzero().flatten().tolist():
        pil = Image.fromarray(x_BCHW[i].mul(255).round().clamp(0, 255).byte().permute(1, 2, 0).cpu().numpy())
        augmented = _with_python_seed(int(op_seed_B[i]), ops[int(op_index_B[i])], pil)
        out[i] = torch.from_numpy(np.array(augmented)).permute(2, 0, 1).to(out).div(255)
    return out


def _with_python_seed(seed: int, op: AugmentOp, pil: Image.Image) -> Image.Image:
    """timm's ops draw from Python's global RNG: seed it from the plan for this call and put the
    caller's state back, so that PixMix depends on its generator only."""
    state = random.getstate()
    random.seed(seed)
    try:
        return op(pil)
    finally:
        random.setstate(state)


def _b111(v_B: Tensor, like: Tensor) -> Tensor:
    return v_B.to(like.device).view(-1, 1, 1, 1)


def _fit(x_CHW: Tensor, size: tuple[int, int]) -> Tensor:
    return center_crop(resize(x_CHW, min(size), antialias=True), list(size))


def _folder_images(root: Path, n: int, generator: torch.Generator) -> list[np.ndarray]:
    paths = sorted(p for p in root.rglob("*") if p.suffix.lower() in _IMAGE_SUFFIXES and not p.name.startswith("."))
    if not paths:
        raise ValueError(f"no images ({', '.join(_IMAGE_SUFFIXES)}) under the mixing set folder {root}")
    chosen = torch.randperm(len(paths), generator=generator)[:n].sort().values.tolist()
    return [_read_image(paths[i]) for i in chosen]


def _read_image(path: Path) -> np.ndarray:
    try:
        return decode_image(path.read_bytes())
    except (OSError, ValueError, SyntaxError) as err:
        raise ValueError(f"mixing set image {path} is unreadable ({err}); remove it or convert it to PNG") from None


def _shard_images(source: str, n: int) -> list[np.ndarray]:
    images = []
    for sample in ShardDataset(source):
        images.append(sample["image"])
        if len(images) == n:
            break
    if not images:
        raise ValueError(f"no decodable images in the mixing set shards {source}")
    return images
