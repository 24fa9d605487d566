"""Stage caching: a directory keyed by a hash of the stage's resolved config, written atomically."""

from __future__ import annotations

import hashlib
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from robust.config import save_config, to_yaml


def cache_dir_for(root: str | Path, name: str, cfg: Any) -> Path:
    """``root/<name>-<12 hex of sha256(config YAML)>``: another config gets another directory."""
    return Path(root) / f"{name}-{hashlib.sha256(to_yaml(cfg).encode()).hexdigest()[:12]}"


def is_cached(stage_dir: Path) -> bool:
    """Whether a stage directory of ``cached_stage`` is complete (its config is written last)."""
    return (stage_dir / "config.yaml").is_file()


def cached_stage(root: str | Path, name: str, cfg: Any, build: Callable[[Path], None]) -> Path:
    """Return the stage's directory, running ``build(tmp_dir)`` first when it is not cached yet.

    ``build`` writes its outputs into a temporary directory that is renamed into place with the
    config beside them, so an interrupted run never leaves a partial cache.
    """
    out = cache_dir_for(root, name, cfg)
    if is_cached(out):
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}-"))
    try:
        build(tmp)
        save_config(cfg, tmp / "config.yaml")  # written last: it marks the stage complete
        try:
            tmp.rename(out)
        except OSError:
            if not is_cached(out):  # anything but a concurrent run that finished first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
