"""Reading back what an offline W&B run logged (wandb 0.31 writes no wandb-summary.json offline, and ships
no reader for its run file): the file is wandb's 7-byte header, then a LevelDB-style log (32 KiB blocks of
chunks: crc32 4 bytes, length 2 little-endian, type 1: full, first, middle, last) of wandb's Record protos."""

from __future__ import annotations

import json
from pathlib import Path

from wandb.proto import wandb_internal_pb2 as pb

HEADER, BLOCK, CHUNK_HEADER = 7, 32768, 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: Path) -> list[pb.Record]:
    data, pos, out, pending = path.read_bytes(), HEADER, [], b""
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    while pos + CHUNK_HEADER <= len(data):
        if BLOCK - pos % BLOCK < CHUNK_HEADER:  # a block's tail too short for a chunk is padding
            pos += BLOCK - pos % BLOCK
            continue
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        chunk, pos = data[pos + CHUNK_HEADER : pos + CHUNK_HEADER + length], pos + CHUNK_HEADER + length
        if kind == 0:
            continue
        pending = chunk if kind in (FULL, FIRST) else pending + chunk
        if kind in (FULL, LAST):
            record = pb.Record()
            record.ParseFromString(pending)
            out.append(record)
    return out


def history(run_dir: Path) -> list[dict]:
    """The rows ``wandb.log`` wrote in the offline run ``run_dir`` (values decoded from JSON, ``_step`` kept)."""
    (path,) = run_dir.glob("run-*.wandb")
    rows = []
    for r in records(path):
        if r.WhichOneof("record_type") == "history":
            rows.append({(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in r.history.item})
    return rows
