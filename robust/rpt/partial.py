"""The multi-head partially tuned student of RPT (seed 002, sec. 4.1): M = M_h o M_s o M_b.

M_b (the first layers) is frozen: it runs in eval mode without autograd and holds no trainable
parameter, so it never reaches the optimizer, and its output is the only thing the tuned part sees
(a feature cache can stand in for it). M_s (the shared tunable section) and the heads are trained;
each head (clean, unclean, combined) owns a copy of the last fifth of the tuning portion, the model's
own pooling and its classifier. Dropout p goes where the paper puts it: the tuned units' own dropout
layers (a ViT block's attention, projection and MLP dropout) and before every head's classifier; it
is never inserted on a block's input, where it would also drop the residual path and feed BatchNorm.

The split uses timm's own description of a model's depth order, ``group_matcher(coarse=False)`` (the
one layer-wise lr decay uses): its "stem" stays frozen, its block patterns name the units (blocks,
then the post-block modules such as the final norm), and the parameters it leaves unmatched form the
classifier section, run through ``forward_head``. Any model whose ``forward_features`` applies those
units in that order splits this way; the builder checks that the split model reproduces the original
model's logits and refuses models that do not.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import timm.data
import torch
from timm.models._manipulate import MATCH_PREV_GROUP
from torch import Tensor, nn

from robust.models.clip_teacher import ClipTeacherConfig
from robust.models.normalize import normalize_images
from robust.models.timm_models import TimmConfig, build_timm
from robust.rpt.zeroshot import build_clip_visual

HEADS = ("clean", "unclean", "combined")


@dataclass
class PartialConfig:
    """The large model and which part of it is tuned.

    ``tune_from_block`` (a block index in [0, depth]; depth tunes only the post-block modules and the
    classifier) takes precedence over ``tune_fraction`` (the tuned share of the model's parameters,
    paper Table 10: about 5%; the fewest trailing blocks that reach it are tuned).
    """

    source: str = "timm"  # "timm" (``timm``) or "open_clip" (the visual encoder of ``clip``)
    timm: TimmConfig = field(default_factory=TimmConfig)
    clip: ClipTeacherConfig = field(default_factory=ClipTeacherConfig)
    # open_clip only: True = heads are cosine logits against the frozen class prompt embeddings (paper
    # sec. 4.4); False = a tuned linear classifier on the vision embedding, initialised to those embeddings
    zero_shot: bool = True
    tune_fraction: float | None = 0.05
    tune_from_block: int | None = None
    dropout: float = 0.25  # paper appendix G
    heads: list[str] = field(default_factory=lambda: list(HEADS))
    vpt_prompts: int = 10  # the VPT baseline's prompt tokens (VPT-shallow)


class LargeModel(NamedTuple):
    """A model in timm's interface (forward_features / forward_head / get_classifier / group_matcher)."""

    model: nn.Module
    mean: tuple[float, ...]
    std: tuple[float, ...]
    input_size: tuple[int, int, int]
    num_classes: int


class _Removed(nn.Identity):
    """Stands in for a module moved out of a model; accepts the extra arguments blocks get (attn_mask)."""

    def forward(self, x: Tensor, *args: object, **kwargs: object) -> Tensor:  # noqa: ARG002
        return x


class Trunk(nn.Module):
    """``forward_features`` of a (pruned) model; with ``pre_logits`` also its pooling (linear probe)."""

    def __init__(self, model: nn.Module, *, pre_logits: bool = False) -> None:
        super().__init__()
        self.model, self.pre_logits = model, pre_logits

    def forward(self, x: Tensor) -> Tensor:
        f = self.model.forward_features(x)
        return self.model.forward_head(f, pre_logits=True) if self.pre_logits else f


