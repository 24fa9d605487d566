"""VQGAN discretizer Q of DAD (seed 000), built from taming's modules.

Q(x) = (clamp(decode(quantize(encode(2x - 1))), -1, 1) + 1) / 2, frozen, without autograd.
Only taming's building blocks are imported: ``taming.models.vqgan`` needs pytorch-lightning < 2.
The submodule names match taming's ``VQModel``, so its ``.ckpt`` files load strictly.
"""

from __future__ import annotations

import pickle
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from taming.modules.diffusionmodules.model import Decoder, Encoder
from taming.modules.vqvae.quantize import VectorQuantizer2
from torch import nn

from robust.models.precision import autocast
from robust.models.weights import load_strict

_DDCONFIG_FIELDS = (
    "double_z", "z_channels", "resolution", "in_channels", "out_ch",
    "ch", "ch_mult", "num_res_blocks", "attn_resolutions", "dropout",
)  # fmt: skip


@dataclass
class VQGANConfig:
    """taming's ddconfig + quantizer sizes; the defaults are the OpenImages f8-16384 model DAD used."""

    double_z: bool = False
    z_channels: int = 4
    resolution: int = 256  # training resolution: places attention where the feature map is attn_resolutions
    in_channels: int = 3
    out_ch: int = 3
    ch: int = 128
    ch_mult: list[int] = field(default_factory=lambda: [1, 2, 2, 4])  # downsampling f = 2^(len - 1)
    num_res_blocks: int = 2
    attn_resolutions: list[int] = field(default_factory=lambda: [32])
    dropout: float = 0.0
    embed_dim: int = 4
    n_embed: int = 16384
    checkpoint: str = ""  # taming .ckpt, or .safetensors state_dict; "" = random init
    channels_last: bool = True  # CUDA only
    compile: bool = False  # torch.compile the encoder and decoder (in place: names and state_dict unchanged)
    chunk_size: int = 64  # images per encode/decode in discretize (bounds memory); 0 = whole batch


# Public checkpoints (taming-transformers / latent-diffusion model zoo); use as load_config presets.
VQGAN_PRESETS: dict[str, dict[str, Any]] = {
    "openimages_f8_16384": {},  # the defaults
    "imagenet_f16_1024": dict(
        z_channels=256, embed_dim=256, n_embed=1024, ch_mult=[1, 1, 2, 2, 4], attn_resolutions=[16]
    ),
    "imagenet_f16_16384": dict(
        z_channels=256, embed_dim=256, n_embed=16384, ch_mult=[1, 1, 2, 2, 4], attn_resolutions=[16]
    ),
    # trained here by vqgan_train on the 32 px digits: 8x8 latents x 128 codes, 32 channels throughout
    "digits32_f4_128": dict(
        resolution=32,
        ch=32,
        ch_mult=[1, 1, 1],
        num_res_blocks=1,
        attn_resolutions=[],
        z_channels=32,
        embed_dim=32,
        n_embed=128,
    ),
    # the same with one more downsampling and no residual blocks: 4x4 latents x 128 codes, a coarser
    # discretizer (about 23 dB on the digits test split against 32.6 dB) that preset=local's DAD uses
    "digits32_f8_128": dict(
        resolution=32,
        ch=32,
        ch_mult=[1, 1, 1, 1],
        num_res_blocks=0,
        attn_resolutions=[],
        z_channels=32,
        embed_dim=32,
        n_embed=128,
    ),
}


