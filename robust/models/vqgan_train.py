"""A small VQGAN trainer for the local data set (32 px digits): L1 + VQ loss, optional hinge GAN term.

No perceptual (LPIPS) term: its VGG weights cannot be downloaded here. The adversarial term uses
taming's PatchGAN discriminator and hinge loss with a fixed weight (no adaptive weight).
Beyond taming, for short runs: codes unused for ``restart_every`` steps move onto encoder outputs
(step 0 = data-dependent init) and the learning rate decays with a cosine. Digits, 600 steps of 8
(about a CPU minute): held-out PSNR 32.7 dB with 127/128 codes in use; without restarts 31.2 dB, 42 codes.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
from taming.modules.discriminator.model import NLayerDiscriminator, weights_init
from taming.modules.losses.vqperceptual import hinge_d_loss
from torch import nn
from tqdm import tqdm

from robust.models.vqgan import VQGAN, VQGAN_PRESETS, VQGANConfig, discretize


@dataclass
class VQGANTrainConfig:
    vqgan: VQGANConfig = field(default_factory=lambda: VQGANConfig(**VQGAN_PRESETS["digits32_f4_128"]))
    batch_size: int = 8  # many small steps beat few large ones in a one-minute CPU budget
    lr: float = 5e-3  # peak; cosine decay to 0 over the run
    codebook_weight: float = 1.0
    restart_every: int = 20  # steps between dead-code restarts (step 0 = data init); 0 disables
    restart_until: float = 0.75  # fraction of the steps after which codes stay put and the decoder settles
    adv_weight: float = 0.0  # 0 disables the adversarial term
    adv_start: int = 0  # first step with the adversarial term
    disc_layers: int = 2
    disc_ndf: int = 32
    seed: int = 0


def generator_loss(
    vqgan: VQGAN, disc: nn.Module | None, x_BCHW: torch.Tensor, *, cfg: VQGANTrainConfig
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, float]]:
    """(loss, reconstruction, code indices, logs) for [-1, 1] images: L1 + VQ (+ adv_weight * -D(rec))."""
    rec_BCHW, vq_loss, codes = vqgan(x_BCHW)
    l1 = (rec_BCHW - x_BCHW).abs().mean()
    loss = l1 + cfg.codebook_weight * vq_loss
    logs = {"l1": l1.item(), "vq": vq_loss.item()}
    if disc is not None:
        g_adv = -disc(rec_BCHW).mean()  # hinge generator loss
        loss = loss + cfg.adv_weight * g_adv
        logs["g_adv"] = g_adv.item()
    return loss, rec_BCHW, codes, logs


def discriminator_loss(disc: nn.Module, x_BCHW: torch.Tensor, rec_BCHW: torch.Tensor) -> torch.Tensor:
    return hinge_d_loss(disc(x_BCHW), disc(rec_BCHW.detach()))


def train_step(
    vqgan: VQGAN,
    disc: nn.Module | None,
    opt_g: torch.optim.Optimizer,
    opt_d: torch.optim.Optimizer | None,
    x01_BCHW: torch.Tensor,
    *,
    cfg: VQGANTrainConfig,
) -> tuple[dict[str, float], torch.Tensor]:
    """One generator step (and one discriminator step when ``disc``) on [0, 1] images: (logs, codes used)."""
    x_BCHW = 2 * x01_BCHW - 1
    loss, rec_BCHW, codes, logs = generator_loss(vqgan, disc, x_BCHW, cfg=cfg)
    opt_g.zero_grad(set_to_none=True)
    loss.backward()
    opt_g.step()
    if disc is not None and opt_d is not None:
        d_loss = discriminator_loss(disc, x_BCHW, rec_BCHW)
        opt_d.zero_grad(set_to_none=True)
        d_loss.backward()
        opt_d.step()
        logs["d"] = d_loss.item()
    return logs, codes


@torch.no_grad()
def restart_dead_codes(
    vqgan: VQGAN, x01_BCHW: torch.Tensor, usage_K: torch.Tensor, *, generator: torch.Generator
) -> int:
    """Move the codes with zero usage onto random encoder outputs of the batch; return how many.

    Without this most of a small codebook never gets picked and PSNR stalls; called at step 0 with
    zero usage, it is a data-dependent codebook initialisation.
    """
    dead_N = (usage_K == 0).nonzero().squeeze(1)
    if len(dead_N) > 0:
        h_BDhw = vqgan.quant_conv(vqgan.encoder(2 * x01_BCHW - 1))
        h_MD = h_BDhw.permute(0, 2, 3, 1).reshape(-1, h_BDhw.shape[1])
        pick_N = torch.randint(len(h_MD), (len(dead_N),), generator=generator)
        vqgan.quantize.embedding.weight[dead_N] = h_MD[pick_N]
    return len(dead_N)


def psnr(vqgan: VQGAN, x01_BCHW: torch.Tensor) -> float:
    """PSNR in dB of Q(x) against x, from the mean squared error over all pixels."""
    mse = (discretize(vqgan, x01_BCHW) - x01_BCHW).square().mean().item()
    return 10 * math.log10(1 / max(mse, 1e-12))


def train_vqgan(
    x_train_BCHW: torch.Tensor, cfg: VQGANTrainConfig, *, steps: int, progress: bool = True
) -> tuple[VQGAN, dict[str, float]]:
    """Train a VQGAN on [0, 1] images; return it frozen and stats (first/last L1, PSNR, seconds).

    Save it with ``safetensors.torch.save_file(vqgan.state_dict(), path)``; ``build_vqgan`` loads that.
    """
    if cfg.adv_weight > 0 and cfg.adv_start >= steps:
        raise ValueError(f"adv_start={cfg.adv_start} >= steps={steps}: the adversarial term would never run")
    with torch.random.fork_rng():  # seeded init without touching the caller's RNG
        torch.manual_seed(cfg.seed)
        vqgan = VQGAN(cfg.vqgan)
        disc = None
        if cfg.adv_weight > 0:
            disc = NLayerDiscriminator(cfg.vqgan.out_ch, cfg.disc_ndf, cfg.disc_layers).apply(weights_init)
    opt_g = torch.optim.Adam(vqgan.parameters(), lr=cfg.lr, betas=(0.5, 0.9))  # taming's betas
    opt_d = None if disc is None else torch.optim.Adam(disc.parameters(), lr=cfg.lr, betas=(0.5, 0.9))
    # cosine decay to 0: short runs end on a settled model
    sched_g = torch.optim.lr_scheduler.CosineAnnealingLR(opt_g, steps)
    sched_d = None if opt_d is None else torch.optim.lr_scheduler.CosineAnnealingLR(opt_d, steps - cfg.adv_start)
    gen = torch.Generator().manual_seed(cfg.seed)
    usage_K = torch.zeros(cfg.vqgan.n_embed, dtype=torch.long)
    start, l1_hist = time.perf_counter(), []
    bar = tqdm(range(steps), desc="vqgan", disable=not progress)
    for step in bar:
        x01_BCHW = x_train_BCHW[torch.randint(len(x_train_BCHW), (cfg.batch_size,), generator=gen)]
        if cfg.restart_every and step % cfg.restart_every == 0 and step < cfg.restart_until * steps:
            restart_dead_codes(vqgan, x01_BCHW, usage_K, generator=gen)
            usage_K.zero_()
        adversarial = disc is not None and step >= cfg.adv_start
        logs, codes = train_step(
            vqgan, disc if adversarial else None, opt_g, opt_d if adversarial else None, x01_BCHW, cfg=cfg
        )
        sched_g.step()
        if adversarial and sched_d is not None:
            sched_d.step()
        usage_K += torch.bincount(codes, minlength=cfg.vqgan.n_embed)
        l1_hist.append(logs["l1"])
        bar.set_postfix({k: f"{v:.4f}" for k, v in logs.items()}, refresh=False)
    vqgan.requires_grad_(False).eval()  # ready to serve as Q
    window = max(1, min(10, steps // 4))  # mean of a few steps: single-batch L1 is noisy
    stats = {
        "l1_first": sum(l1_hist[:window]) / window,
        "l1_last": sum(l1_hist[-window:]) / window,
        "psnr_db": psnr(vqgan, x_train_BCHW),
        "seconds": time.perf_counter() - start,
    }
    return vqgan, stats
