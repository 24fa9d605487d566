"""Convert an ImageFolder tree (``root/class_name/.../img.ext``) into webdataset shards.

Every non-hidden file under a class folder is a candidate; it is kept when ``decode_image`` fully
decodes it (any mode; decompression bombs are refused). JPEG and PNG are stored byte-for-byte (no
re-encode: readers convert their modes with the same ``decode_image``); any other format PIL reads
(GIF, BMP, TIFF, WebP, ...) is stored as a PNG of its ``decode_image`` RGB pixels. Files that do not
decode are skipped and listed with their reason in ``OUT/skipped.tsv`` (path, tab, reason). Labels
follow the sorted class folder names, numerically when all names are integers (the official DAD code
sorted "0".."999" as strings, which scrambles the labels).
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image
from tqdm import tqdm

from robust.data.images import UndecodableImage, decode_image
from robust.data.shards import LABEL, Manifest, encode_png, write_shards

# PIL format -> the field its bytes are stored in as they are; MPO is a JPEG with extra pictures
# after the first (camera files), which JPEG decoders read as the first picture.
_STORED_FORMATS = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png"}
_CHUNK = 256  # files decoded concurrently; bounds the bytes held in memory
_SHOWN = 20  # skipped files listed in the printed summary
SKIPPED = "skipped.tsv"  # every skipped file and its reason, next to the manifest


@dataclass
class ConvertReport:
    out_dir: Path
    manifest: Manifest
    class_names: list[str]
    skipped: list[tuple[str, str]]  # (path, reason) of every file not converted


def class_names_of(root: str | Path) -> list[str]:
    """Class folder names in label order: numeric when every name is an integer, else lexicographic."""
    names = sorted(p.name for p in Path(root).iterdir() if p.is_dir() and not p.name.startswith("."))
    if names and all(n.isascii() and n.isdigit() for n in names):
        names.sort(key=lambda n: (int(n), n))
    return names


def convert_folder(
    root: str | Path,
    out_dir: str | Path,
    *,
    prefix: str = "shard",
    max_per_shard: int = 1000,
    workers: int = 4,
    overwrite: bool = False,
) -> ConvertReport:
    """Write every decodable image under ``root``'s class folders to shards in ``out_dir``."""
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"image folder {root} does not exist")
    class_names = class_names_of(root)
    if not class_names:
        raise ValueError(f"{root} has no class folders; expected the layout root/class_name/image.jpg")
    files = [(path, label) for label, name in enumerate(class_names) for path in _files_in(root / name)]
    if not files:
        raise ValueError(f"no files under the class folders of {root}")
    skipped: list[tuple[str, str]] = []
    with ThreadPoolExecutor(max(1, workers)) as pool, tqdm(total=len(files), desc=f"convert {root.name}",
                                                          unit="img") as bar:
        samples = _samples(files, pool, bar, skipped)
        try:
            manifest = write_shards(samples, out_dir, prefix=prefix, max_per_shard=max_per_shard,
                                    class_names=class_names, overwrite=overwrite)
        except ValueError:
            if len(skipped) == len(files):
                raise ValueError(f"none of the {len(files)} files under {root} is a readable image; "
                                 f"first: {skipped[0][0]}: {skipped[0][1]}") from None
            raise
    report = ConvertReport(Path(out_dir), manifest, class_names, skipped)
    # tabs and newlines in PIL's messages would break the columns
    (report.out_dir / SKIPPED).write_text("".join(f"{p}\t{' '.join(r.split())}\n" for p, r in skipped))
    _print_summary(root, report)
    return report


def _files_in(class_dir: Path) -> list[Path]:
    return sorted(p for p in class_dir.rglob("*") if p.is_file() and not p.name.startswith("."))


def _samples(files: list[tuple[Path, int]], pool: ThreadPoolExecutor, bar: tqdm,
             skipped: list[tuple[str, str]]) -> Iterator[dict[str, Any]]:
    for start in range(0, len(files), _CHUNK):
        chunk = files[start:start + _CHUNK]
        for index, (path, label), (stored, reason) in zip(
            range(start, start + len(chunk)), chunk, pool.map(_read_checked, [p for p, _ in chunk])
        ):
            bar.update()
            if stored is None:
                skipped.append((str(path), reason))
                continue
            image_field, data = stored
            # key = position in the sorted file list: unique, and stable when other files are skipped
            yield {"__key__": f"{index:09d}", image_field: data, LABEL: label}


def _read_checked(path: Path) -> tuple[tuple[str, bytes] | None, str]:
    """((field, bytes to store), "") for a decodable image, else (None, reason)."""
    try:
        data = path.read_bytes()
        x_HWC = decode_image(data)  # a full decode: Image.verify() misses truncated pixel data
    except (OSError, UndecodableImage) as err:
        return None, f"{type(err).__name__}: {err}"
    with Image.open(io.BytesIO(data)) as im:  # decoded above, so this header read succeeds
        image_format = im.format
    if image_format in _STORED_FORMATS:
        return (_STORED_FORMATS[image_format], data), ""
    return ("png", encode_png(x_HWC)), ""


def _print_summary(root: Path, report: ConvertReport) -> None:
    m = report.manifest
    print(f"{root}: wrote {m.total} images of {len(report.class_names)} classes to {len(m.shards)} shards "
          f"in {report.out_dir}; skipped {len(report.skipped)}")
    for path, reason in report.skipped[:_SHOWN]:
        print(f"  skipped {path}: {reason}")
    if len(report.skipped) > _SHOWN:
        print(f"  ... and {len(report.skipped) - _SHOWN} more; {report.out_dir / SKIPPED} lists all")