class VQGAN(nn.Module):
    """taming's ``VQModel`` minus the training loss: encoder, quant_conv, quantize, post_quant_conv, decoder."""

    def __init__(self, cfg: VQGANConfig) -> None:
        super().__init__()
        if cfg.double_z:
            raise ValueError("double_z=True is the KL autoencoder's layout; a VQGAN needs double_z=False")
        ddconfig = {k: v for k, v in asdict(cfg).items() if k in _DDCONFIG_FIELDS}
        self.cfg = cfg
        self.encoder = Encoder(**ddconfig)
        self.decoder = Decoder(**ddconfig)
        # legacy=False weighs the commitment term by beta as in VQ-VAE (eq. 3); it only affects training.
        self.quantize = VectorQuantizer2(cfg.n_embed, cfg.embed_dim, beta=0.25, legacy=False)
        self.quant_conv = nn.Conv2d(cfg.z_channels, cfg.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(cfg.embed_dim, cfg.z_channels, 1)

    def encode(self, x_BCHW: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """[-1, 1] images -> (quantized latents, codebook + commitment loss, code indices)."""
        h = self.quant_conv(self.encoder(x_BCHW))
        with torch.autocast(h.device.type, enabled=False):
            # nearest-code search in fp32 even under autocast: bf16 distances would pick wrong codes
            quant, vq_loss, (_, _, codes) = self.quantize(h.float())
        return quant, vq_loss, codes

    def decode(self, quant: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(quant))

    def forward(self, x_BCHW: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """[-1, 1] images -> (reconstruction in about [-1, 1], VQ loss, code indices): the training pass."""
        quant, vq_loss, codes = self.encode(x_BCHW)
        return self.decode(quant), vq_loss, codes


@torch.no_grad()
def discretize(vqgan: VQGAN, x01_BCHW: torch.Tensor, *, precision: str = "auto") -> torch.Tensor:
    """Q(x) of DAD: [0, 1] images -> VQGAN reconstruction in [0, 1], same shape; no gradient flows.

    Encoder and decoder run under ``autocast(precision)`` ("auto": bf16 on CUDA, fp32 on CPU); the
    nearest-code search stays fp32 (``VQGAN.encode``).
    """
    cfg = vqgan.cfg
    memory_format = torch.channels_last if x01_BCHW.is_cuda and cfg.channels_last else torch.contiguous_format
    outs = []
    for x01 in x01_BCHW.split(cfg.chunk_size or len(x01_BCHW)):
        with autocast(precision, device=x01.device):
            x_pm1 = (2 * x01 - 1).contiguous(memory_format=memory_format)
            rec = vqgan.decode(vqgan.encode(x_pm1)[0])
        outs.append((rec.float().clamp(-1, 1) + 1) / 2)
    return torch.cat(outs).to(x01_BCHW.dtype)


def build_vqgan(cfg: VQGANConfig, *, device: str | torch.device = "cpu") -> VQGAN:
    """A frozen, eval-mode fp32 VQGAN on ``device`` with ``cfg.checkpoint`` loaded (random init when "");
    with ``cfg.compile`` its encoder and decoder are compiled on first use."""
    vqgan = VQGAN(cfg)
    if cfg.checkpoint:
        load_vqgan_weights(vqgan, cfg.checkpoint)
    vqgan = vqgan.requires_grad_(False).eval().to(device)
    if vqgan.quant_conv.weight.is_cuda and cfg.channels_last:
        vqgan = vqgan.to(memory_format=torch.channels_last)
    if cfg.compile:
        vqgan.encoder.compile()
        vqgan.decoder.compile()
    return vqgan


def load_vqgan_weights(vqgan: VQGAN, path: str | Path) -> None:
    """Load a taming checkpoint strictly, ignoring its ``loss.*`` (discriminator, LPIPS) entries."""
    state_dict = {k: v for k, v in read_state_dict(path).items() if not k.startswith("loss.")}
    load_strict(vqgan, state_dict, source=f"VQGAN checkpoint {str(path)!r}",
                hint="pick the preset the checkpoint was trained with")


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a .safetensors file, or the ``state_dict`` of a (taming/Lightning) torch checkpoint."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ValueError(f"VQGAN checkpoint {str(path)!r} does not exist; pass a taming .ckpt or .safetensors")
    if path.suffix == ".safetensors":
        return safetensors.torch.load_file(str(path))
    ckpt = _load_inert(path)
    state_dict = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise ValueError(f"{str(path)!r} holds no state_dict of tensors; pass a taming VQGAN checkpoint")
    return state_dict


class _Inert:
    """Stand-in for a global a checkpoint names but that is never imported: accepts and keeps anything."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._args = (args, kwargs)

    def __setstate__(self, state: Any) -> None:
        self._state = state


def _load_inert(path: Path) -> Any:
    """``torch.load(weights_only=True)``, where every global outside torch's allowlist is an inert stand-in.

    Real taming checkpoints are Lightning checkpoints: besides "state_dict" they pickle callback
    classes (e.g. ModelCheckpoint as a dict key), optimizer states and hyper-parameters, so plain
    ``weights_only=True`` refuses them and ``weights_only=False`` would import Lightning and run
    whatever the pickle says. Instead the globals it names are listed without unpickling, and each is
    allowlisted as a fresh ``_Inert`` subclass: torch's restricted unpickler then builds harmless
    placeholders and nothing is imported or executed. Only "state_dict" is used afterwards.
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # the refusal of a global outside the allowlist
        pass
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except ValueError:  # only zip-format (torch >= 1.6) files can be scanned
        raise ValueError(
            f"{str(path)!r} is a legacy-format torch file with non-tensor objects; re-save its "
            "state_dict with torch.save or safetensors in a trusted environment"
        ) from None
    stand_ins = [(type(n.rpartition(".")[2], (_Inert,), {"__module__": n.rpartition(".")[0]}), n) for n in names]
    with torch.serialization.safe_globals(stand_ins):
        return torch.load(path, map_location="cpu", weights_only=True)
