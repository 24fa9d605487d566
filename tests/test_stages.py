"""Cached stages built side by side: each in its own process, failures surface in the caller."""

from __future__ import annotations

import functools
import os
from pathlib import Path

import pytest

from cluster.stages import build_side_by_side


def _write_pid(path: Path) -> str:
    path.write_text(str(os.getpid()))
    return "returned values are discarded"


def _fail(message: str) -> None:
    raise RuntimeError(message)


def test_each_builder_runs_in_its_own_process(tmp_path):
    paths = [tmp_path / "a", tmp_path / "b"]
    build_side_by_side([functools.partial(_write_pid, p) for p in paths])
    pids = {int(p.read_text()) for p in paths}
    assert len(pids) == 2 and os.getpid() not in pids


def test_a_single_builder_runs_here_and_a_failure_is_raised(tmp_path):
    build_side_by_side([functools.partial(_write_pid, tmp_path / "a")])
    assert int((tmp_path / "a").read_text()) == os.getpid()
    with pytest.raises(RuntimeError, match="stage broke"):
        build_side_by_side([functools.partial(_write_pid, tmp_path / "b"), functools.partial(_fail, "stage broke")])
