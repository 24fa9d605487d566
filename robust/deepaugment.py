"""DeepAugment (Hendrycks et al. 2021, "The Many Faces of Robustness", sec. 4): pass images through an
image-to-image network whose weights and activations are randomly perturbed.

The paper used pretrained EDSR and CAE networks; none are available here, so the network is a small
convolutional autoencoder built in the project: trained briefly on the local data (``train_autoencoder``)
or loaded from ``DeepAugConfig.checkpoint`` (a state_dict file, e.g. written with
``safetensors.torch.save_file(net.state_dict(), path)``).

Perturbations, a simple subset of the paper's CAE distortions (``CAE_distort_imagenet.py``), drawn
afresh for every ``images_per_copy`` images (the paper re-drew the weights every ~20 images):

- weights: ``layers`` conv layers chosen at random get ONE of: multiplicative noise
  w <- w (1 + weight_noise * eps), eps ~ N(0, 1); each output filter (weight and bias) zeroed with
  probability ``filter_zero``; or each output filter negated with probability ``filter_flip``;
- activations: the bottleneck code gets ONE of: z <- z (1 + latent_noise * eps); each spatial
  position zeroed with probability ``latent_zero``; or negated with probability ``latent_flip``.

The kind is drawn uniformly among those with a non-zero strength, once per copy, as each of the
paper's networks got one distortion option (all at once wash the image out).

With every strength 0 the perturbed network is the autoencoder itself, bit for bit. The output is a
sigmoid, so DeepAugment images are always in [0, 1].
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call
from tqdm.auto import tqdm

from robust.augment import as_unit_float, to_dtype_of
from robust.data.shards import Manifest, encode_png, make_sample, write_shards
from robust.models.timm_models import load_weights

DOWNSAMPLE = 4  # the autoencoder's total stride: image sides must be multiples of it
_BATCH = 256  # images per forward pass when a whole data set is augmented


@dataclass
class DeepAugConfig:
    """The autoencoder, its brief training, its perturbations, and the size of the generated copy."""

    # 16 channels and 200 steps reconstruct the 32 px digits to a mean L1 error of ~0.01 in ~15 s
    width: int = 16  # channels after the first stride-2 conv (doubled after the second)
    latent_channels: int = 16
    checkpoint: str | None = None  # a state_dict of this autoencoder; None: train it on the data
    train_steps: int = 200
    batch_size: int = 64
    lr: float = 2e-3
    seed: int = 0
    # strengths chosen by eye on digits: most copies stay recognisable, a few are washed out
    layers: int = 2
    weight_noise: float = 0.8
    filter_zero: float = 0.25
    filter_flip: float = 0.15
    latent_noise: float = 0.5
    latent_zero: float = 0.25
    latent_flip: float = 0.15
    images_per_copy: int = 16
    copies: int = 1  # DeepAugment copies of the data set (``deepaugment_dataset``)


class ConvAutoencoder(nn.Module):
    """[0, 1] RGB -> code (latent_channels, H/4, W/4) -> [0, 1] RGB; no normalisation layers, so a
    perturbed copy behaves the same on one image and on a batch."""

    def __init__(self, width: int, latent_channels: int) -> None:
        super().__init__()
        w = width
        self.encoder = nn.Sequential(
            nn.Conv2d(3, w, 4, stride=2, padding=1), nn.LeakyReLU(0.2),
            nn.Conv2d(w, 2 * w, 4, stride=2, padding=1), nn.LeakyReLU(0.2),
            nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.LeakyReLU(0.2),
            nn.Conv2d(2 * w, latent_channels, 1),
        )
        self.decoder = nn.Sequential(
            nn.Conv2d(latent_channels, 2 * w, 3, padding=1), nn.LeakyReLU(0.2),
            nn.ConvTranspose2d(2 * w, w, 4, stride=2, padding=1), nn.LeakyReLU(0.2),
            nn.ConvTranspose2d(w, w, 4, stride=2, padding=1), nn.LeakyReLU(0.2),
            nn.Conv2d(w, 3, 3, padding=1),
        )

    def forward(self, x_BCHW: Tensor, latent_mask: Tensor | None = None) -> Tensor:
        z = self.encoder(2 * x_BCHW - 1)
        if latent_mask is not None:
            z = z * latent_mask
        return torch.sigmoid(self.decoder(z))


def build_autoencoder(cfg: DeepAugConfig) -> ConvAutoencoder:
    """The autoencoder, initialised from ``cfg.seed`` (the global RNG is left as it was), with
    ``cfg.checkpoint`` loaded when set."""
    if cfg.width < 1 or cfg.latent_channels < 1:
        raise ValueError(f"DeepAugment autoencoder needs width and latent_channels >= 1, got {cfg.width}, "
                         f"{cfg.latent_channels}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        net = ConvAutoencoder(cfg.width, cfg.latent_channels)
    if cfg.checkpoint:
        load_weights(net, cfg.checkpoint)
    return net.eval()


def train_autoencoder(net: ConvAutoencoder, x_BCHW: Tensor, cfg: DeepAugConfig, *,
                      progress: bool = True) -> ConvAutoencoder:
    """Train ``net`` in place to reconstruct ``x`` (uint8 or [0, 1]) with an L1 loss; returns it in
    eval mode. Deterministic given ``cfg.seed`` and the initial weights."""
    x = as_unit_float(x_BCHW)
    _check_size(x)
    generator = torch.Generator().manual_seed(cfg.seed)
    device = next(net.parameters()).device
    optimizer = torch.optim.Adam(net.parameters(), lr=cfg.lr)
    net.train()
    for _ in tqdm(range(cfg.train_steps), desc="deepaugment autoencoder", disable=not progress):
        batch = x[torch.randint(0, len(x), (cfg.batch_size,), generator=generator)].to(device)
        loss = F.l1_loss(net(batch), batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return net.eval()


def autoencoder_for(x_BCHW: Tensor, cfg: DeepAugConfig, *, progress: bool = True) -> ConvAutoencoder:
    """The DeepAugment network: ``cfg.checkpoint``'s autoencoder when set, else one trained on ``x``."""
    net = build_autoencoder(cfg)
    return net if cfg.checkpoint else train_autoencoder(net, x_BCHW, cfg, progress=progress)


