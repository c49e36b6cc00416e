"""Image files made to hurt a decoder: headers that lie about their size, huge blank images that
compress to little, truncated and random files. Built in code, so no test ships a large file."""
from __future__ import annotations

import struct
import zlib
from pathlib import Path

import cv2
import numpy as np

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_claiming(width: int, height: int) -> bytes:
    """A 74-byte PNG whose header claims `width` x `height` RGB pixels; its data holds a few rows at most."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return PNG_SIGNATURE + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(bytes(778), 9)) + _chunk(b"IEND", b"")


def write_blank_png(path: Path, width: int, height: int) -> Path:
    """A real, complete black RGB PNG of `width` x `height`, streamed out row by row (20000 x 20000
    is 1.2 GB of pixels and 5 MB of file)."""
    packer = zlib.compressobj(1)
    row = b"\x00" + bytes(width * 3)   # filter byte "none", then the row
    with open(path, "wb") as f:
        f.write(PNG_SIGNATURE + _chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)))
        rows_per_write = max(1, (8 << 20) // len(row))
        for start in range(0, height, rows_per_write):
            data = packer.compress(row * min(rows_per_write, height - start))
            if data:
                f.write(_chunk(b"IDAT", data))
        f.write(_chunk(b"IDAT", packer.flush()) + _chunk(b"IEND", b""))
    return path


def truncated_jpeg(seed: int = 0, h: int = 48, w: int = 64) -> bytes:
    """The first half of a JPEG of noise: a valid header, then the data stops."""
    noise = np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)
    whole = cv2.imencode(".jpg", noise)[1].tobytes()
    return whole[: len(whole) // 2]


def random_bytes(seed: int = 0, n: int = 4096) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


HOSTILE = ("0000a-bomb.png", "0000b-huge.png", "0000c-truncated.jpg", "0000d-random.png")


def add_hostile_files(folder: Path, huge_png: Path) -> list[str]:
    """Put one of each hostile file into `folder` (names sorting among the good ones); their names."""
    (folder / HOSTILE[0]).write_bytes(png_claiming(100_000, 100_000))
    (folder / HOSTILE[1]).write_bytes(huge_png.read_bytes())
    (folder / HOSTILE[2]).write_bytes(truncated_jpeg())
    (folder / HOSTILE[3]).write_bytes(random_bytes())
    return list(HOSTILE)
