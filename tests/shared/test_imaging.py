"""Reading images safely: headers checked against the limits before decoding, every failure an
ImageError naming the file, and every format OpenCV writes read back."""
from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import cv2
import numpy as np
import pytest

from shared.image_header import read_header
from shared.imaging import DEFAULT_LIMITS, ImageError, ImageLimits, check_image, decode_image, read_image, read_mask
from tests.hostile_images import png_claiming, random_bytes, truncated_jpeg

SAMPLE = np.dstack([np.tile(np.arange(12, dtype=np.uint8) * 20, (10, 1)), np.full((10, 12), 90, np.uint8),
                    np.full((10, 12), 200, np.uint8)])   # (10, 12, 3): BGR, distinct channels


def test_a_74_byte_png_claiming_100000_squared_pixels_is_refused_by_name(tmp_path):
    path = tmp_path / "bomb.png"
    path.write_bytes(png_claiming(100_000, 100_000))
    assert path.stat().st_size == 74
    with pytest.raises(ImageError, match=r"bomb\.png: PNG of 100000 x 100000 pixels \(10000\.0 MP\) is over "
                                         r"the 50 MP limit; refused before decoding"):
        read_image(path)


def test_what_opencv_itself_refuses_is_an_image_error_too():
    # limits above OpenCV's own (2^30 pixels): its decoder raises cv2.error, which must not escape
    lax = ImageLimits(max_pixels=10**12)
    with pytest.raises(ImageError, match=r"frame\.png: the PNG decoder failed \(.*pixels.*\); the file is corrupt"):
        decode_image(png_claiming(100_000, 100_000), "frame.png", lax)


PEAK = textwrap.dedent("""
    import resource, sys
    from shared.imaging import ImageError, read_image
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    try:
        read_image(sys.argv[1])
        print("decoded")
    except ImageError as exc:
        print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024, exc)
""")


def test_a_20000_squared_png_is_refused_before_decoding_and_costs_no_memory(huge_png):
    run = subprocess.run([sys.executable, "-c", PEAK, str(huge_png)], capture_output=True, text=True,
                         timeout=120, cwd=Path(__file__).parents[2])
    grew_mib, _, message = run.stdout.partition(" ")
    assert run.returncode == 0, run.stderr
    assert "20000 x 20000 pixels (400.0 MP) is over the 50 MP limit" in message
    assert int(grew_mib) < 16, f"peak memory grew by {grew_mib} MiB reading a refused image"
    # the file is no lie: with the limit raised, OpenCV decodes it (at an eighth of its size, to spare memory)
    assert cv2.imread(str(huge_png), cv2.IMREAD_REDUCED_COLOR_8).shape == (2500, 2500, 3)


def test_a_file_over_the_byte_limit_is_refused_unread(tmp_path):
    path = tmp_path / "big.jpg"
    path.write_bytes(cv2.imencode(".jpg", SAMPLE)[1].tobytes() + bytes(5000))
    limits = ImageLimits(max_bytes=4096)
    with pytest.raises(ImageError, match=r"big\.jpg: over the 0\.00390625 MiB file size limit; refused unread"):
        read_image(path, limits)
    assert read_image(path).shape == (10, 12, 3)   # the default limit lets it through


@pytest.mark.parametrize("data, reason", [
    (truncated_jpeg(), r"not a decodable JPEG image \(corrupt or truncated\?\)"),
    (random_bytes(), r"not a recognised image \(PNG, JPEG, .*\): it starts b'.*', so it is corrupt or of another"),
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\x0dIHDR\x00\x01",
     r"PNG header cut short or malformed; the file is corrupt or truncated"),
    (b"\xff\xd8\xff\xd9", r"JPEG without a frame header"),
    (png_claiming(0, 10), r"PNG header gives 0 x 10 pixels; the file is corrupt"),
    (b"", r"not a recognised image"),
])
def test_broken_images_are_image_errors_naming_the_file(data, reason):
    with pytest.raises(ImageError, match=r"^cam-3/0042\.png: " + reason):
        decode_image(data, "cam-3/0042.png")


