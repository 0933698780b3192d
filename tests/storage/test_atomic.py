"""Checksums: ISA-L's CRC-32 (when installed) gives zlib's values, so stores written with either one verify."""

import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest

from seekax.storage import atomic


@pytest.mark.parametrize("size", [0, 1, 63, 4096, 73_728, 3 << 20])
def test_crc32_equals_zlib(size):
    data = np.random.default_rng(size).integers(0, 256, size=size, dtype=np.uint8)
    assert atomic.crc32(data) == zlib.crc32(data)
    half = size // 2  # continued from a running value, as the shard writer does
    assert atomic.crc32(data[half:], atomic.crc32(data[:half])) == zlib.crc32(data)


def test_crc32_catches_a_flipped_bit():
    data = np.random.default_rng(0).integers(0, 256, size=73_728, dtype=np.uint8)
    flipped = data.copy()
    flipped[12_345] ^= 0x10
    assert atomic.crc32(flipped) != atomic.crc32(data)


def test_file_crc32_over_chunks(tmp_path, monkeypatch):
    monkeypatch.setattr(atomic, "CHUNK", 1000)  # several chunks, the last one short
    data = np.random.default_rng(1).integers(0, 256, size=4321, dtype=np.uint8).tobytes()
    (tmp_path / "f").write_bytes(data)
    assert atomic.file_crc32(tmp_path / "f") == zlib.crc32(data)
    assert atomic.file_crc32(tmp_path / "f", length=2500) == zlib.crc32(data[:2500])


def test_falls_back_to_zlib_without_isal():
    """The GPU image has no isal: the module must import and checksum with zlib (same values)."""
    code = ("import sys, zlib; sys.modules['isal'] = None; sys.modules['isal.isal_zlib'] = None\n"
            "from seekax.storage import atomic\n"
            "assert atomic._crc32 is zlib.crc32, atomic._crc32\n"
            "assert atomic.crc32(b'seekax') == zlib.crc32(b'seekax')\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[2])
