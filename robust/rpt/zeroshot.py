"""open_clip visual encoders as RPT students (seed 002, sec. 4.4).

``ClipVisual`` gives an open_clip ``VisionTransformer`` timm's interface (``group_matcher``,
``forward_features``, ``forward_head``, ``get_classifier``), so ``rpt.partial`` splits it like a timm
ViT. Its classifier is ``ClassEmbeddingHead``: logits = exp(logit_scale) * normalize(phi_v(x)) @ W_DK
with W_DK the prompt-ensemble text embeddings of the classes (``clip_teacher.class_embeddings``,
cached on disk). Zero-shot: W_DK stays frozen and every head's prediction is the dot product of its
own vision embedding with the text embeddings (phi_l(x) = phi_v(x) . phi_text(Y)); otherwise W_DK is
a tuned linear classifier that starts as the zero-shot one. Either way the untuned student equals the
CLIP zero-shot teacher, the frozen copy of the initial model that teaches the clean head.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from open_clip.transformer import VisionTransformer
from torch import Tensor, nn

from robust.models.clip_teacher import ClipTeacherConfig, build_clip_teacher


class ClassEmbeddingHead(nn.Module):
    """Cosine logits against class embeddings: ``scale * normalize(e_BD) @ W_DK``."""

    def __init__(self, class_embeddings_DK: Tensor, *, logit_scale: float, trainable: bool) -> None:
        super().__init__()
        self.weight_DK = nn.Parameter(class_embeddings_DK.detach().float().clone(), requires_grad=trainable)
        # a buffer, so that a saved state dict restores it (a random-init rebuild has CLIP's initial scale)
        self.register_buffer("logit_scale", torch.tensor(float(logit_scale)))

    def forward(self, e_BD: Tensor) -> Tensor:
        return self.logit_scale * F.normalize(e_BD.float(), dim=-1) @ self.weight_DK


class ClipVisual(nn.Module):
    """An open_clip ViT image tower + a class head, behind timm's model interface."""

    def __init__(self, visual: VisionTransformer, head: ClassEmbeddingHead) -> None:
        super().__init__()
        self.visual, self.head = visual, head
        self.num_classes = head.weight_DK.shape[1]

    def group_matcher(self, coarse: bool = False) -> dict:  # noqa: ARG002
        # the parameters left unmatched (ln_post, proj, attn_pool, the class head) form the head section
        return {"stem": r"^visual\.(conv1|class_embedding|positional_embedding|ln_pre)",
                "blocks": [(r"^visual\.transformer\.resblocks\.(\d+)", None)]}  # fmt: skip

    def forward_features(self, x: Tensor) -> Tensor:
        # open_clip has no public "tokens after the last block" call: its own forward() is these two
        # steps followed by _pool and the projection (forward_head below)
        return self.visual.transformer(self.visual._embeds(x))

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        pooled, _ = self.visual._pool(x)
        if self.visual.proj is not None:
            pooled = pooled @ self.visual.proj
        return pooled if pre_logits else self.head(pooled)

    def get_classifier(self) -> nn.Module:
        return self.head

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


def build_clip_visual(
    cfg: ClipTeacherConfig, *, zero_shot: bool
) -> tuple[ClipVisual, tuple[float, ...], tuple[float, ...], tuple[int, int]]:
    """(model, mean, std, image size) of an open_clip ViT with its class head; the text tower is dropped."""
    teacher = build_clip_teacher(cfg)  # builds the class embeddings (or reads them from the cache)
    visual = teacher.clip.visual
    if not isinstance(visual, VisionTransformer):
        raise ValueError(f"open_clip arch {cfg.arch!r} has a {type(visual).__name__} image tower; "
                         "RPT splits open_clip VisionTransformer towers (ViT-* archs)")  # fmt: skip
    head = ClassEmbeddingHead(teacher.class_embeddings_DK, logit_scale=teacher.clip.logit_scale.exp().item(),
                              trainable=not zero_shot)  # fmt: skip
    model = ClipVisual(visual.requires_grad_(True).train(), head)
    return model, tuple(teacher.mean_C.tolist()), tuple(teacher.std_C.tolist()), teacher.image_size
