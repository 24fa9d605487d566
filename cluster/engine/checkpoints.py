"""Which checkpoint a run resumes from: the newest complete one in the run's storage.

Ray Train resumes from the latest checkpoint its controller has registered; a checkpoint that a worker
persisted just before its node died is on storage but not registered yet, and Ray Train then restarts the
run from step 0 (ray-project/ray#46814). So the workers look at storage themselves. Each rank writes,
beside its DeepSpeed files, a manifest of them (``rank<r>.json``: world size, step, file sizes) as the
last thing it writes; a checkpoint is complete when every rank's manifest is there and every file it
lists has its size. The newest complete checkpoint wins; damaged or half-written newer ones are skipped
(and named in the log). Refused before training, never a silent restart from step 0: a run whose
checkpoints are all damaged, and a checkpoint written by another number of workers (ZeRO partitions the
optimizer by world size; microsoft/DeepSpeed#5405).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from pyarrow import fs as pafs

CHECKPOINT_PREFIX = "checkpoint_"  # Ray Train's directory names: checkpoint_<timestamp> sort by time


@dataclass(frozen=True)
class Stored:
    path: str  # on ``filesystem``
    filesystem: pafs.FileSystem
    world: int
    step: int
    epoch: int  # the epoch the run resumes in (the read tasks start there)


def _filesystem(root: str) -> tuple[pafs.FileSystem, str]:
    if "://" in root:
        return pafs.FileSystem.from_uri(root)
    return pafs.LocalFileSystem(), str(Path(root).resolve())


def write_manifest(rank_dir: Path, *, rank: int, world: int, step: int, epoch: int) -> None:
    """After a rank wrote its files into ``rank_dir`` (its part of the checkpoint): their manifest, last."""
    files = {str(p.relative_to(rank_dir)): p.stat().st_size for p in rank_dir.rglob("*") if p.is_file()}
    (rank_dir / f"rank{rank}.json").write_text(json.dumps({"world": world, "step": step, "epoch": epoch,
                                                           "files": files}))


def _problem(filesystem: pafs.FileSystem, path: str) -> tuple[str | None, dict]:
    """(what is wrong or None, rank 0's manifest) of the checkpoint at ``path``."""

    def read(name: str) -> dict | None:
        try:
            with filesystem.open_input_stream(f"{path}/{name}") as f:
                return json.loads(f.read())
        except (FileNotFoundError, OSError, ValueError):
            return None

    first = read("rank0.json")
    if first is None:
        return "rank 0's manifest rank0.json is missing or unreadable", {}
    for rank in range(int(first["world"])):
        manifest = first if rank == 0 else read(f"rank{rank}.json")
        if manifest is None:
            return f"rank {rank}'s manifest rank{rank}.json is missing", first
        for name, size in manifest["files"].items():
            info = filesystem.get_file_info(f"{path}/{name}")
            if info.type != pafs.FileType.File:
                return f"{name} (rank {rank}) is missing", first
            if info.size != size:
                return f"{name} (rank {rank}) holds {info.size} bytes, its manifest {size}", first
    return None, first


def _stored(root: str) -> tuple[list[Stored], list[str]]:
    """(the complete checkpoints under ``root``, newest first; what is wrong with each other one)."""
    filesystem, base = _filesystem(root)
    infos = filesystem.get_file_info(pafs.FileSelector(base, allow_not_found=True))
    names = sorted((i.base_name for i in infos if i.type == pafs.FileType.Directory
                    and i.base_name.startswith(CHECKPOINT_PREFIX)), reverse=True)
    found, problems = [], []
    for name in names:
        problem, manifest = _problem(filesystem, f"{base}/{name}")
        if problem:
            problems.append(f"checkpoint {base}/{name} is not usable ({problem})")
        else:
            found.append(Stored(f"{base}/{name}", filesystem, int(manifest["world"]), int(manifest["step"]),
                                int(manifest["epoch"])))
    return found, problems


def usable_checkpoints(root: str, *, log=print) -> list[Stored]:
    """The complete checkpoints of the run stored under ``root``, newest first; each skipped one is logged."""
    found, problems = _stored(root)
    for problem in problems:
        log(f"{problem}; looking at the one before")
    return found


def check_resumable(root: str, world: int) -> None:
    """Before training: a run with checkpoints resumes from a complete one, on the world size it was written
    by; it never starts again from step 0 because its checkpoints are damaged."""
    stored, problems = _stored(root)
    if problems and not stored:
        raise ValueError(f"no checkpoint of this run is complete: {'; '.join(problems)}. Restore the files, or start a "
                         "new run.name (this one would begin again at step 0)")
    if stored and stored[0].world != world:
        raise ValueError(f"{stored[0].path} (step {stored[0].step}) was written by {stored[0].world} student workers, "
                         f"and ZeRO's optimizer shards are per worker: resume with pools.student.num_workers="
                         f"{stored[0].world}, or start a new run.name with {world} workers")