def deepaugment(x_BCHW: Tensor, net: ConvAutoencoder, cfg: DeepAugConfig, *, generator: torch.Generator) -> Tensor:
    """DeepAugment images of a batch (uint8 or [0, 1] float; same dtype out), a freshly perturbed copy
    of ``net`` per ``cfg.images_per_copy`` images. Deterministic given ``generator`` (a CPU generator)."""
    _check_perturbations(cfg)
    x = as_unit_float(x_BCHW)
    _check_size(x)
    device = next(net.parameters()).device
    chunks = []
    with torch.no_grad():
        for chunk in x.split(cfg.images_per_copy):
            params = perturbed_parameters(net, cfg, generator=generator)
            mask = latent_mask(len(chunk), *chunk.shape[-2:], net, cfg, generator=generator)
            chunks.append(functional_call(net, params, (chunk.to(device),), {"latent_mask": mask.to(device)}))
    return to_dtype_of(torch.cat(chunks).to(x.device), x_BCHW)


def perturbed_parameters(net: ConvAutoencoder, cfg: DeepAugConfig, *, generator: torch.Generator) -> dict[str, Tensor]:
    """``net``'s parameters with ``cfg.layers`` random conv layers perturbed (module docstring)."""
    params = {name: p.detach() for name, p in net.named_parameters()}
    convs = [(name, m) for name, m in net.named_modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))]
    kind = _one_kind({"noise": cfg.weight_noise, "zero": cfg.filter_zero, "flip": cfg.filter_flip}, generator)
    for i in torch.randperm(len(convs), generator=generator)[: cfg.layers].tolist():
        name, conv = convs[i]
        out_dim = 1 if isinstance(conv, nn.ConvTranspose2d) else 0  # ConvTranspose2d weights are (in, out, kh, kw)
        weight = conv.weight.detach()
        filter_scale = _keep_flip_or_zero(weight.shape[out_dim], kind["zero"], kind["flip"], generator)
        noise = 1 + kind["noise"] * torch.randn(weight.shape, generator=generator)
        shape = [1] * weight.ndim
        shape[out_dim] = -1
        params[f"{name}.weight"] = weight * (noise * filter_scale.view(shape)).to(weight)
        if conv.bias is not None:
            params[f"{name}.bias"] = conv.bias.detach() * filter_scale.to(conv.bias)
    return params


def latent_mask(batch: int, height: int, width: int, net: ConvAutoencoder, cfg: DeepAugConfig, *,
                generator: torch.Generator) -> Tensor:
    """The multiplicative bottleneck perturbation (B, latent_channels, H/4, W/4) (module docstring)."""
    channels = net.encoder[-1].out_channels
    h, w = height // DOWNSAMPLE, width // DOWNSAMPLE
    kind = _one_kind({"noise": cfg.latent_noise, "zero": cfg.latent_zero, "flip": cfg.latent_flip}, generator)
    positions = _keep_flip_or_zero(batch * h * w, kind["zero"], kind["flip"], generator).view(batch, 1, h, w)
    return (1 + kind["noise"] * torch.randn(batch, channels, h, w, generator=generator)) * positions


