"""An image's format and size from its first bytes, without decoding it.

The decoders trust the size a header claims: a 74-byte PNG may say it is
100000 x 100000 pixels. Reading the header first lets `shared.imaging` refuse
such a file before a decoder allocates anything. The formats read here are
those OpenCV decodes whose header is cheap to walk: PNG, JPEG, BMP, TIFF,
WebP, GIF, Sun raster and the PNM family (PBM, PGM, PPM, PAM, PFM).
"""
from __future__ import annotations

import re
import struct
from dataclasses import dataclass

FORMATS = "PNG, JPEG, BMP, TIFF, WebP, GIF, Sun raster, PBM/PGM/PPM/PAM/PFM"
# JPEG markers that start a frame and carry its size (SOF0-15 but DHT, JPG and DAC)
_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_STANDALONE = frozenset({0x01, *range(0xD0, 0xD8)})   # RSTn and TEM carry no length
_PNM_TOKEN = re.compile(rb"(?:\s|#[^\n]*\n?)*(\S+)")
_PAM_FIELD = re.compile(rb"^(WIDTH|HEIGHT)\s+(\d+)\s*$", re.MULTILINE)
_TIFF_TYPES = {3: ("H", 2), 4: ("I", 4), 16: ("Q", 8)}   # SHORT, LONG, LONG8: the types a size may have


class HeaderError(ValueError):
    """A header that is cut short or contradicts its own format."""


@dataclass(frozen=True, slots=True)
class Header:
    kind: str     # "png", "jpeg", ...
    width: int
    height: int


def read_header(data: bytes) -> Header | None:
    """The format and size `data` claims; None for a format not read here; HeaderError if malformed."""
    for signature, kind, reader in _READERS:
        if data.startswith(signature):
            try:
                width, height = reader(data)
            except (struct.error, IndexError, KeyError, ValueError) as exc:
                if isinstance(exc, HeaderError):
                    raise
                raise HeaderError(f"{kind} header cut short or malformed") from None
            return Header(kind, width, height)
    return None


def _png(data: bytes) -> tuple[int, int]:
    if data[12:16] != b"IHDR":
        raise HeaderError("PNG without an IHDR chunk first")
    return struct.unpack(">II", data[16:24])


def _jpeg(data: bytes) -> tuple[int, int]:
    pos = 2
    while True:
        if data[pos] != 0xFF:
            raise HeaderError(f"JPEG marker expected at byte {pos}")
        while data[pos] == 0xFF:   # fill bytes may precede a marker
            pos += 1
        marker = data[pos]
        pos += 1
        if marker in _STANDALONE:
            continue
        if marker in (0xD9, 0xDA):   # end of image, or scan data before any frame header
            raise HeaderError("JPEG without a frame header (SOF) before its data")
        (length,) = struct.unpack(">H", data[pos:pos + 2])
        if marker in _SOF:
            height, width = struct.unpack(">HH", data[pos + 3:pos + 7])
            return width, height
        if length < 2:
            raise HeaderError(f"JPEG segment of length {length} at byte {pos}")
        pos += length


def _bmp(data: bytes) -> tuple[int, int]:
    (size,) = struct.unpack("<I", data[14:18])
    if size == 12:   # OS/2 BITMAPCOREHEADER
        return struct.unpack("<HH", data[18:22])
    width, height = struct.unpack("<ii", data[18:26])
    return abs(width), abs(height)   # a negative height means rows top-down


def _tiff(data: bytes) -> tuple[int, int]:
    """ImageWidth (256) and ImageLength (257) of the first IFD, the page OpenCV decodes."""
    order = "<" if data[:2] == b"II" else ">"
    (version,) = struct.unpack(order + "H", data[2:4])
    big = version == 43
    if big:
        (ifd,) = struct.unpack(order + "Q", data[8:16])
        (count,) = struct.unpack(order + "Q", data[ifd:ifd + 8])
        first, entry, value_at = ifd + 8, 20, 12
    else:
        (ifd,) = struct.unpack(order + "I", data[4:8])
        (count,) = struct.unpack(order + "H", data[ifd:ifd + 2])
        first, entry, value_at = ifd + 2, 12, 8
    size: dict[int, int] = {}
    for i in range(min(count, 4096)):
        at = first + i * entry
        tag, kind = struct.unpack(order + "HH", data[at:at + 4])
        if tag in (256, 257) and kind in _TIFF_TYPES:
            fmt, width = _TIFF_TYPES[kind]
            (size[tag],) = struct.unpack(order + fmt, data[at + value_at:at + value_at + width])
    if 256 not in size or 257 not in size:
        raise HeaderError("TIFF whose first page has no width or height")
    return size[256], size[257]


def _webp(data: bytes) -> tuple[int, int]:
    if data[8:12] != b"WEBP":
        raise HeaderError("RIFF file that is not WebP")
    chunk, body = data[12:16], data[20:]
    if chunk == b"VP8 ":
        if body[3:6] != b"\x9d\x01\x2a":
            raise HeaderError("WebP VP8 frame without its start code")
        width, height = struct.unpack("<HH", body[6:10])
        return width & 0x3FFF, height & 0x3FFF
    if chunk == b"VP8L":
        if body[0] != 0x2F:
            raise HeaderError("WebP lossless frame without its signature")
        (bits,) = struct.unpack("<I", body[1:5])
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if chunk == b"VP8X":   # extended: the canvas, 24-bit sizes minus one
        return int.from_bytes(body[4:7], "little") + 1, int.from_bytes(body[7:10], "little") + 1
    raise HeaderError(f"WebP with an unknown first chunk {chunk!r}")


def _gif(data: bytes) -> tuple[int, int]:
    return struct.unpack("<HH", data[6:10])   # the logical screen every frame is drawn on


def _sun(data: bytes) -> tuple[int, int]:
    return struct.unpack(">II", data[4:12])


def _pnm(data: bytes) -> tuple[int, int]:
    head = data[:4096]
    if head[:2] == b"P7":   # PAM: WIDTH and HEIGHT lines before ENDHDR
        fields = dict(_PAM_FIELD.findall(head.split(b"ENDHDR", 1)[0]))
        return int(fields[b"WIDTH"]), int(fields[b"HEIGHT"])
    tokens = _PNM_TOKEN.findall(head[2:])[:2]
    if len(tokens) < 2 or not all(t.isdigit() for t in tokens):
        raise HeaderError("PNM header without a width and height")
    return int(tokens[0]), int(tokens[1])


_READERS = (
    (b"\x89PNG\r\n\x1a\n", "PNG", _png),
    (b"\xff\xd8", "JPEG", _jpeg),
    (b"BM", "BMP", _bmp),
    (b"II*\x00", "TIFF", _tiff), (b"MM\x00*", "TIFF", _tiff),
    (b"II+\x00", "TIFF", _tiff), (b"MM\x00+", "TIFF", _tiff),   # BigTIFF
    (b"RIFF", "WebP", _webp),
    (b"GIF87a", "GIF", _gif), (b"GIF89a", "GIF", _gif),
    (b"\x59\xa6\x6a\x95", "Sun raster", _sun),
    *((f"P{c}".encode(), "PNM", _pnm) for c in "1234567Ff"),
)
