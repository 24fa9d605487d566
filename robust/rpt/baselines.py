"""The baselines RPT is compared with (seed 002, sec. 5), as ``PartialModel`` students or state-dict ops.

Every student here has the ``PartialModel`` interface (frozen backbone, tuned part, logits per head),
so one training loop and one loss (``rpt_loss``) serve them all:

- linear probe: everything frozen but the classifier (features through the model's pooling cached-able)
- full fine-tuning: nothing frozen (the backbone is only the input normalisation)
- VPT (Jia et al. 2022, shallow): learned prompt tokens inserted after a ViT's prefix tokens; the
  blocks stay frozen, the prompts and the classifier are tuned
- APT, Only-KD, single-teacher: RPT's split with the combined head only and a loss variant (``METHODS``)
- WiSE-FT (Wortsman et al. 2022): ``wise_ft`` interpolates two state dicts
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn

from robust.rpt.losses import RptLossConfig
from robust.rpt.partial import (
    HEADS,
    FrozenBackbone,
    PartialConfig,
    PartialModel,
    TunedHeads,
    Head,
    Trunk,
    build_large_model,
    build_partial,
    check_split,
    copy_only,
    keep_only,
    model_units,
    param_ids,
    reference_input,
)


@dataclass(frozen=True)
class Method:
    student: str  # "partial" (RPT's split), "linear_probe", "full_finetune" or "vpt"
    heads: tuple[str, ...]
    kd: bool  # distils from the teachers (else CE only)
    clean_teacher: str  # teacher of clean samples when kd: "initial" or "robust"
    augmented: bool  # trains on the augmented samples as well as the clean ones


ONE = ("combined",)
METHODS: dict[str, Method] = {
    "rpt": Method("partial", HEADS, kd=True, clean_teacher="initial", augmented=True),
    "rpt_no_kd": Method("partial", HEADS, kd=False, clean_teacher="initial", augmented=True),  # appendix A.2
    "apt": Method("partial", ONE, kd=False, clean_teacher="initial", augmented=True),
    "only_kd": Method("partial", ONE, kd=True, clean_teacher="robust", augmented=True),
    "single_teacher": Method("partial", ONE, kd=True, clean_teacher="initial", augmented=True),
    "linear_probe": Method("linear_probe", ONE, kd=False, clean_teacher="initial", augmented=False),
    "full_finetune": Method("full_finetune", ONE, kd=False, clean_teacher="initial", augmented=False),
    "vpt": Method("vpt", ONE, kd=False, clean_teacher="initial", augmented=False),
}


def _method(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"method {name!r} is unknown; use one of {sorted(METHODS)}")
    return METHODS[name]


def build_method(name: str, cfg: PartialConfig) -> PartialModel:
    """The student of method ``name`` on the large model of ``cfg`` (``cfg.heads`` is the method's)."""
    method = _method(name)
    if method.student == "partial":
        return build_partial(replace(cfg, heads=list(method.heads)))
    if method.student == "linear_probe":
        return build_linear_probe(cfg)
    if method.student == "full_finetune":
        return build_full_finetune(cfg)
    return build_vpt(cfg, n_prompts=cfg.vpt_prompts)


def method_loss_config(name: str, base: RptLossConfig) -> RptLossConfig:
    """``base`` (tau, kd_weight) with the method's teachers: CE only without KD, Only-KD's robust teacher."""
    method = _method(name)
    return replace(base, kd_weight=base.kd_weight if method.kd else 0.0, clean_teacher=method.clean_teacher)


def build_full_finetune(cfg: PartialConfig) -> PartialModel:
    large = build_large_model(cfg)
    info = {"model": type(large.model).__name__, "method": "full_finetune", "input_size": list(large.input_size)}
    return PartialModel(FrozenBackbone(nn.Identity(), mean=large.mean, std=large.std),
                        TunedHeads(nn.Identity(), {"combined": large.model}),
                        num_classes=large.num_classes, info=info)  # fmt: skip


def build_linear_probe(cfg: PartialConfig) -> PartialModel:
    """The frozen model up to its pooled features (``forward_head(pre_logits=True)``), then its classifier."""
    large = build_large_model(cfg)
    model = large.model
    classifier = model.get_classifier()
    if not any(p.requires_grad for p in classifier.parameters()):
        raise ValueError("the classifier of this model is frozen (open_clip zero_shot=True); use zero_shot=false")
    x01, ref = reference_input(large)
    head = copy.deepcopy(classifier)
    keep_only(model, param_ids(model) - param_ids(classifier))
    info = {"model": type(model).__name__, "method": "linear_probe", "input_size": list(large.input_size)}
    student = PartialModel(FrozenBackbone(Trunk(model, pre_logits=True), mean=large.mean, std=large.std),
                           TunedHeads(nn.Identity(), {"combined": head}),
                           num_classes=large.num_classes, info=info)  # fmt: skip
    check_split(student, x01, ref)
    return student


class _Frozen(nn.Module):
    """Frozen layers inside the tuned part: no trainable parameters, always eval; gradients reach the input."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module.requires_grad_(False).eval()

    def train(self, mode: bool = True) -> _Frozen:
        return super().train(False)

    def forward(self, x: Tensor) -> Tensor:
        return self.module(x)


class PromptTokens(nn.Module):
    """VPT-shallow: ``n`` learned tokens inserted after the prefix (class/register) tokens, removed again
    after the frozen blocks so the model's pooling sees its usual sequence."""

    def __init__(self, blocks: nn.Module, *, n: int, dim: int, n_prefix: int, patch_area: int) -> None:
        super().__init__()
        if n < 1:
            raise ValueError(f"large.vpt_prompts={n} must be >= 1")
        bound = math.sqrt(6.0 / (3 * patch_area + dim))  # VPT's xavier-uniform init over the patch fan-in
        self.prompts_PD = nn.Parameter(torch.empty(n, dim).uniform_(-bound, bound))
        self.blocks, self.n_prefix = _Frozen(blocks), n_prefix

    def forward(self, x_BND: Tensor) -> Tensor:
        p = self.n_prefix
        prompts = self.prompts_PD.to(x_BND.dtype).expand(len(x_BND), -1, -1)
        x_BND = self.blocks(torch.cat([x_BND[:, :p], prompts, x_BND[:, p:]], dim=1))
        return torch.cat([x_BND[:, :p], x_BND[:, p + len(self.prompts_PD):]], dim=1)


def build_vpt(cfg: PartialConfig, *, n_prompts: int) -> PartialModel:
    """Shallow VPT on a timm ViT: M_b = patch + position embedding; prompts, frozen blocks, tuned classifier."""
    large = build_large_model(cfg)
    model = large.model
    if not all(hasattr(model, a) for a in ("num_prefix_tokens", "embed_dim", "patch_embed")):
        raise ValueError(f"VPT prepends prompt tokens to a ViT's tokens; {type(model).__name__} is not a timm ViT")
    units = model_units(model)
    modules = [model.get_submodule(n) for n in units.names]
    params = dict(model.named_parameters())
    head_ids = param_ids(*(params[n] for n in units.head_params))
    shell = copy_only(model, head_ids).requires_grad_(False)
    shell.get_classifier().requires_grad_(True)
    keep_only(model, param_ids(model) - head_ids - param_ids(*modules))  # the stem only
    patch = model.patch_embed.patch_size
    shared = PromptTokens(nn.Sequential(*modules), n=n_prompts, dim=model.embed_dim,
                          n_prefix=model.num_prefix_tokens, patch_area=patch[0] * patch[1])  # fmt: skip
    info = {"model": type(model).__name__, "method": "vpt", "prompts": n_prompts,
            "input_size": list(large.input_size)}
    return PartialModel(FrozenBackbone(Trunk(model), mean=large.mean, std=large.std),
                        TunedHeads(shared, {"combined": Head(nn.Sequential(), shell, dropout=0.0)}),
                        num_classes=large.num_classes, info=info)  # fmt: skip


def wise_ft(theta_0: Mapping[str, Tensor], theta_ft: Mapping[str, Tensor], alpha: float) -> dict[str, Tensor]:
    """WiSE-FT: theta = (1 - alpha) theta_0 + alpha theta_ft, per floating tensor.

    ``torch.lerp`` returns each endpoint exactly at alpha 0 and 1. Integer tensors (BatchNorm's
    ``num_batches_tracked``) are not interpolable: they come from the nearer endpoint.
    """
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha={alpha} must be in [0, 1] (0: the initial weights, 1: the fine-tuned ones)")
    if set(theta_0) != set(theta_ft):
        raise ValueError(f"the state dicts differ in keys {sorted(set(theta_0) ^ set(theta_ft))[:8]}; "
                         "interpolate two checkpoints of the same architecture")  # fmt: skip
    out = {}
    for key, a in theta_0.items():
        b = theta_ft[key]
        if a.shape != b.shape or a.dtype != b.dtype:
            raise ValueError(f"{key}: {tuple(a.shape)} {a.dtype} vs {tuple(b.shape)} {b.dtype}; "
                             "interpolate two checkpoints of the same architecture")  # fmt: skip
        nearer = a if alpha < 0.5 else b
        out[key] = torch.lerp(a, b.to(a.device), alpha) if a.is_floating_point() else nearer.clone()
    return out
