"""pipelines.images: decoding every format/mode, bad inputs with their reasons, resize policies, encoding.

Real CamVid photos and masks come from ../shared (conftest's camvid_dir); everything else is generated.
"""

from __future__ import annotations

import io
import resource
import struct
import time
import warnings
import zlib
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from PIL import Image, ImageFile, ImageOps

from pipelines.images import (
    DEFAULT_MAX_PIXELS,
    BadInput,
    ResizePolicy,
    apply_resize,
    decode_image,
    decode_image_reduced,
    decode_label_mask,
    encode_image,
    split_side_by_side,
)

CAMVID_KEY = "0001TP_006690"

# ----------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------


def save(im: Image.Image, fmt: str, **params: object) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **params)
    return buf.getvalue()


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def raw_png(width: int, height: int, bit_depth: int, color_type: int, idat: bytes) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")
    )


def bomb_png(side: int) -> bytes:
    """A fully valid side x side 1-bit PNG of zeros: a few tens of kB that decode to side^2 bytes."""
    row = b"\x00" * (1 + (side + 7) // 8)  # filter byte + packed bits
    z = zlib.compressobj(9)
    block = row * 1000
    parts = [z.compress(block) for _ in range(side // 1000)]
    parts += [z.compress(row * (side % 1000)), z.flush()]
    return raw_png(side, side, 1, 0, b"".join(parts))


def patched_size_png(width: int, height: int) -> bytes:
    """A tiny valid PNG whose IHDR (CRC recomputed) then claims width x height."""
    data = bytearray(save(Image.new("L", (4, 4)), "PNG"))
    ihdr = data[12:29]  # b"IHDR" + 13 bytes
    ihdr[4:12] = struct.pack(">II", width, height)
    data[12:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)))
    return bytes(data)


def quadrants(width: int = 32, height: int = 24) -> Image.Image:
    """RGB image with four solid quadrants: red TL, green TR, blue BL, white BR."""
    arr = np.zeros((height, width, 3), np.uint8)
    h2, w2 = height // 2, width // 2
    arr[:h2, :w2] = (255, 0, 0)
    arr[:h2, w2:] = (0, 255, 0)
    arr[h2:, :w2] = (0, 0, 255)
    arr[h2:, w2:] = (255, 255, 255)
    return Image.fromarray(arr)


def s15(x: float) -> bytes:
    return struct.pack(">i", round(x * 65536))


def k_only_cmyk_icc() -> bytes:
    """A minimal ICC v2 CMYK output profile (A2B0 only) that ignores C, M and Y: Lab = (100 (1 - K), 0, 0).

    Through it pure cyan renders white, which the profile-less formula would render cyan: proves the
    ICC path ran.
    """

    def lab(lightness: float) -> bytes:
        return struct.pack(">HHH", round(lightness * 65280 / 100), 0x8000, 0x8000)

    clut = b"".join(lab(0.0 if i & 1 else 100.0) for i in range(16))  # 2^4 grid, K varies fastest
    identity = struct.pack(">HH", 0, 65535)
    mft2 = b"mft2" + b"\0" * 4 + bytes([4, 3, 2, 0]) + b"".join(s15(v) for v in (1, 0, 0, 0, 1, 0, 0, 0, 1))
    mft2 += struct.pack(">HH", 2, 2) + identity * 4 + clut + identity * 3
    wtpt = b"XYZ " + b"\0" * 4 + s15(0.9642) + s15(1.0) + s15(0.8249)
    desc = b"desc" + b"\0" * 4 + struct.pack(">I", 6) + b"K-only" + b"\0" * 78
    tags = [(b"desc", desc), (b"wtpt", wtpt), (b"A2B0", mft2)]
    offset = 128 + 4 + 12 * len(tags)
    table = body = b""
    for sig, data in tags:
        body += b"\0" * (-(offset + len(body)) % 4)
        table += sig + struct.pack(">II", offset + len(body), len(data))
        body += data
    header = struct.pack(">I", offset + len(body)) + b"\0" * 4 + bytes([2, 0x10, 0, 0]) + b"prtrCMYKLab "
    header += b"\0" * 12 + b"acsp" + b"\0" * 28 + s15(0.9642) + s15(1.0) + s15(0.8249) + b"\0" * 48
    assert len(header) == 128
    return header + struct.pack(">I", len(tags)) + table + body


def bad_reason(data: bytes, *, mask: bool = False, **kwargs: Any) -> str:
    with pytest.raises(BadInput) as info:
        if mask:
            decode_label_mask(data, **kwargs)
        else:
            decode_image(data, **kwargs)
    return str(info.value)


# ----------------------------------------------------------------------------------------------------
# Real data
# ----------------------------------------------------------------------------------------------------


def test_camvid_photo_and_mask(camvid_dir: Path) -> None:
    photo_bytes = (camvid_dir / "train" / "images" / f"{CAMVID_KEY}.jpg").read_bytes()
    photo = decode_image(photo_bytes, f"{CAMVID_KEY}.jpg", min_side=32)
    assert photo.shape == (360, 480, 3) and photo.dtype == np.uint8
    assert photo.flags.c_contiguous and photo.flags.writeable
    bgr = cv2.imdecode(np.frombuffer(photo_bytes, np.uint8), cv2.IMREAD_COLOR)
    assert bgr is not None
    reference = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
    assert np.abs(photo.astype(int) - reference).mean() < 1.0  # same JPEG, another decoder

    mask = decode_label_mask((camvid_dir / "train" / "labels" / f"{CAMVID_KEY}.png").read_bytes())
    assert mask.shape == (360, 480) and mask.dtype == np.uint8 and mask.flags.writeable
    ids = set(np.unique(mask).tolist())
    assert ids <= set(range(12)) and len(ids) >= 5


# ----------------------------------------------------------------------------------------------------
# Formats and modes
# ----------------------------------------------------------------------------------------------------

EXPECTED_QUADRANTS = {
    (0, 0): (255, 0, 0),
    (0, -1): (0, 255, 0),
    (-1, 0): (0, 0, 255),
    (-1, -1): (255, 255, 255),
}


@pytest.mark.parametrize(
    ("fmt", "params", "tolerance"),
    [
        ("PNG", {}, 0),
        ("TIFF", {}, 0),
        ("TIFF", {"compression": "tiff_lzw"}, 0),
        ("BMP", {}, 0),
        ("GIF", {}, 0),
        ("WEBP", {"lossless": True}, 0),
        ("WEBP", {"quality": 90}, 40),
        ("JPEG", {"quality": 95}, 40),
    ],
)
def test_rgb_formats(fmt: str, params: dict[str, object], tolerance: int) -> None:
    rgb = decode_image(save(quadrants(), fmt, **params))
    assert rgb.shape == (24, 32, 3) and rgb.dtype == np.uint8 and rgb.flags.c_contiguous
    for (y, x), color in EXPECTED_QUADRANTS.items():
        assert np.abs(rgb[y, x].astype(int) - color).max() <= tolerance, (fmt, (y, x), rgb[y, x])


def test_grey_and_bilevel() -> None:
    grey = decode_image(save(Image.new("L", (8, 6), 77), "PNG"))
    assert grey.shape == (6, 8, 3) and (grey == 77).all()
    bilevel = Image.new("1", (8, 6), 0)
    bilevel.putpixel((0, 0), 1)
    out = decode_image(save(bilevel, "PNG"))
    assert tuple(out[0, 0]) == (255, 255, 255) and tuple(out[1, 1]) == (0, 0, 0)


def test_alpha_is_composited_over_white() -> None:
    rgba = Image.new("RGBA", (4, 4), (100, 50, 0, 128))
    rgba.putpixel((0, 0), (10, 20, 30, 0))
    rgba.putpixel((1, 0), (10, 20, 30, 255))
    out = decode_image(save(rgba, "PNG"))
    # c * a / 255 + 255 * (1 - a / 255), rounded
    assert tuple(out[1, 1]) == (177, 152, 127)
    assert tuple(out[0, 0]) == (255, 255, 255) and tuple(out[0, 1]) == (10, 20, 30)
    la = decode_image(save(Image.new("LA", (4, 4), (100, 128)), "PNG"))
    assert tuple(la[0, 0]) == (177, 177, 177)
    webp = decode_image(save(rgba, "WEBP", lossless=True))
    assert tuple(webp[0, 0]) == (255, 255, 255) and tuple(webp[0, 1]) == (10, 20, 30)


def test_palette_with_and_without_transparency() -> None:
    pal = Image.new("P", (4, 4), 1)
    pal.putpalette([0, 0, 0, 200, 10, 20, 0, 0, 255])
    pal.putpixel((0, 0), 2)
    plain = decode_image(save(pal, "PNG"))
    assert tuple(plain[1, 1]) == (200, 10, 20) and tuple(plain[0, 0]) == (0, 0, 255)
    see_through = decode_image(save(pal, "PNG", transparency=2))
    assert tuple(see_through[0, 0]) == (255, 255, 255) and tuple(see_through[1, 1]) == (200, 10, 20)
    gif = decode_image(save(pal, "GIF", transparency=2))
    assert tuple(gif[0, 0]) == (255, 255, 255) and tuple(gif[1, 1]) == (200, 10, 20)


def test_colour_key_transparency() -> None:
    rgb = Image.new("RGB", (4, 4), (10, 20, 30))
    rgb.putpixel((0, 0), (1, 2, 3))
    out = decode_image(save(rgb, "PNG", transparency=(1, 2, 3)))
    assert tuple(out[0, 0]) == (255, 255, 255) and tuple(out[1, 1]) == (10, 20, 30)


def test_16bit_grey_png_is_rounded_not_truncated() -> None:
    values = np.array([[0, 257, 32768, 65535, 65280, 383]], np.uint16)
    data = save(Image.fromarray(values), "PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I;16")
    out = decode_image(data)
    # round(v / 257); truncation (v >> 8) would give 255 for 65280 and 1 for 383
    assert out[0, :, 0].tolist() == [0, 1, 128, 255, 254, 1]
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()


def test_16bit_rgb_and_rgba_png() -> None:
    bgr = np.zeros((2, 3, 3), np.uint16)
    bgr[..., 2] = 65535  # R
    bgr[..., 1] = 32768  # G
    bgr[..., 0] = 65280  # B: Pillow's own decoder (high byte) would give 255
    ok, buf = cv2.imencode(".png", bgr)
    assert ok
    out = decode_image(buf.tobytes())
    assert out.shape == (2, 3, 3) and tuple(out[0, 0]) == (255, 128, 254)

    bgra = np.zeros((2, 3, 4), np.uint16)
    bgra[..., :3] = 0
    bgra[0, 0, 3] = 65535  # opaque black
    bgra[0, 1, 3] = 0  # transparent -> white
    bgra[1, :, 3] = 32768  # half -> 128
    ok, buf = cv2.imencode(".png", bgra)
    assert ok
    out = decode_image(buf.tobytes())
    assert tuple(out[0, 0]) == (0, 0, 0) and tuple(out[0, 1]) == (255, 255, 255)
    assert tuple(out[1, 0]) == (127, 127, 127)  # 65535 * (1 - 32768 / 65535) / 257 = 127.5 -> 127 (float32)

    ok, buf = cv2.imencode(".tiff", bgr)
    assert ok
    assert tuple(decode_image(buf.tobytes())[0, 0]) == (255, 128, 254)


def test_32bit_int_and_float_tiff() -> None:
    wide = Image.fromarray(np.array([[0, 32768, 65535]], np.int32))
    assert wide.mode == "I"
    assert decode_image(save(wide, "TIFF"))[0, :, 0].tolist() == [0, 128, 255]
    narrow = Image.fromarray(np.array([[0, 100, 255]], np.int32))
    assert decode_image(save(narrow, "TIFF"))[0, :, 0].tolist() == [0, 100, 255]
    unit = Image.fromarray(np.array([[0.0, 0.5, 1.0]], np.float32))
    assert decode_image(save(unit, "TIFF"))[0, :, 0].tolist() == [0, 128, 255]
    nan = Image.fromarray(np.array([[0.0, np.nan, 1.0]], np.float32))
    assert "NaN" in bad_reason(save(nan, "TIFF"))
    negative = Image.fromarray(np.array([[-5, 0, 1]], np.int32))
    assert "outside 0..65535" in bad_reason(save(negative, "TIFF"))


@pytest.mark.parametrize("fmt", ["JPEG", "TIFF"])
def test_cmyk_without_profile(fmt: str) -> None:
    im = Image.new("CMYK", (16, 16), (0, 255, 255, 0))  # red
    im.paste((100, 0, 0, 100), (0, 8, 16, 16))  # (255 - C)(255 - K) / 255 = 94; subtractive 255 - C - K = 55
    out = decode_image(save(im, fmt, **({"quality": 100} if fmt == "JPEG" else {})))
    tol = 3 if fmt == "JPEG" else 0
    assert np.abs(out[2, 2].astype(int) - (255, 0, 0)).max() <= tol
    assert np.abs(out[12, 12].astype(int) - (94, 155, 155)).max() <= tol


@pytest.mark.parametrize("fmt", ["JPEG", "TIFF"])
def test_cmyk_with_icc_profile(fmt: str) -> None:
    im = Image.new("CMYK", (16, 16), (255, 0, 0, 0))  # pure cyan: the K-only profile makes it white
    im.paste((0, 0, 0, 128), (0, 8, 16, 16))  # half K: L* ~ 50 -> sRGB ~ 118
    out = decode_image(
        save(im, fmt, icc_profile=k_only_cmyk_icc(), **({"quality": 100} if fmt == "JPEG" else {}))
    )
    assert np.abs(out[2, 2].astype(int) - 255).max() <= 2
    assert np.abs(out[12, 12].astype(int) - 118).max() <= 3


def test_unusable_icc_profile_falls_back_to_formula() -> None:
    im = Image.new("CMYK", (8, 8), (0, 255, 255, 0))
    out = decode_image(save(im, "TIFF", icc_profile=b"not a profile at all, just bytes"))
    assert tuple(out[0, 0]) == (255, 0, 0)


def test_exif_orientation_6_jpeg() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, shown rotated 90 degrees clockwise
    out = decode_image(save(quadrants(32, 24), "JPEG", quality=95, exif=exif.tobytes()))
    assert out.shape == (32, 24, 3)
    # clockwise: the stored top-left (red) ends top-right, top-right (green) bottom-right
    assert np.abs(out[0, -1].astype(int) - (255, 0, 0)).max() < 40
    assert np.abs(out[-1, -1].astype(int) - (0, 255, 0)).max() < 40
    assert np.abs(out[0, 0].astype(int) - (0, 0, 255)).max() < 40


@pytest.mark.parametrize("orientation", [1, 6])
def test_reduced_jpeg_decode_keeps_both_sides_above_the_target(camvid_dir: Path, orientation: int) -> None:
    # A real photo enlarged to 1440x1080 stands for a camera photo stored at 256 px.
    photo = cv2.imread(str(camvid_dir / "train" / "images" / f"{CAMVID_KEY}.jpg"))[..., ::-1]
    big = Image.fromarray(cv2.resize(photo, (1440, 1080), interpolation=cv2.INTER_CUBIC))
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = save(big, "JPEG", quality=95, exif=exif.tobytes())
    full = decode_image(data)
    reduced, full_size = decode_image_reduced(data, at_least=256)
    assert full_size == full.shape[:2] == ((1080, 1440) if orientation == 1 else (1440, 1080))
    assert reduced.shape[:2] == (full_size[0] // 4, full_size[1] // 4)  # 1/4 keeps 270 px >= 256, 1/8 not
    policy = ResizePolicy("resize", 256)
    a, b = apply_resize(reduced, policy).astype(float), apply_resize(full, policy).astype(float)
    assert 10 * np.log10(255**2 / np.mean((a - b) ** 2)) > 30  # the same picture at the stored size
    # No scaled decode for a JPEG under twice the target, or for other formats.
    assert decode_image_reduced(data, at_least=600)[0].shape == full.shape
    png = save(big, "PNG")
    assert decode_image_reduced(png, at_least=256)[0].shape[:2] == (1080, 1440)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_orientation_matches_exif_transpose(orientation: int) -> None:
    rng = np.random.default_rng(orientation)
    im = Image.fromarray(rng.integers(0, 256, (5, 7, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = save(im, "PNG", exif=exif.tobytes())
    expected = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB"))
    out = decode_image(data)
    assert out.shape == expected.shape and np.array_equal(out, expected)
    assert out.flags.c_contiguous and out.flags.writeable


def test_min_side() -> None:
    assert "image too small: 12x9 (minimum 32 px per side)" in bad_reason(
        save(Image.new("RGB", (12, 9)), "PNG"), min_side=32
    )
    assert decode_image(save(Image.new("RGB", (32, 32)), "PNG"), min_side=32).shape == (32, 32, 3)


# ----------------------------------------------------------------------------------------------------
# Bad inputs
# ----------------------------------------------------------------------------------------------------


def test_garbage_inputs() -> None:
    assert bad_reason(b"") == "zero-byte file"
    assert bad_reason(b"", mask=True) == "zero-byte file"
    random_bytes = np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    assert bad_reason(random_bytes).startswith("not an image (unrecognised format")
    text = bad_reason(b"version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 12345\n")
    assert text.startswith("not an image (unrecognised format") and "git-lfs" in text
    html = bad_reason(b"<?xml version='1.0'?><Error><Code>NoSuchKey</Code></Error>", mask=True)
    assert "looks like text" in html


def test_truncated_files() -> None:
    jpeg = save(quadrants(64, 48), "JPEG", quality=95)
    assert bad_reason(jpeg[: len(jpeg) // 2]).startswith("truncated or corrupt image:")
    png_bytes = save(Image.fromarray(np.random.default_rng(1).integers(0, 256, (48, 64, 3), np.uint8)), "PNG")
    assert bad_reason(png_bytes[: len(png_bytes) // 2]).startswith("truncated or corrupt image:")
    assert bad_reason(png_bytes[: len(png_bytes) // 2], mask=True).startswith("label mask has 3 channels")
    grey_png = save(Image.fromarray(np.random.default_rng(2).integers(0, 12, (48, 64), np.uint8)), "PNG")
    assert bad_reason(grey_png[: len(grey_png) // 2], mask=True).startswith("truncated or corrupt image:")
    ok, buf = cv2.imencode(".png", np.random.default_rng(3).integers(0, 65536, (48, 64, 3), dtype=np.uint16))
    assert ok
    assert bad_reason(buf.tobytes()[: len(buf) // 2]).startswith("truncated or corrupt image:")
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_decompression_bomb_is_refused_from_the_header() -> None:
    bomb = bomb_png(14_000)  # 196 M px of zeros: ~25 kB on disk, 196 MB in Pillow, 588 MB as RGB
    assert len(bomb) < 100_000
    before_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    reason = bad_reason(bomb)
    assert time.perf_counter() - start < 0.5
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before_rss < 50_000  # kB: nothing decoded
    assert reason == "decompression bomb: 14000x14000 = 196,000,000 px exceeds the 178,956,970 px limit"
    assert bad_reason(bomb, mask=True).startswith("decompression bomb: 14000x14000")
    assert (
        bad_reason(patched_size_png(30_000, 30_000))
        == "decompression bomb: 30000x30000 = 900,000,000 px exceeds the 178,956,970 px limit"
    )
    # a bigger max_pixels cannot lift Pillow's own limit, and the reason says whose limit it was
    assert "(Pillow's" in bad_reason(patched_size_png(30_000, 30_000), max_pixels=10**9)


def test_jpeg_bomb_header() -> None:
    data = bytearray(save(Image.new("RGB", (16, 16)), "JPEG"))
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", 20_000, 25_000)  # height, width
    reason = bad_reason(bytes(data))
    assert reason == "decompression bomb: 25000x20000 = 500,000,000 px exceeds the 178,956,970 px limit"


def test_own_pixel_limit_is_checked_before_decoding() -> None:
    limit_before = Image.MAX_IMAGE_PIXELS
    assert limit_before is not None
    claimed = patched_size_png(12_000, 10_000)  # 120 M px: Pillow itself would only warn
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no DecompressionBombWarning may escape
        reason = bad_reason(claimed, max_pixels=100_000_000)
        assert reason == "decompression bomb: 12000x10000 = 120,000,000 px exceeds the 100,000,000 px limit"
        small = save(Image.new("RGB", (40, 30)), "PNG")
        assert "40x30 = 1,200 px exceeds the 1,000 px limit" in bad_reason(small, max_pixels=1000)
        assert "1,000 px limit" in bad_reason(small, mask=True, max_pixels=1000)
    assert limit_before == Image.MAX_IMAGE_PIXELS
    assert 2 * limit_before == DEFAULT_MAX_PIXELS


def test_unsupported_format_bytes_is_bad_input_not_crash() -> None:
    heic_like = b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + b"\x00" * 64
    assert "HEIF" in bad_reason(heic_like)


# ----------------------------------------------------------------------------------------------------
# Label masks
# ----------------------------------------------------------------------------------------------------


def test_mask_modes() -> None:
    ids = np.array([[0, 1, 2], [11, 3, 255]], np.uint8)
    grey = decode_label_mask(save(Image.fromarray(ids), "PNG"))
    assert grey.dtype == np.uint8 and np.array_equal(grey, ids)

    pal = Image.fromarray(ids, mode="L").convert("P")
    pal.putpalette([(i * 37) % 256 for i in range(768)])  # colours unrelated to the ids
    out = decode_label_mask(save(pal, "PNG", transparency=0))
    assert out.dtype == np.uint8 and np.array_equal(out, ids)  # palette indices, not colours

    wide = np.array([[0, 300], [1000, 65535]], np.uint16)
    out16 = decode_label_mask(save(Image.fromarray(wide), "PNG"))
    assert out16.dtype == np.uint16 and np.array_equal(out16, wide)

    as_int = Image.fromarray(wide.astype(np.int32))
    assert np.array_equal(decode_label_mask(save(as_int, "TIFF")), wide)
    assert np.array_equal(decode_label_mask(save(Image.fromarray(ids), "TIFF")), ids)


def test_mask_rejections() -> None:
    ids = Image.fromarray(np.zeros((8, 8), np.uint8))
    jpeg = save(ids, "JPEG")
    reason = bad_reason(jpeg, mask=True)
    assert reason.startswith("label masks must be lossless (PNG/TIFF); JPEG would corrupt class ids")
    assert "the .png file holds JPEG data" in bad_reason(jpeg, mask=True, name="labels/x.png")
    assert "lossy WebP" in bad_reason(save(ids, "WEBP", quality=80), mask=True)
    rgb = bad_reason(save(Image.new("RGB", (8, 8)), "PNG"), mask=True)
    assert rgb.startswith("label mask has 3 channels") and "single-channel class ids" in rgb
    assert "4 channels" in bad_reason(save(Image.new("RGBA", (8, 8)), "PNG"), mask=True)
    assert "alpha channel" in bad_reason(save(Image.new("LA", (8, 8)), "PNG"), mask=True)
    floats = save(Image.fromarray(np.zeros((4, 4), np.float32)), "TIFF")
    assert "unsupported label mask mode F" in bad_reason(floats, mask=True)


# ----------------------------------------------------------------------------------------------------
# Side by side
# ----------------------------------------------------------------------------------------------------


def test_split_side_by_side() -> None:
    ab = np.zeros((4, 10, 3), np.uint8)
    ab[:, 5:] = 200
    a, b = split_side_by_side(ab)
    assert a.shape == b.shape == (4, 5, 3) and (a == 0).all() and (b == 200).all()
    assert a.flags.c_contiguous and b.flags.c_contiguous
    with pytest.raises(
        BadInput, match="side-by-side image has odd width 511: cannot split into equal halves"
    ):
        split_side_by_side(np.zeros((256, 511, 3), np.uint8))


# ----------------------------------------------------------------------------------------------------
# Resize policies
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(100, 160), (160, 100), (100, 160, 3), (300, 40, 3), (50, 50)])
@pytest.mark.parametrize("mode", ["resize", "pad", "crop"])
def test_resize_shapes(shape: tuple[int, ...], mode: str) -> None:
    img = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    policy = ResizePolicy(mode, 64)  # type: ignore[arg-type]
    out = apply_resize(img, policy)
    assert out.shape == (64, 64, *shape[2:]) and out.dtype == np.uint8 and out.flags.c_contiguous
    assert policy.output_shape(*shape[:2]) == (64, 64)
    up = apply_resize(img, ResizePolicy(mode, 512))  # type: ignore[arg-type]
    assert up.shape == (512, 512, *shape[2:])


def test_shrink_is_an_area_average(camvid_dir: Path) -> None:
    photo = cv2.imread(str(camvid_dir / "train" / "images" / f"{CAMVID_KEY}.jpg"))
    area = cv2.resize(photo, (256, 256), interpolation=cv2.INTER_AREA)
    out = apply_resize(photo, ResizePolicy("resize", 256))  # 480x360 -> 256: a shrink by less than 2
    assert out.shape == area.shape
    assert np.abs(out.astype(int) - area).mean() < 1.5  # grey levels, as close as two area averages get
    flat = np.full((360, 480, 3), 77, np.uint8)
    assert (apply_resize(flat, ResizePolicy("resize", 256)) == 77).all()  # no ringing, no shift
    halves = apply_resize(photo[:, :360], ResizePolicy("resize", 180))  # integer factor: OpenCV's own
    assert np.array_equal(halves, cv2.resize(photo[:, :360], (180, 180), interpolation=cv2.INTER_AREA))


def test_native_crops_to_multiple() -> None:
    img = np.arange(37 * 70, dtype=np.int64).reshape(37, 70) % 251
    policy = ResizePolicy("native", multiple=16)
    out = apply_resize(img.astype(np.uint8), policy)
    assert out.shape == (32, 64) == policy.output_shape(37, 70)
    assert np.array_equal(out, img[2:34, 3:67].astype(np.uint8))  # centred
    assert apply_resize(img.astype(np.uint8), ResizePolicy("native")).shape == (37, 70)
    with pytest.raises(BadInput, match="image too small"):
        apply_resize(np.zeros((10, 40), np.uint8), policy)


def test_pad_keeps_aspect_and_pad_colour() -> None:
    img = np.zeros((50, 100, 3), np.uint8)
    out = apply_resize(img, ResizePolicy("pad", 64))
    assert (out[:16] == 255).all() and (out[48:] == 255).all() and (out[16:48] == 0).all()
    out = apply_resize(img, ResizePolicy("pad", 64), pad_value=(1, 2, 3))
    assert tuple(out[0, 0]) == (1, 2, 3)
    ids = np.ones((100, 50), np.uint16)
    out = apply_resize(ids, ResizePolicy("pad", 64), nearest=True, pad_value=255)
    assert out.dtype == np.uint16 and set(np.unique(out).tolist()) == {1, 255}
    assert (out[:, :16] == 255).all() and (out[:, 48:] == 255).all() and (out[:, 16:48] == 1).all()
    with pytest.raises(ValueError, match="pad_value"):
        apply_resize(ids, ResizePolicy("pad", 64), pad_value=(1, 2, 3))


@pytest.mark.parametrize("mode", ["resize", "pad", "crop"])
def test_nearest_keeps_only_present_ids(mode: str) -> None:
    ids = np.random.default_rng(5).choice(np.array([0, 3, 7, 11], np.uint8), size=(90, 130))
    for size in (32, 300):
        out = apply_resize(ids, ResizePolicy(mode, size), nearest=True, pad_value=11)  # type: ignore[arg-type]
        assert set(np.unique(out).tolist()) <= {0, 3, 7, 11}
    smooth = apply_resize(ids, ResizePolicy(mode, 32))  # type: ignore[arg-type]
    assert not set(np.unique(smooth).tolist()) <= {0, 3, 7, 11}  # interpolation invents ids: hence nearest


@pytest.mark.parametrize("mode", ["resize", "pad", "crop", "native"])
def test_a_and_b_stay_aligned(mode: str) -> None:
    h, w = 120, 200
    photo = np.zeros((h, w, 3), np.uint8)
    photo[40:80, 120:160] = 255
    labels = np.zeros((h, w), np.uint8)
    labels[40:80, 120:160] = 5
    policy = ResizePolicy(mode, 64, multiple=8)  # type: ignore[arg-type]
    a = apply_resize(photo, policy, pad_value=0)
    b = apply_resize(labels, policy, nearest=True, pad_value=0)
    assert a.shape[:2] == b.shape[:2]
    white = a[..., 0] > 127
    square = b == 5
    assert square.sum() > 0
    assert (white != square).mean() < 0.01  # only boundary pixels may differ


def test_resize_policy_validation() -> None:
    with pytest.raises(ValueError, match="resize mode"):
        ResizePolicy("stretch")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="not a multiple"):
        ResizePolicy("resize", 250, 16)
    with pytest.raises(ValueError, match="positive"):
        ResizePolicy("pad", 0)
    assert ResizePolicy("native", 250, 16).multiple == 16  # size unused in native mode


# ----------------------------------------------------------------------------------------------------
# Encoding
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(37, 53), (37, 53, 3)])
def test_png_round_trip_is_exact(shape: tuple[int, ...]) -> None:
    img = np.random.default_rng(7).integers(0, 256, shape, dtype=np.uint8)
    data = encode_image(img, "png")
    assert data.startswith(b"\x89PNG")
    decoded = decode_image(data)
    expected = img if img.ndim == 3 else np.repeat(img[..., None], 3, axis=2)
    assert np.array_equal(decoded, expected)  # RGB order preserved
    if img.ndim == 2:
        assert np.array_equal(decode_label_mask(data), img)


def test_png_uint16_ids_round_trip() -> None:
    ids = np.array([[0, 300], [1000, 65535]], np.uint16)
    assert np.array_equal(decode_label_mask(encode_image(ids, "png")), ids)


@pytest.mark.parametrize("fmt", ["jpg", "webp"])
def test_lossy_encodings_decode_close(fmt: str) -> None:
    img = np.asarray(quadrants(64, 48))
    data = encode_image(img, fmt, quality=95)  # type: ignore[arg-type]
    decoded = decode_image(data)
    assert decoded.shape == img.shape
    assert np.abs(decoded[4, 4].astype(int) - (255, 0, 0)).max() < 20  # red stays red: RGB not BGR
    assert np.abs(decoded.astype(int) - img).mean() < 8


def test_bilevel_png_round_trips_edges_and_refuses_other_images() -> None:
    edges = np.where(np.random.default_rng(0).random((37, 53)) < 0.1, 0, 255).astype(np.uint8)
    data = encode_image(edges, "png", bilevel=True)
    assert data[24:26] == bytes([1, 0])  # IHDR: bit depth 1, greyscale
    assert len(data) < len(encode_image(edges, "png"))
    assert np.array_equal(cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED), edges)
    assert np.array_equal(decode_image(data)[..., 0], edges)
    for bad, fmt in ((edges, "jpg"), (np.dstack([edges] * 3), "png"), (edges.astype(np.uint16), "png")):
        with pytest.raises(ValueError, match="bilevel"):
            encode_image(bad, fmt, bilevel=True)  # type: ignore[arg-type]


def test_encode_rejects_bad_arrays() -> None:
    with pytest.raises(ValueError, match="unknown image format"):
        encode_image(np.zeros((4, 4), np.uint8), "gif")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="uint8"):
        encode_image(np.zeros((4, 4), np.float32), "png")
    with pytest.raises(ValueError, match="uint8"):
        encode_image(np.zeros((4, 4), np.uint16), "jpg")
    with pytest.raises(ValueError, match="HxWx3"):
        encode_image(np.zeros((4, 4, 2), np.uint8), "png")


def test_module_leaves_pillow_globals_alone() -> None:
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    assert Image.MAX_IMAGE_PIXELS == 89_478_485  # Pillow's default, untouched by pipelines.images
