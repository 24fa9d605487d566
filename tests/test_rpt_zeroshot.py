"""robust.rpt.zeroshot: an open_clip ViT as the RPT student, heads against the text prompt embeddings."""

from __future__ import annotations

import json

import open_clip
import pytest
import torch

from robust.models.clip_teacher import ClipTeacherConfig, build_clip_teacher
from robust.rpt.baselines import build_method
from robust.rpt.losses import RptLossConfig, rpt_loss
from robust.rpt.partial import HEADS, PartialConfig, build_partial
from robust.rpt.select import SelectConfig, predict

torch.set_num_threads(1)

ARCH = "robust-test-rpt-clip"
TINY = {  # 3 vision blocks of width 32 at 32 px, random weights: no download
    "embed_dim": 24,
    "vision_cfg": {"image_size": 32, "layers": 3, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
CLASSES = ["cat", "dog", "school bus", "tree"]


@pytest.fixture(scope="module")
def clip_cfg(tmp_path_factory) -> ClipTeacherConfig:
    path = tmp_path_factory.mktemp("clip") / f"{ARCH}.json"
    path.write_text(json.dumps(TINY))
    open_clip.add_model_config(path)
    return ClipTeacherConfig(arch=ARCH, pretrained="", class_names=CLASSES, templates=["a photo of a {}."],
                             cache_dir=str(path.parent / "cache"))  # fmt: skip


def test_untuned_zero_shot_student_equals_the_clip_teacher(clip_cfg):
    torch.manual_seed(0)
    teacher = build_clip_teacher(clip_cfg)
    torch.manual_seed(0)
    student = build_partial(PartialConfig(source="open_clip", clip=clip_cfg, tune_from_block=1)).eval()
    x = torch.rand(3, 3, 32, 32)
    for logits in student(x).values():  # each head: its own vision embedding . the class prompt embeddings
        torch.testing.assert_close(logits, teacher(x), rtol=1e-5, atol=1e-5)
    assert student.num_classes == len(CLASSES)
    # ln_post and proj (the head section) hold less than a fifth of the tuned parameters: heads = them + W_DK
    assert student.info["shared_units"] == ["visual.transformer.resblocks.1", "visual.transformer.resblocks.2"]
    assert student.info["head_units"] == []


def test_zero_shot_heads_tune_the_vision_side_and_keep_the_text_embeddings(clip_cfg):
    torch.manual_seed(0)
    student = build_partial(PartialConfig(source="open_clip", clip=clip_cfg, tune_from_block=2)).train()
    text = {h: student.tuned.heads[h].shell.head.weight_DK.detach().clone() for h in HEADS}
    proj = student.tuned.heads["clean"].shell.visual.proj.detach().clone()
    tuned = {n for n, p in student.named_parameters() if p.requires_grad}
    assert "tuned.heads.clean.shell.visual.proj" in tuned and "tuned.heads.clean.shell.visual.ln_post.weight" in tuned
    assert not any("weight_DK" in n for n in tuned) and not any(n.startswith("backbone") for n in tuned)
    opt = torch.optim.Adam(student.trainable_parameters(), lr=1e-2)
    x, y = torch.rand(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    is_aug = torch.tensor([False, True, False, True])
    loss, terms = rpt_loss(student(x), y, is_aug_B=is_aug, t_init_logits=torch.randn(4, 4),
                           t_robust_logits=torch.randn(4, 4), cfg=RptLossConfig())  # fmt: skip
    opt.zero_grad()
    loss.backward()
    opt.step()
    assert all(torch.equal(text[h], student.tuned.heads[h].shell.head.weight_DK) for h in HEADS)
    assert not torch.equal(proj, student.tuned.heads["clean"].shell.visual.proj)
    sel = predict(student, x, cfg=SelectConfig(passes=3))
    assert sel.logits_BK.shape == (4, len(CLASSES))


def test_visual_evaluation_mode_tunes_a_classifier_initialised_from_the_prompts(clip_cfg):
    torch.manual_seed(0)
    teacher = build_clip_teacher(clip_cfg)
    torch.manual_seed(0)
    cfg = PartialConfig(source="open_clip", clip=clip_cfg, zero_shot=False, tune_from_block=2)
    lp = build_method("linear_probe", cfg).eval()
    x = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(lp(x)["combined"], teacher(x), rtol=1e-5, atol=1e-5)
    assert lp.param_counts()["tuned"] == TINY["embed_dim"] * len(CLASSES)
    with pytest.raises(ValueError, match="use zero_shot=false"):
        build_method("linear_probe", PartialConfig(source="open_clip", clip=clip_cfg, zero_shot=True))
