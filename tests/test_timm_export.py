"""An export_timm folder is timm-native: a process that imports only timm and torch rebuilds the model with
``timm.create_model("local-dir:...")``, preprocesses with timm's own transform, and gets the logits this
project's loader and evaluation give on the same image files."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import safetensors.torch
import timm
import timm.models
import torch
from PIL import Image
from torch.utils.data import DataLoader

from robust.data.digits import digits_arrays
from robust.eval.evaluate import predict
from robust.eval.sets import EvalSetConfig, build_eval_set, timm_data_config
from robust.models.normalize import NormalizedModel
from robust.models.timm_models import TimmConfig, build_timm, export_timm, load_exported

torch.set_num_threads(1)

TIMM_ONLY = """
import json, sys
import numpy as np, timm, timm.data, torch
from PIL import Image

folder, files, out = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
model = timm.create_model("local-dir:" + folder, pretrained=True).eval()
transform = timm.data.create_transform(**timm.data.resolve_model_data_config(model))
x = torch.stack([transform(Image.open(f).convert("RGB")) for f in files])
with torch.no_grad():
    np.save(out, model(x).numpy())
assert not [m for m in sys.modules if m == "robust" or m.startswith(("robust.", "cluster"))]
"""


@pytest.mark.parametrize("cfg", [TimmConfig(name="test_resnet", num_classes=10),
                                 TimmConfig(name="test_vit", num_classes=10, img_size=32)], ids=lambda c: c.name)
def test_plain_timm_rebuilds_the_export_and_predicts_like_the_project(tmp_path, cfg):
    _, _, x_test, y_test = digits_arrays()
    for i in range(24):  # the digits test images as files of an image folder (32 px)
        (tmp_path / "images" / str(y_test[i])).mkdir(parents=True, exist_ok=True)
        Image.fromarray(x_test[i]).save(tmp_path / "images" / str(y_test[i]) / f"{i}.png")
    eval_cfg = EvalSetConfig(kind="imagefolder", root=str(tmp_path / "images"), image_size=32, crop_pct=1.0)
    torch.manual_seed(0)
    # mean/std other than timm's defaults for these models: the export must carry the model's own
    model = NormalizedModel(build_timm(cfg).model, mean=(0.45, 0.4, 0.35), std=(0.2, 0.25, 0.3))
    folder = export_timm(model, cfg, tmp_path / "export", data_config=timm_data_config(eval_cfg))

    eval_set = build_eval_set(eval_cfg)
    loaded = load_exported(folder).eval()
    x_BCHW = torch.cat([x for x, _ in DataLoader(eval_set.dataset, batch_size=10)])  # uint8, as the loader gives
    ours = predict(loaded, x_BCHW).numpy()
    files = [str(path) for path, _, _ in eval_set.dataset.samples]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-c", TIMM_ONLY, str(folder), json.dumps(files), str(tmp_path / "timm.npy")],
                   cwd=tmp_path, env=env, check=True)  # fmt: skip
    theirs = np.load(tmp_path / "timm.npy")
    assert theirs.shape == ours.shape == (24, 10)
    np.testing.assert_allclose(theirs, ours, rtol=1e-5, atol=1e-5)
    assert (theirs.argmax(1) == ours.argmax(1)).all()
    # the check can fail: timm's default mean/std for these models (0.5) move the logits far beyond the tolerance
    timm_default = NormalizedModel(loaded.model, mean=(0.5,) * 3, std=(0.5,) * 3)
    assert np.abs(predict(timm_default, x_BCHW).numpy() - ours).max() > 1e-2


def test_re_saving_the_rebuilt_model_writes_the_same_folder(tmp_path):
    # timm.models.push_to_hf_hub uploads what save_for_hf writes for the model it is given
    cfg = TimmConfig(name="test_vit", num_classes=10, img_size=32)
    folder = export_timm(build_timm(cfg), cfg, tmp_path / "export",
                         data_config=timm_data_config(EvalSetConfig(image_size=32, crop_pct=1.0)))  # fmt: skip
    rebuilt = timm.create_model(f"local-dir:{folder}", pretrained=True)
    timm.models.save_for_hf(rebuilt, str(tmp_path / "again"), safe_serialization=True)
    config = json.loads((folder / "config.json").read_text())
    assert json.loads((tmp_path / "again" / "config.json").read_text()) == config
    ours, again = (safetensors.torch.load_file(str(d / "model.safetensors")) for d in (folder, tmp_path / "again"))
    assert ours.keys() == again.keys() and all(torch.equal(ours[k], again[k]) for k in ours)
