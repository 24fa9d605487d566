"""Independent cached stages of a local preset, built side by side.

The local stages (a small teacher, a VQGAN, a "large" model) each train on one intra-op thread, since
OpenMP threads that share a busy 2-core machine spin; built one after the other they leave a core idle.
``build_side_by_side`` runs each one whose cache directory is not complete yet in its own spawned
process; the caller then reads every stage back from its cache (``robust.cache.cached_stage``), which is
how a second run reuses them too.
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable, Mapping
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from robust.cache import is_cached


def _build(builder: Callable[[], object]) -> None:
    builder()  # what it returns (a model, a config) is read back from the cache by the caller


def build_side_by_side(stages: Mapping[Path, Callable[[], object]]) -> None:
    """For each stage directory not cached yet, run its picklable builder (a ``functools.partial`` of a
    module-level function) concurrently, one process each; the first failure is raised here. Fewer than
    two to build: run in this process."""
    builders = [build for stage_dir, build in stages.items() if not is_cached(stage_dir)]
    if len(builders) < 2:
        for builder in builders:
            _build(builder)
        return
    with ProcessPoolExecutor(len(builders), mp_context=multiprocessing.get_context("spawn")) as pool:
        for future in [pool.submit(_build, builder) for builder in builders]:
            future.result()
