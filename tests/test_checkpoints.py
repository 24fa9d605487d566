"""Which checkpoint a run resumes from: the newest complete one (every rank's manifest, every file at its
size), never a damaged one, never one of another world size, never nothing when all are damaged."""

from __future__ import annotations

from pathlib import Path

import pytest

from cluster.engine.checkpoints import check_resumable, usable_checkpoints, write_manifest


def _checkpoint(root: Path, stamp: str, *, world: int, step: int) -> Path:
    """A checkpoint as the workers write it: each rank its own files, then its manifest."""
    folder = root / f"checkpoint_2026-12-02_{stamp}"
    for rank in range(world):
        part = root / f"rank-{rank}-{stamp}"  # each rank's own directory before Ray Train merges them
        (part / "ce" / "ckpt").mkdir(parents=True)
        (part / "ce" / "ckpt" / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt").write_bytes(b"x" * (100 + rank))
        if rank == 0:
            (part / "ce" / "ckpt" / "mp_rank_00_model_states.pt").write_bytes(b"m" * 500)
        write_manifest(part, rank=rank, world=world, step=step, epoch=step // 4)
        for path in part.rglob("*"):
            target = folder / path.relative_to(part)
            if path.is_dir():
                target.mkdir(parents=True, exist_ok=True)
            else:
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(path.read_bytes())
    return folder


def test_the_newest_complete_checkpoint_wins_and_damaged_ones_are_named(tmp_path):
    old = _checkpoint(tmp_path, "10-00-00", world=2, step=4)
    mid = _checkpoint(tmp_path, "10-01-00", world=2, step=8)
    new = _checkpoint(tmp_path, "10-02-00", world=2, step=12)
    assert [c.step for c in usable_checkpoints(str(tmp_path), log=print)] == [12, 8, 4]
    truncated = new / "ce" / "ckpt" / "mp_rank_00_model_states.pt"
    truncated.write_bytes(truncated.read_bytes()[:10])
    (mid / "rank1.json").unlink()  # rank 1 died before its part was complete
    lines: list[str] = []
    assert [c.path for c in usable_checkpoints(str(tmp_path), log=lines.append)] == [str(old)]
    assert "mp_rank_00_model_states.pt (rank 0) holds 10 bytes, its manifest 500" in lines[0]
    assert "rank 1's manifest rank1.json is missing" in lines[1]
    check_resumable(str(tmp_path), 2)  # one complete checkpoint is enough


@pytest.mark.parametrize("written_by, resumed_with", [(2, 1), (1, 2)])
def test_another_world_size_is_refused_with_what_to_set(tmp_path, written_by, resumed_with):
    _checkpoint(tmp_path, "10-00-00", world=written_by, step=6)
    with pytest.raises(ValueError, match=f"written by {written_by} student workers.*"
                                         f"pools.student.num_workers={written_by}"):
        check_resumable(str(tmp_path), resumed_with)


def test_a_run_whose_checkpoints_are_all_damaged_stops_instead_of_starting_over(tmp_path):
    new = _checkpoint(tmp_path, "10-00-00", world=2, step=6)
    (new / "ce" / "ckpt" / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    with pytest.raises(ValueError, match="no checkpoint of this run is complete.*zero_pp_rank_1.*missing"):
        check_resumable(str(tmp_path), 2)
    check_resumable(str(tmp_path / "a new run"), 2)  # no checkpoints at all: a fresh start is right
