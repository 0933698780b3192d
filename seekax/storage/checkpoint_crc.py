"""Per-file CRC-32 manifest of a committed checkpoint step, checked before a restore reads it.

orbax and tensorstore keep no checksum of array data (zarr3's crc32c covers only a shard's index), so a flipped
bit in a step's files would come back as a wrong weight. Once orbax has committed a step, the checkpointer
writes `seekax.crc32.json` into the step (size and CRC-32 of every file, ISA-L over an mmap of the page-cached
files: ~50 ms per GiB here), atomically. `restore` checks every listed file first and raises
`CorruptCheckpointError` naming the step and file. A step committed just before a kill may lack the manifest;
it restores unchecked (the window is the few milliseconds between orbax's commit and the manifest's rename).
"""

from __future__ import annotations

import mmap
import os
from pathlib import Path

from seekax.storage.atomic import atomic_write_json, crc32, read_json

MANIFEST = "seekax.crc32.json"


class CorruptCheckpointError(ValueError):
    """A checkpoint step's file does not match the checksum recorded when the step was committed."""


def _file_crc(path: Path) -> tuple[int, int]:
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            return 0, 0
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            return size, crc32(m)


def _files(step_dir: Path) -> list[Path]:
    return sorted(p for p in step_dir.rglob("*") if p.is_file() and p.name != MANIFEST)


def write_manifest(step_dir: Path) -> None:
    """Record size and CRC-32 of every file of a committed step (atomically)."""
    files = {str(p.relative_to(step_dir)): list(_file_crc(p)) for p in _files(step_dir)}
    atomic_write_json(step_dir / MANIFEST, {"format": "seekax.checkpoint_crc32", "files": files})


def verify(step_dir: Path, step: int) -> bool:
    """Check a step against its manifest; raises CorruptCheckpointError on a mismatch. False: no manifest."""
    if not (step_dir / MANIFEST).exists():
        return False
    files = read_json(step_dir / MANIFEST, "checkpoint manifest")["files"]
    for rel, (size, want) in files.items():
        p = step_dir / rel
        if not p.is_file():
            raise CorruptCheckpointError(f"checkpoint step {step}: {rel} is missing (its manifest lists it)")
        got_size, got = _file_crc(p)
        if (got_size, got) != (size, want):
            raise CorruptCheckpointError(f"checkpoint step {step}: {rel} fails its checksum ({got_size} bytes, "
                                         f"crc {got:08x}; committed {size} bytes, crc {want:08x}): flipped bit or "
                                         "overwritten file; nothing restored")
    return True