def test_an_empty_file_is_named(tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(ImageError, match=r"empty\.png: empty file"):
        read_image(tmp_path / "empty.png")
    with pytest.raises(ImageError, match=r"empty\.png: empty file"):
        read_mask(tmp_path / "empty.png")


def test_masks_are_checked_like_images(tmp_path):
    (tmp_path / "mask.png").write_bytes(png_claiming(30_000, 30_000))
    with pytest.raises(ImageError, match=r"mask\.png: PNG of 30000 x 30000 pixels"):
        read_mask(tmp_path / "mask.png")


def _tiff(**kwargs) -> bytes:
    import io

    import tifffile

    out = io.BytesIO()
    tifffile.imwrite(out, SAMPLE[:, :, ::-1], photometric="rgb", **kwargs)
    return out.getvalue()


ENCODED = {
    ".png": lambda: cv2.imencode(".png", SAMPLE)[1].tobytes(),
    ".jpg": lambda: cv2.imencode(".jpg", SAMPLE, [cv2.IMWRITE_JPEG_QUALITY, 100])[1].tobytes(),
    "progressive .jpg": lambda: cv2.imencode(".jpg", SAMPLE, [cv2.IMWRITE_JPEG_PROGRESSIVE, 1])[1].tobytes(),
    ".bmp": lambda: cv2.imencode(".bmp", SAMPLE)[1].tobytes(),
    ".tif": lambda: cv2.imencode(".tif", SAMPLE)[1].tobytes(),
    "big-endian .tif": lambda: _tiff(byteorder=">"),
    "BigTIFF": lambda: _tiff(bigtiff=True),
    ".webp": lambda: cv2.imencode(".webp", SAMPLE)[1].tobytes(),
    "lossless .webp": lambda: cv2.imencode(".webp", SAMPLE, [cv2.IMWRITE_WEBP_QUALITY, 101])[1].tobytes(),
    ".ppm": lambda: cv2.imencode(".ppm", SAMPLE)[1].tobytes(),
    ".pgm": lambda: cv2.imencode(".pgm", SAMPLE[:, :, 0])[1].tobytes(),
    ".pbm": lambda: cv2.imencode(".pbm", SAMPLE[:, :, 0])[1].tobytes(),
    ".pam": lambda: cv2.imencode(".pam", SAMPLE)[1].tobytes(),
    ".pfm": lambda: cv2.imencode(".pfm", SAMPLE.astype(np.float32) / 255)[1].tobytes(),
    ".gif": lambda: cv2.imencode(".gif", SAMPLE)[1].tobytes(),
    ".ras": lambda: cv2.imencode(".ras", SAMPLE)[1].tobytes(),
    "16-bit .png": lambda: cv2.imencode(".png", SAMPLE.astype(np.uint16) * 257)[1].tobytes(),
    "grey+alpha .png": lambda: _grey_alpha_png(),
}


def _grey_alpha_png() -> bytes:
    from PIL import Image
    import io

    out = io.BytesIO()
    Image.fromarray(np.dstack([SAMPLE[:, :, 0], np.full((10, 12), 255, np.uint8)]), "LA").save(out, "PNG")
    return out.getvalue()


@pytest.mark.parametrize("kind", list(ENCODED))
def test_every_format_s_size_is_read_from_its_header_and_it_decodes(kind):
    data = ENCODED[kind]()
    header = read_header(data)
    assert header is not None and (header.width, header.height) == (12, 10)
    assert check_image(data) == header
    rgb = decode_image(data, kind)
    assert rgb.shape == (10, 12, 3) and rgb.dtype == np.uint8
    lossless = (".png", ".bmp", ".tif", "big-endian .tif", "BigTIFF", ".ppm", ".pam", "lossless .webp")
    if kind in lossless:   # exactly the pixels written, as RGB
        assert np.array_equal(rgb, SAMPLE[:, :, ::-1])


def test_mangled_images_raise_nothing_but_image_errors():
    rng = np.random.default_rng(3)
    seeds = [cv2.imencode(ext, SAMPLE)[1].tobytes() for ext in (".png", ".jpg", ".bmp", ".tif", ".webp", ".gif")]
    outcomes = {"decoded": 0, "refused": 0}
    for i in range(600):
        data = bytearray(seeds[i % len(seeds)])
        for _ in range(rng.integers(1, 6)):   # flip a few bytes, often in the header
            at = int(rng.integers(0, min(len(data), 64 if rng.random() < 0.7 else len(data))))
            data[at] = int(rng.integers(0, 256))
        if rng.random() < 0.3:
            data = data[: int(rng.integers(1, len(data)))]
        try:
            rgb = decode_image(bytes(data), f"mangled-{i}")
        except ImageError as exc:
            assert str(exc).startswith(f"mangled-{i}: ")
            outcomes["refused"] += 1
        else:
            assert rgb.dtype == np.uint8 and rgb.ndim == 3 and rgb.shape[0] * rgb.shape[1] <= DEFAULT_LIMITS.max_pixels
            outcomes["decoded"] += 1
    assert outcomes["refused"] > 100 and outcomes["decoded"] > 50, outcomes