class FrozenBackbone(nn.Module):
    """M_b: normalises [0, 1] images and runs the frozen trunk in eval mode without autograd."""

    def __init__(self, trunk: nn.Module, *, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.trunk = trunk.requires_grad_(False)
        self.register_buffer("mean_C", torch.tensor(tuple(mean), dtype=torch.float32), persistent=False)
        self.register_buffer("std_C", torch.tensor(tuple(std), dtype=torch.float32), persistent=False)
        self.eval()

    def train(self, mode: bool = True) -> FrozenBackbone:
        return super().train(False)  # BatchNorm statistics and dropout of M_b stay frozen too

    def forward(self, x01_BCHW: Tensor) -> Tensor:
        with torch.no_grad():  # not inference_mode: the tuned part saves these features for backward
            return self.trunk(normalize_images(x01_BCHW, self.mean_C, self.std_C))


class Head(nn.Module):
    """One prediction head: its copy of the last units, the model's pooling, dropout, its classifier."""

    def __init__(self, units: nn.Sequential, shell: nn.Module, *, dropout: float) -> None:
        super().__init__()
        self.units, self.shell, self.drop = units, shell, nn.Dropout(dropout)

    def forward(self, h: Tensor) -> Tensor:
        z = self.shell.forward_head(self.units(h), pre_logits=True)
        return self.shell.get_classifier()(self.drop(z))


class TunedHeads(nn.Module):
    """M_h o M_s: the shared tunable section, then every head; maps backbone features to logits per head."""

    def __init__(self, shared: nn.Module, heads: Mapping[str, nn.Module]) -> None:
        super().__init__()
        self.shared, self.heads = shared, nn.ModuleDict(heads)

    def forward(self, feats: Tensor) -> dict[str, Tensor]:
        h = self.shared(feats)
        return {name: head(h) for name, head in self.heads.items()}


class PartialModel(nn.Module):
    """M = M_h o M_s o M_b; ``forward(x)`` returns ``{head name: logits_BK}``.

    Train only ``trainable_parameters()``. ``backbone_features`` is the frozen half and
    ``heads_forward`` the tuned half; the feature tensor between them is their only interface, so
    features computed once (a feature cache keyed by ``backbone_key()``) train the tuned part exactly
    as the uncached path does, provided they are stored in the dtype the backbone produced.
    """

    def __init__(self, backbone: FrozenBackbone, tuned: TunedHeads, *, num_classes: int, info: dict) -> None:
        super().__init__()
        self.backbone, self.tuned = backbone, tuned
        self.num_classes = num_classes
        self.info = info  # how the model was split, for reports

    @property
    def head_names(self) -> tuple[str, ...]:
        return tuple(self.tuned.heads)

    def backbone_features(self, x01_BCHW: Tensor) -> Tensor:
        return self.backbone(x01_BCHW)

    def heads_forward(self, feats: Tensor) -> dict[str, Tensor]:
        return self.tuned(feats)

    def forward(self, x01_BCHW: Tensor) -> dict[str, Tensor]:
        return self.heads_forward(self.backbone_features(x01_BCHW))

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def backbone_key(self) -> str:
        """sha256 of what M_b computes (its weights, buffers, normalisation and cut): a feature cache's key."""
        digest = hashlib.sha256(json.dumps({k: self.info[k] for k in ("model", "tune_from_block") if k in self.info})
                                .encode())  # fmt: skip
        tensors = {**self.backbone.state_dict(), "mean_C": self.backbone.mean_C, "std_C": self.backbone.std_C}
        for name, tensor in tensors.items():
            digest.update(f"{name}{tuple(tensor.shape)}{tensor.dtype}".encode())
            digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()

    def param_counts(self) -> dict[str, int]:
        """Tuned and total parameter counts, as in the paper's Table 10 (every head copy counts)."""
        return {"tuned": sum(p.numel() for p in self.trainable_parameters()),
                "total": sum(p.numel() for p in self.parameters())}  # fmt: skip


def build_large_model(cfg: PartialConfig) -> LargeModel:
    """The large model in timm's interface: a timm classifier, or an open_clip visual encoder + class head."""
    if cfg.source == "timm":
        wrapped = build_timm(cfg.timm)
        model = wrapped.model
        c, h, w = timm.data.resolve_model_data_config(model)["input_size"]
        if cfg.timm.img_size is not None:  # timm's pretrained_cfg keeps reporting the default size
            h = w = cfg.timm.img_size
        mean, std = tuple(wrapped.mean.tolist()), tuple(wrapped.std.tolist())
        return LargeModel(model, mean, std, (c, h, w), cfg.timm.num_classes)
    if cfg.source == "open_clip":
        visual, mean, std, image_size = build_clip_visual(cfg.clip, zero_shot=cfg.zero_shot)
        return LargeModel(visual, mean, std, (3, *image_size), visual.num_classes)
    raise ValueError(f"source={cfg.source!r} is unknown; use 'timm' or 'open_clip'")


def build_partial(cfg: PartialConfig) -> PartialModel:
    """The RPT student of ``cfg`` (APT and the one-head variants: ``heads=[combined]``)."""
    check_heads(cfg.heads)
    large = build_large_model(cfg)
    return split_model(large, tune_fraction=cfg.tune_fraction, tune_from_block=cfg.tune_from_block,
                       dropout=cfg.dropout, heads=cfg.heads)  # fmt: skip


def check_heads(heads: Sequence[str]) -> None:
    if not heads or len(set(heads)) != len(heads) or not set(heads) <= set(HEADS):
        raise ValueError(f"heads={list(heads)} must be distinct names from {list(HEADS)}, e.g. all three or [combined]")


# --- splitting a model in timm's interface -------------------------------------------------------


class Units(NamedTuple):
    """A model's units in depth order: ``names[:n_blocks]`` are blocks, the rest post-block modules."""

    names: list[str]
    n_blocks: int
    head_params: list[str]  # parameters group_matcher leaves unmatched: pooling norms and the classifier


def model_units(model: nn.Module) -> Units:
    """Read the unit order from ``model.group_matcher(coarse=False)``, matching each parameter as timm does."""
    if not hasattr(model, "group_matcher"):
        raise ValueError(f"{type(model).__name__} has no group_matcher; RPT splits timm models and open_clip ViTs")
    specs: list[tuple[re.Pattern, int, tuple | None, bool]] = []
    for ordinal, (group, spec) in enumerate(model.group_matcher(coarse=False).items()):
        for regex, suffix in spec if isinstance(spec, (list, tuple)) else [(spec, None)]:
            specs.append((re.compile(regex), ordinal, suffix, group == "stem"))
    keys: dict[str, tuple] = {}
    head_params = []
    for name, _ in model.named_parameters():
        match = next(((m, s) for s in specs if (m := s[0].match(name))), None)
        if match is None:
            head_params.append(name)
            continue
        m, (_, ordinal, suffix, is_stem) = match
        if not is_stem:  # timm's ordinal: (group, *numbers in the match, *suffix); post modules end in 99999
            key = (ordinal, *map(float, m.groups()), *(suffix or ()))
            keys.setdefault(m.group(0), (key, len(keys)))
    names = sorted(keys, key=keys.__getitem__)
    is_post = [keys[n][0][-1] == MATCH_PREV_GROUP[0] for n in names]
    n_blocks = is_post.index(True) if True in is_post else len(names)
    assert all(is_post[n_blocks:]), f"post-block modules must come last: {names}"
    for name in names:
        try:
            model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"{type(model).__name__}'s group_matcher names {name!r}, which is not a module; "
                             "RPT cannot split this model into blocks") from None  # fmt: skip
    return Units(names, n_blocks, head_params)


