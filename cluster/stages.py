"""Independent cached stages of a local preset, built side by side.

The local stages (a small teacher, a VQGAN, a "large" model) each train on one intra-op thread, since
OpenMP threads that share a busy 2-core machine spin; built one after the other they leave a core idle.
``build_side_by_side`` runs each missing one in its own spawned process; the caller then reads every
stage back from its cache (``robust.cache.cached_stage``), which is how a second run reuses them too.
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor


def _build(builder: Callable[[], object]) -> None:
    builder()  # what it returns (a model, a config) is read back from the cache by the caller


def build_side_by_side(builders: Sequence[Callable[[], object]]) -> None:
    """Run picklable ``builders`` (``functools.partial`` of module-level functions) concurrently, one
    process each; the first failure is raised here. Fewer than two: run in this process."""
    if len(builders) < 2:
        for builder in builders:
            _build(builder)
        return
    with ProcessPoolExecutor(len(builders), mp_context=multiprocessing.get_context("spawn")) as pool:
        for future in [pool.submit(_build, builder) for builder in builders]:
            future.result()
