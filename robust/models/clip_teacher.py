"""CLIP zero-shot teacher (DAD, seed 000): open_clip model + cached prompt-ensemble class embeddings.

logits = exp(logit_scale) * normalize(f_image(x)) @ W_DK, where column k of W_DK is the class-k text
embedding averaged over the prompt templates (each L2-normalised, then the mean re-normalised).
Input: RGB in [0, 1]; the teacher resizes to CLIP's input size and applies CLIP's mean/std itself.
Weights are fp32 (open_clip's own ``precision`` stays at its fp32 default); bf16 comes from the
caller's autocast (``robust.models.precision``), under which the image tower runs in bf16 and the
normalisation and scaled cosine stay fp32.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import open_clip
import safetensors.torch
import torch
import torch.nn.functional as F
from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES, OPENAI_IMAGENET_TEMPLATES
from torch import nn

from robust.models.normalize import normalize_images


LOCAL_DIR = "local-dir:"  # open_clip's schema for a folder with open_clip_config.json (+ weights)


@dataclass
class ClipTeacherConfig:
    arch: str = "ViT-L-14"  # an open_clip model name (open_clip.list_models()) or local-dir:<folder>
    pretrained: str = "openai"  # open_clip tag, local checkpoint path, or "" for random init
    class_names: list[str] = field(default_factory=list)  # empty: the 1000 ImageNet classes
    templates: list[str] = field(default_factory=list)  # "{}" marks the class; empty: the 80 OpenAI ones
    cache_dir: str = "~/.cache/robust-distill/clip"  # class-embedding matrices
    compile: bool = False  # torch.compile the image tower (in place: names and state_dict unchanged)


class ClipTeacher(nn.Module):
    """Frozen zero-shot classifier; differentiable w.r.t. its input (the DAD attack needs that)."""

    def __init__(self, clip: nn.Module, class_embeddings_DK: torch.Tensor, *, cache_hit: bool = False) -> None:
        super().__init__()
        pp = open_clip.get_model_preprocess_cfg(clip)
        self.clip = clip.requires_grad_(False)
        size = pp["size"]
        self.image_size: tuple[int, int] = (size, size) if isinstance(size, int) else tuple(size)
        self.register_buffer("mean_C", torch.tensor(pp["mean"], dtype=torch.float32), persistent=False)
        self.register_buffer("std_C", torch.tensor(pp["std"], dtype=torch.float32), persistent=False)
        self.register_buffer("class_embeddings_DK", class_embeddings_DK.float(), persistent=False)
        self.cache_hit = cache_hit  # whether the class embeddings came from the disk cache
        self.eval()

    def train(self, mode: bool = True) -> ClipTeacher:
        return super().train(False)  # a teacher stays in eval mode

    def logits_and_features(self, x01_BCHW: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits_BK, L2-normalised image features_BD)."""
        if x01_BCHW.shape[-2:] != self.image_size:  # non-square inputs are squashed: crop them first
            x01_BCHW = F.interpolate(x01_BCHW, size=self.image_size, mode="bicubic", antialias=True)
        x_BCHW = normalize_images(x01_BCHW, self.mean_C, self.std_C)
        image_BD = self.clip.encode_image(x_BCHW)  # bf16 under a caller's bf16 autocast
        with torch.autocast(x_BCHW.device.type, enabled=False):
            # fp32 head: a trained CLIP's logits (scale 100, values ~20-30) would round to steps of 1/8 in bf16
            features_BD = F.normalize(image_BD.float(), dim=-1)
            logits_BK = self.clip.logit_scale.exp() * features_BD @ self.class_embeddings_DK
        return logits_BK, features_BD

    def forward(self, x01_BCHW: torch.Tensor) -> torch.Tensor:
        return self.logits_and_features(x01_BCHW)[0]


def build_clip_teacher(cfg: ClipTeacherConfig, *, device: str | torch.device = "cpu") -> ClipTeacher:
    """Create the open_clip model (fp32, channels-last on CUDA) and its class embeddings (from the disk
    cache when present); with ``cfg.compile`` the image tower is compiled on first use."""
    clip = open_clip.create_model(cfg.arch, pretrained=_weights(cfg), device=device)
    if torch.device(device).type == "cuda":  # convolutional towers (ResNets, the ViT patch embedding)
        clip = clip.to(memory_format=torch.channels_last)
    class_names = list(cfg.class_names) or list(IMAGENET_CLASSNAMES)
    templates = list(cfg.templates) or default_templates()
    embeddings_DK, hit = class_embeddings(clip, cfg.arch, class_names, templates, cache_dir=cfg.cache_dir)
    if cfg.compile:
        clip.visual.compile()
    return ClipTeacher(clip, embeddings_DK, cache_hit=hit)