def _numel(params: Iterator[nn.Parameter]) -> int:
    return sum(p.numel() for p in params if p.requires_grad)


def choose_cut(
    model: nn.Module, units: Units, *, tune_fraction: float | None, tune_from_block: int | None
) -> tuple[int, int]:
    """(k, j): units[k:] are tuned, units[k:j] are M_s and units[j:] go into every head."""
    params = dict(model.named_parameters())
    unit_sizes = [_numel(model.get_submodule(n).parameters()) for n in units.names]
    head_size = _numel(params[n] for n in units.head_params)
    tuned = lambda i: sum(unit_sizes[i:]) + head_size  # noqa: E731
    if tune_fraction is not None and not 0 < tune_fraction < 1:
        raise ValueError(f"tune_fraction={tune_fraction} must be in (0, 1), e.g. 0.05 (paper Table 10)")
    if tune_from_block is not None:
        if not 0 <= tune_from_block <= units.n_blocks:
            raise ValueError(f"tune_from_block={tune_from_block} is past the depth of {type(model).__name__}: "
                             f"it has {units.n_blocks} blocks, so use 0..{units.n_blocks}")  # fmt: skip
        k = tune_from_block
    elif tune_fraction is not None:
        target = tune_fraction * sum(p.numel() for p in params.values())
        k = max((i for i in range(units.n_blocks + 1) if tuned(i) >= target), default=0)
    else:
        raise ValueError("set tune_fraction (e.g. 0.05) or tune_from_block (a block index)")
    # the heads, "the last one-fifth of the tuning portion" (appendix G): the classifier section and the most
    # trailing units that stay within a fifth of the tuned parameters (paper, ViT-B: a fifth of 3.1M ~ the classifier)
    n = len(units.names)
    j = min([i for i in range(k, n) if tuned(i) <= tuned(k) / 5] + [n])
    return k, j


def _dropped(module: nn.Module, keep: set[int]) -> Iterator[tuple[nn.Module, str, nn.Module | nn.Parameter]]:
    """(parent, name, object): the largest submodules and the parameters that hold none of ``keep``."""
    for name, p in module.named_parameters(recurse=False):
        if id(p) not in keep:
            yield module, name, p
    for name, child in module.named_children():
        ids = {id(p) for p in child.parameters()}
        if ids and ids.isdisjoint(keep):
            yield module, name, child
        elif ids - keep:
            yield from _dropped(child, keep)


