"""The robust-distill command: data digits / convert / verify, k8s render / check, plan."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from cluster.cli import main
from robust.data.shards import read_manifest

BIN = Path(sys.executable).parent


def test_data_digits_convert_and_verify(tmp_path, capsys):
    assert main(["data", "digits", str(tmp_path / "digits")]) == 0
    assert read_manifest(tmp_path / "digits" / "train").total == 1347
    folder = tmp_path / "folder"  # an ImageFolder: PNG, JPEG and a 16-bit grey PNG, one file that is no image
    for cls, fmt in (("0", "PNG"), ("1", "JPEG")):
        (folder / cls).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(folder / cls / f"{i}.{fmt.lower()}", format=fmt)
    Image.fromarray(np.full((8, 8), 65535, np.uint16)).save(folder / "1" / "deep.png")
    (folder / "0" / "broken.png").write_bytes(b"not an image")
    out = tmp_path / "shards"
    assert main(["data", "convert", str(folder), str(out)]) == 0
    assert "wrote 7 samples" in capsys.readouterr().out and read_manifest(out).total == 7
    assert main(["data", "verify", str(out), "--decode"]) == 0
    assert "7 samples in 1 shards, checksums match, every sample decodes" in capsys.readouterr().out
    shard = next(out.glob("*.tar"))
    shard.write_bytes(shard.read_bytes()[:-1024])  # damaged in transfer
    assert main(["data", "verify", str(out)]) == 2
    assert shard.name in capsys.readouterr().err
    shard.write_bytes(b"")  # an empty shard
    assert main(["data", "verify", str(out)]) == 2
    assert shard.name in capsys.readouterr().err
    assert main(["data", "verify", str(tmp_path / "nowhere")]) == 2
    assert "robust-distill data convert" in capsys.readouterr().err


def test_k8s_render_check_and_plan(tmp_path, capsys):
    assert main(["k8s", "render", "--overlay", "gpu-cluster", "--out", str(tmp_path), "pools.student.num_workers=16"]) == 0
    written = capsys.readouterr().out.split()
    assert len(written) == 4 and all(Path(p).is_file() for p in written)  # RayJob, RayCluster, PVC, kustomization
    assert main(["k8s", "check", *written]) == 0
    assert "agree with their pool sizes" in capsys.readouterr().out
    rayjob = next(p for p in written if "rayjob" in p)
    Path(rayjob).write_text(Path(rayjob).read_text().replace("pools.student.num_workers=16", "pools.student.num_workers=64"))
    assert main(["k8s", "check", rayjob]) == 2  # the recipe would ask for more students than the manifests hold
    assert main(["plan", "student_gpus=8"]) == 0
    assert "teacher GPUs" in capsys.readouterr().out


def test_the_installed_command_runs(tmp_path):
    done = subprocess.run([BIN / "robust-distill", "data", "digits", str(tmp_path)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0 and json.loads((tmp_path / "test" / "manifest.json").read_text())["total"] == 450