def check_clip(cfg: ClipTeacherConfig, *, key: str) -> None:
    """Everything about a CLIP teacher config that can fail before the model is built, naming ``key``."""
    try:
        _weights(cfg)
    except ValueError as err:
        raise ValueError(f"{key}: {err}") from None
    bad = [t for t in cfg.templates if "{}" not in t]
    if bad:
        raise ValueError(f"{key}.templates {bad} lack the '{{}}' class placeholder, e.g. 'a photo of a {{}}.'")


def _weights(cfg: ClipTeacherConfig) -> str | None:
    """The ``pretrained`` argument for open_clip: a tag, an existing file, or None (random init, or the
    weights of a ``local-dir:`` folder, which open_clip reads beside its open_clip_config.json)."""
    if cfg.arch.startswith(LOCAL_DIR):
        folder = Path(cfg.arch.removeprefix(LOCAL_DIR)).expanduser()
        if not (folder / "open_clip_config.json").is_file():
            raise ValueError(f"arch {cfg.arch!r}: {folder} has no open_clip_config.json; pass a folder that "
                             "open_clip.create_model('local-dir:...') reads, or an open_clip model name")
        if cfg.pretrained:
            raise ValueError(f"arch {cfg.arch!r} holds its own weights: leave pretrained empty")
        return None
    if cfg.arch not in open_clip.list_models():
        raise ValueError(f"unknown open_clip arch {cfg.arch!r}; pick one of open_clip.list_models() or a "
                         "local-dir:<folder> with open_clip_config.json")
    tags = open_clip.list_pretrained_tags_by_model(cfg.arch)
    if not cfg.pretrained or cfg.pretrained in tags:
        return cfg.pretrained or None
    path = Path(cfg.pretrained).expanduser()
    if not path.is_file():
        raise ValueError(
            f"pretrained={cfg.pretrained!r} is neither an open_clip tag of {cfg.arch} {tags} nor an existing "
            "file; pass a tag, a local checkpoint path, or '' for random init"
        )
    return str(path)


def default_templates() -> list[str]:
    """open_clip's 80 OpenAI ImageNet prompt templates as format strings ("a photo of a {}.")."""
    return [template("{}") for template in OPENAI_IMAGENET_TEMPLATES]


def class_embeddings(
    clip: nn.Module, arch: str, class_names: list[str], templates: list[str], *, cache_dir: str
) -> tuple[torch.Tensor, bool]:
    """(W_DK, cache_hit): prompt-ensemble text embeddings, read from / written to ``cache_dir``.

    The key hashes the arch, class names, templates and the text tower's weights; the weights stand in
    for the tag or path, so a retrained checkpoint or another random init never reads a stale matrix.
    """
    bad = [t for t in templates if "{}" not in t]
    if bad:
        raise ValueError(f"templates {bad} lack the '{{}}' class placeholder, e.g. 'a photo of a {{}}.'")
    key = _cache_key(clip, arch, class_names, templates)
    stem = re.sub(r"[^\w.-]", "_", arch)  # a model name or a local-dir: path, as one file name
    path = Path(cache_dir).expanduser() / f"{stem}-{key[:20]}.safetensors"
    device = next(clip.parameters()).device
    if path.is_file():
        return safetensors.torch.load_file(str(path), device=str(device))["class_embeddings_DK"], True
    tokenizer = open_clip.get_tokenizer(arch)
    W_DK = open_clip.build_zero_shot_classifier(clip, tokenizer, class_names, templates, device=device)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")  # several teacher actors may build at once
    safetensors.torch.save_file({"class_embeddings_DK": W_DK.float().cpu().contiguous()}, str(tmp))
    os.replace(tmp, path)
    return W_DK.float(), False


def _cache_key(clip: nn.Module, arch: str, class_names: list[str], templates: list[str]) -> str:
    digest = hashlib.sha256(json.dumps([arch, class_names, templates]).encode())
    for name, tensor in clip.state_dict().items():
        if not name.startswith("visual."):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