def keep_only(model: nn.Module, keep: set[int]) -> nn.Module:
    """Remove, in place, every module and parameter of ``model`` that holds no parameter id in ``keep``."""
    for parent, name, obj in list(_dropped(model, keep)):
        setattr(parent, name, None if isinstance(obj, nn.Parameter) else _Removed())
    return model


def copy_only(model: nn.Module, keep: set[int]) -> nn.Module:
    """A deep copy of ``model`` with only the modules/parameters holding ``keep``; the rest is never copied."""
    memo = {id(obj): None if isinstance(obj, nn.Parameter) else _Removed() for _, _, obj in _dropped(model, keep)}
    return copy.deepcopy(model, memo)


def param_ids(*modules_or_params: nn.Module | nn.Parameter) -> set[int]:
    out = set()
    for m in modules_or_params:
        out |= {id(m)} if isinstance(m, nn.Parameter) else {id(p) for p in m.parameters()}
    return out


def with_dropout(units: Sequence[nn.Module], *, dropout: float) -> nn.Sequential:
    """The units in order, their own dropout layers set to p (attention dropout of nn.MultiheadAttention too)."""
    seq = nn.Sequential(*units)
    for m in seq.modules():
        if isinstance(m, nn.Dropout):
            m.p = dropout
        elif isinstance(m, nn.MultiheadAttention):  # open_clip blocks: dropout is a float attribute
            m.dropout = dropout
    return seq


def reference_input(large: LargeModel) -> tuple[Tensor, Tensor]:
    """(x01, logits of the intact model) for :func:`check_split`; call before any surgery."""
    x01 = torch.rand(2, *large.input_size, generator=torch.Generator().manual_seed(0))
    x = normalize_images(x01, torch.tensor(large.mean), torch.tensor(large.std))
    was = large.model.training
    with torch.no_grad():
        ref = large.model.eval()(x.to(next(large.model.parameters()).device))
    large.model.train(was)
    return x01, ref


def check_split(student: PartialModel, x01: Tensor, ref: Tensor) -> None:
    """Every head of the freshly split model (dropout off) must give the intact model's logits."""
    was = student.training
    with torch.no_grad():
        out = student.eval()(x01.to(ref.device))
    student.train(was)
    for name, logits in out.items():
        if logits.shape != ref.shape or not torch.allclose(logits, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item()):
            raise ValueError(
                f"the split {student.info.get('model')} does not reproduce the model's logits (head {name}); "
                "its forward_features does not apply its group_matcher blocks in order, so RPT cannot split it"
            )


def split_model(
    large: LargeModel,
    *,
    tune_fraction: float | None = None,
    tune_from_block: int | None = None,
    dropout: float = 0.25,
    heads: Sequence[str] = HEADS,
) -> PartialModel:
    """Split ``large.model`` (taken over, modified in place) into M_b, M_s and the heads."""
    check_heads(heads)
    if not 0 <= dropout < 1:
        raise ValueError(f"dropout={dropout} must be in [0, 1), e.g. 0.25 (paper appendix G)")
    model = large.model
    units = model_units(model)
    k, j = choose_cut(model, units, tune_fraction=tune_fraction, tune_from_block=tune_from_block)
    x01, ref = reference_input(large)
    modules = [model.get_submodule(n) for n in units.names]
    params = dict(model.named_parameters())
    head_ids = param_ids(*(params[n] for n in units.head_params))
    shell = copy_only(model, head_ids)  # pooling + classifier, nothing else
    tuned_ids = head_ids | param_ids(*modules[k:])
    head_units = with_dropout(modules[j:], dropout=dropout)
    made = {name: Head(copy.deepcopy(head_units), copy.deepcopy(shell), dropout=dropout) for name in heads}
    shared = with_dropout(modules[k:j], dropout=dropout)
    keep_only(model, param_ids(model) - tuned_ids)  # M_b: the stem and the frozen blocks, in place
    info = {"model": type(model).__name__, "blocks": units.n_blocks, "tune_from_block": k,
            "shared_units": units.names[k:j], "head_units": units.names[j:],
            "input_size": list(large.input_size)}  # fmt: skip
    student = PartialModel(FrozenBackbone(Trunk(model), mean=large.mean, std=large.std),
                           TunedHeads(shared, made), num_classes=large.num_classes, info=info)  # fmt: skip
    check_split(student, x01, ref)
    return student