def _one_kind(strengths: dict[str, float], generator: torch.Generator) -> dict[str, float]:
    """Keep one of the non-zero strengths, drawn uniformly, and zero the others."""
    enabled = [name for name, value in strengths.items() if value > 0]
    if not enabled:
        return strengths
    chosen = enabled[int(torch.randint(0, len(enabled), (1,), generator=generator))]
    return {name: value if name == chosen else 0.0 for name, value in strengths.items()}


def deepaugment_dataset(x_NHWC: np.ndarray, y_N: np.ndarray, net: ConvAutoencoder, cfg: DeepAugConfig, *,
                        seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``cfg.copies`` DeepAugment copies of a uint8 (N, H, W, 3) data set, copy-major, with their labels:
    ((copies * N, H, W, 3) uint8, (copies * N,)); the same as one ``deepaugment`` call per copy on the
    whole set with ``generator=torch.Generator().manual_seed(seed)``, computed in bounded batches."""
    if x_NHWC.dtype != np.uint8 or x_NHWC.ndim != 4 or len(x_NHWC) != len(y_N):
        raise ValueError(f"expected uint8 images (N, H, W, 3) and N labels, got {x_NHWC.dtype} {x_NHWC.shape} "
                         f"and {len(y_N)} labels")
    if cfg.copies < 1:
        raise ValueError(f"DeepAugment copies must be >= 1, got {cfg.copies}")
    generator = torch.Generator().manual_seed(seed)
    x_BCHW = torch.from_numpy(x_NHWC).permute(0, 3, 1, 2)
    batch_size = cfg.images_per_copy * max(1, _BATCH // cfg.images_per_copy)  # whole copies per batch
    copies = [torch.cat([deepaugment(batch, net, cfg, generator=generator) for batch in x_BCHW.split(batch_size)])
              for _ in range(cfg.copies)]
    return torch.cat(copies).permute(0, 2, 3, 1).numpy(), np.tile(y_N, cfg.copies)


def write_deepaugment_shards(x_NHWC: np.ndarray, y_N: np.ndarray, out_dir: str | Path, net: ConvAutoencoder,
                             cfg: DeepAugConfig, *, seed: int, prefix: str = "deepaugment",
                             max_per_shard: int = 1000, num_classes: int | None = None) -> Manifest:
    """``deepaugment_dataset`` written as PNG shards (keys ``da<copy>-<index>``) with their manifest."""
    x_da, y_da = deepaugment_dataset(x_NHWC, y_N, net, cfg, seed=seed)
    n = len(x_NHWC)
    samples = (make_sample(f"da{i // n}-{i % n:09d}", encode_png(image), int(label)) for i, (image, label) in
               enumerate(zip(x_da, y_da)))
    return write_shards(samples, out_dir, prefix=prefix, max_per_shard=max_per_shard, num_classes=num_classes)


def _keep_flip_or_zero(n: int, p_zero: float, p_flip: float, generator: torch.Generator) -> Tensor:
    """n factors: 0 with probability p_zero, -1 with probability p_flip, else 1."""
    u = torch.rand(n, generator=generator)
    return torch.where(u < p_zero, 0.0, torch.where(u < p_zero + p_flip, -1.0, 1.0))


def _check_perturbations(cfg: DeepAugConfig) -> None:
    if cfg.images_per_copy < 1 or cfg.layers < 0:
        raise ValueError(f"DeepAugment needs images_per_copy >= 1 and layers >= 0, got {cfg.images_per_copy}, "
                         f"{cfg.layers}")
    probabilities = (cfg.filter_zero, cfg.filter_flip, cfg.latent_zero, cfg.latent_flip)
    if min(cfg.weight_noise, cfg.latent_noise) < 0 or not all(0 <= p <= 1 for p in probabilities):
        raise ValueError("DeepAugment noise strengths must be >= 0 and the zero/flip probabilities in [0, 1]")


def _check_size(x_BCHW: Tensor) -> None:
    if x_BCHW.shape[-1] % DOWNSAMPLE or x_BCHW.shape[-2] % DOWNSAMPLE:
        raise ValueError(f"DeepAugment's autoencoder needs image sides that are multiples of {DOWNSAMPLE}, got "
                         f"{tuple(x_BCHW.shape[-2:])}; resize or crop the images")

