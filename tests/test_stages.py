"""Cached stages built side by side: each missing one in its own process, failures surface in the caller."""

from __future__ import annotations

import functools
import os
from pathlib import Path

import pytest

from cluster.engine.stages import build_side_by_side


def _write_pid(path: Path) -> str:
    path.write_text(str(os.getpid()))
    return "returned values are discarded"


def _fail(message: str) -> None:
    raise RuntimeError(message)


def _stage(tmp_path: Path, name: str, *, cached: bool = False) -> Path:
    stage_dir = tmp_path / name
    if cached:  # what cached_stage leaves: the config, written last
        stage_dir.mkdir()
        (stage_dir / "config.yaml").write_text("{}")
    return stage_dir


def test_each_missing_stage_builds_in_its_own_process(tmp_path):
    paths = [tmp_path / "a.pid", tmp_path / "b.pid", tmp_path / "c.pid"]
    build_side_by_side({_stage(tmp_path, "a"): functools.partial(_write_pid, paths[0]),
                        _stage(tmp_path, "b"): functools.partial(_write_pid, paths[1]),
                        _stage(tmp_path, "c", cached=True): functools.partial(_write_pid, paths[2])})
    pids = {int(p.read_text()) for p in paths[:2]}
    assert len(pids) == 2 and os.getpid() not in pids
    assert not paths[2].exists()  # a cached stage is not built again


def test_a_single_missing_stage_builds_here_and_a_failure_is_raised(tmp_path):
    build_side_by_side({_stage(tmp_path, "a"): functools.partial(_write_pid, tmp_path / "a.pid"),
                        _stage(tmp_path, "b", cached=True): functools.partial(_fail, "must not run")})
    assert int((tmp_path / "a.pid").read_text()) == os.getpid()
    with pytest.raises(RuntimeError, match="stage broke"):
        build_side_by_side({_stage(tmp_path, "c"): functools.partial(_write_pid, tmp_path / "c.pid"),
                            _stage(tmp_path, "d"): functools.partial(_fail, "stage broke")})
