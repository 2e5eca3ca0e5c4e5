"""PNGs of any declared size, written row by row in the memory of one row."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

Rect = tuple[int, int, int, int]  # x0, y0, x1, y1: columns x0..x1-1 of rows y0..y1-1


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def write_large_png(
    path: Path, width: int, height: int, rect: Rect | None = None, rows: int | None = None
) -> int:
    """Write a white 8-bit RGB PNG with a black `rect`; return its size in bytes.

    `rows` < height writes only that many rows: a truncated file whose header is intact."""
    x0, y0, x1, y1 = rect or (0, 0, 0, 0)
    white = b"\x00" + b"\xff" * (3 * width)  # each row: filter byte 0 (None), then RGB
    black = b"\x00" + b"\xff" * (3 * x0) + b"\x00" * (3 * (x1 - x0)) + b"\xff" * (3 * (width - x1))
    # Run-length matching: as small as level 9 on flat rows, at the speed of level 1.
    deflate = zlib.compressobj(6, zlib.DEFLATED, 15, 9, zlib.Z_RLE)
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8 bits, RGB
    with path.open("wb") as out:
        out.write(b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header))
        for y in range(height if rows is None else rows):
            data = deflate.compress(black if y0 <= y < y1 else white)
            if data:
                out.write(_chunk(b"IDAT", data))
        out.write(_chunk(b"IDAT", deflate.flush()))
        if rows is None:
            out.write(_chunk(b"IEND", b""))
        return out.tell()
