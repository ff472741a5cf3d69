"""trainer.dataset.images against a malformed corpus built in code (reliability plan points 12 and 13)."""

from __future__ import annotations

import functools
import io
import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from trainer.dataset import images
from trainer.errors import UserError
from trainer.dataset.images import alpha_mask, load_image, load_mask

REPO = Path(__file__).resolve().parents[1]
# Pillow warns about the corrupt EXIF it is fed here, as it should; load_image carries on regardless.
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning:PIL.TiffImagePlugin")


# --- building files -----------------------------------------------------------------------------------------


def encode(image: Image.Image, fmt: str, **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


def png_chunk(tag: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body))


def raw_png(width: int, height: int, bit_depth: int, colour_type: int, rows, extra: bytes = b"") -> bytes:
    """A PNG from an iterable of raw scanlines (filter byte included), compressed as it streams."""
    squeeze = zlib.compressobj(9)
    idat = b"".join(squeeze.compress(row) for row in rows) + squeeze.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + extra + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")
    )


def bomb_png(width: int, height: int, colour_type: int = 0, bit_depth: int = 1) -> bytes:
    """A valid all-black PNG of the given size that is tiny on disk (zeros compress ~1000:1)."""
    channels = {0: 1, 2: 3}[colour_type]
    row = bytes(1 + (width * channels * bit_depth + 7) // 8)
    return raw_png(width, height, bit_depth, colour_type, (row for _ in range(height)))


def webp_canvas_bomb(side: int) -> bytes:
    """An animated WEBP whose canvas is side x side but whose only frame is 1x1 (libwebp allocates the canvas)."""

    def chunk(tag: bytes, body: bytes) -> bytes:
        return tag + struct.pack("<I", len(body)) + body + (b"\x00" if len(body) % 2 else b"")

    tiny = encode(Image.new("RGB", (1, 1)), "WEBP", lossless=True)
    start = tiny.index(b"VP8L")
    length = struct.unpack("<I", tiny[start + 4 : start + 8])[0]
    frame = tiny[start : start + 8 + length + length % 2]
    vp8x = bytes([0x02, 0, 0, 0]) + (side - 1).to_bytes(3, "little") * 2
    anmf = bytes(12) + (100).to_bytes(3, "little") + b"\x00" + frame
    body = b"WEBP" + chunk(b"VP8X", vp8x) + chunk(b"ANIM", bytes(6)) + chunk(b"ANMF", anmf)
    return b"RIFF" + struct.pack("<I", len(body)) + body


def gradient(size=(96, 64), mode="RGB") -> Image.Image:
    width, height = size
    x = np.linspace(0, 255, width, dtype=np.float32)[None, :].repeat(height, 0)
    y = np.linspace(0, 255, height, dtype=np.float32)[:, None].repeat(width, 1)
    rgb = np.stack([x, y, 255 - x], -1).astype(np.uint8)
    return Image.fromarray(rgb, "RGB").convert(mode)


def exif_jpeg(exif: bytes) -> bytes:
    return encode(gradient(), "JPEG", exif=exif)


def tiff_ifd(entries: list[tuple[int, int, int, bytes]], offset: int = 8) -> bytes:
    """A little-endian TIFF header with one IFD: (tag, type, count, 4-byte value/offset) entries."""
    ifd = struct.pack("<H", len(entries))
    for tag, kind, count, value in entries:
        ifd += struct.pack("<HHI", tag, kind, count) + value
    return b"II*\x00" + struct.pack("<I", offset) + ifd + b"\x00\x00\x00\x00"


def too_big_text_png(chunk: str) -> bytes:
    payload = zlib.compress(b"A" * (20 * 2**20), 9)  # 20 MiB of text in ~20 kB
    if chunk == "zTXt":
        extra = png_chunk(b"zTXt", b"Comment\x00\x00" + payload)
    else:
        extra = png_chunk(b"iTXt", b"Comment\x00\x01\x00en\x00\x00" + payload)
    small = encode(gradient(), "PNG")
    return small[:33] + extra + small[33:]  # right after IHDR


def load_error(source, **kwargs) -> str:
    with pytest.raises(UserError) as caught:
        load_image(source, **kwargs)
    message = str(caught.value)
    assert message.endswith(".") and "\n" not in message
    return message


# --- refused, each with a useful sentence -------------------------------------------------------------------

REFUSED = {
    "truncated JPEG": (lambda: encode(gradient((256, 256)), "JPEG", quality=95)[:1500], ["JPEG", "damaged"]),
    "truncated PNG": (lambda: encode(gradient((256, 256)), "PNG")[:-300], ["PNG", "damaged"]),
    "zTXt bomb": (lambda: too_big_text_png("zTXt"), ["oversized text"]),
    "iTXt bomb": (lambda: too_big_text_png("iTXt"), ["oversized text"]),
    "animated WEBP": (
        lambda: encode(gradient(), "WEBP", save_all=True, append_images=[gradient(mode="L").convert("RGB")]),
        ["animated", "2 frames"],
    ),
    "animated PNG": (
        lambda: encode(gradient(), "PNG", save_all=True, append_images=[Image.new("RGB", (96, 64))] * 2),
        ["animated", "3 frames"],
    ),
    "animated GIF": (
        lambda: encode(gradient(), "GIF", save_all=True, append_images=[Image.new("RGB", (96, 64))]),
        ["GIF file", "PNG or JPEG"],
    ),
    "still GIF": (lambda: encode(gradient(), "GIF"), ["GIF file"]),
    "BMP": (lambda: encode(gradient(), "BMP"), ["BMP file"]),
    "TIFF": (lambda: encode(gradient(), "TIFF"), ["TIFF"]),
    "1x1 PNG": (lambda: encode(Image.new("RGB", (1, 1), "red"), "PNG"), ["1x1", "at least 64"]),
    "1x1 WEBP": (lambda: encode(Image.new("RGB", (1, 1), "red"), "WEBP"), ["1x1", "at least 64"]),
    "thin JPEG": (lambda: encode(Image.new("RGB", (2000, 40)), "JPEG"), ["2000x40", "at least 64"]),
    "0 bytes": (lambda: b"", ["empty"]),
    "SVG": (
        lambda: b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg" width="512" height="512">'
        b'<rect width="512" height="512"/></svg>',
        ["SVG file"],
    ),
    "PDF": (lambda: b"%PDF-1.7\n1 0 obj << /Type /Catalog >> endobj\ntrailer << >>\n%%EOF\n", ["PDF file"]),
    "PSD": (lambda: b"8BPS\x00\x01" + bytes(6) + b"\x00\x03\x00\x00\x02\x00\x00\x00\x02\x00" + bytes(64), ["PSD"]),
    "HEIC": (lambda: b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + bytes(64), ["HEIC file"]),
    "HTML": (lambda: b"<!DOCTYPE html><html><body>403 Forbidden</body></html>", ["web page"]),
    "text": (lambda: b"hello, this is not a picture at all" * 10, ["not a PNG, JPEG or WEBP"]),
    "PNG signature only": (lambda: b"\x89PNG\r\n\x1a\n", ["PNG", "damaged"]),
    "fully transparent": (lambda: encode(Image.new("RGBA", (96, 64), (255, 0, 0, 0)), "PNG"), ["transparent"]),
    "12000x12000 PNG": (lambda: bomb_png(12000, 12000), ["12000x12000", "144 megapixels", "scale it down"]),
    "30000x30000 PNG": (lambda: bomb_png(30000, 30000), ["30000x30000", "megapixels"]),
    "WEBP canvas 16383x16383": (lambda: webp_canvas_bomb(16383), ["16383x16383", "megapixels"]),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_refused_with_message(case, tmp_path):
    build, needles = REFUSED[case]
    path = tmp_path / "upload.png"  # everything is renamed .png: the contents decide
    path.write_bytes(build())
    message = load_error(path)
    assert message.startswith("The image "), message
    for needle in needles:
        assert needle in message, message


def test_what_names_the_picture():
    message = load_error(REFUSED["PDF"][0](), what="mask")
    assert message.startswith("The mask is a PDF file, not a PNG, JPEG or WEBP image;"), message


def test_jpeg_claiming_a_huge_size_is_refused():
    data = bytearray(encode(gradient((64, 64)), "JPEG"))
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", 60000, 60000)  # height, width in the frame header
    message = load_error(bytes(data))
    assert "megapixels" in message, message


def test_pixel_cap_is_ours_not_pillows(monkeypatch):
    """Below Pillow's own ~89 Mpx warning, our cap still refuses before decoding."""
    data = bomb_png(9000, 9000, colour_type=2, bit_depth=8)  # 81 Mpx
    message = load_error(data)
    assert "9000x9000" in message and "64 megapixels" in message, message
    monkeypatch.setattr(images, "MAX_PIXELS", 90 * 10**6)
    assert images.load_image(encode(gradient(), "PNG")).size == (96, 64)  # the patched cap is the one read


def test_file_size_cap(tmp_path, monkeypatch):
    big = tmp_path / "big.png"
    with open(big, "wb") as handle:  # sparse: refused from its size alone, never read
        handle.truncate(images.MAX_FILE_BYTES + 1)
    assert "over the 50 MB limit" in load_error(big)
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    data = encode(noise, "PNG")
    monkeypatch.setattr(images, "MAX_FILE_BYTES", len(data) - 1)
    assert "limit" in load_error(data)


def test_paths_that_are_not_files(tmp_path):
    assert "does not exist" in load_error(tmp_path / "missing.png")
    assert "is not a file" in load_error(tmp_path)


# --- decompression bombs: refused without the memory to decode them ----------------------------------------

_MEMORY_PROBE = r"""
import json, resource, sys
from PIL import Image
from trainer.errors import UserError
from trainer.dataset.images import load_image

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return 0

load_image(sys.argv[1] + ".warmup")  # plugins imported, arenas set up
# VmHWM, not ru_maxrss: Linux carries ru_maxrss over fork+exec, so a probe started from a large pytest process
# would start at that process's peak and never see its own growth.
rss, virt = status("VmHWM"), status("VmPeak")
if sys.argv[2] == "pillow":  # the control: what decoding the same file costs
    Image.MAX_IMAGE_PIXELS = None
    Image.open(sys.argv[1]).load()
    outcome = "decoded"
else:
    try:
        load_image(sys.argv[1])
        outcome = "decoded"
    except UserError as err:
        outcome = str(err)
print(json.dumps({"outcome": outcome,
                  "rss": status("VmHWM") - rss,
                  "virt": status("VmPeak") - virt}))
"""


def memory_probe(tmp_path: Path, data: bytes, how: str = "ours") -> dict:
    path = tmp_path / "bomb.png"
    path.write_bytes(data)
    (tmp_path / "bomb.png.warmup").write_bytes(encode(gradient(), "PNG"))
    result = subprocess.run(
        [sys.executable, "-c", _MEMORY_PROBE, str(path), how],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
@pytest.mark.parametrize(
    "build",
    [
        lambda: bomb_png(30000, 30000),  # 900 Mpx: past Pillow's own error threshold
        lambda: bomb_png(12000, 12000, bit_depth=8),  # 144 Mpx: Pillow only warns
        lambda: bomb_png(9000, 9000, colour_type=2, bit_depth=8),  # 81 Mpx RGB: only our cap stops it
        lambda: webp_canvas_bomb(16383),  # libwebp would reserve 2 x 1 GiB on open
    ],
    ids=["30000x30000", "12000x12000", "9000x9000-rgb", "webp-canvas"],
)
def test_bombs_leave_memory_alone(build, tmp_path):
    data = build()
    assert len(data) < 2 * 2**20
    measured = memory_probe(tmp_path, data)
    assert "megapixels" in measured["outcome"], measured
    assert measured["rss"] < 100 * 2**20, measured
    assert measured["virt"] < 200 * 2**20, measured


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_memory_probe_sees_a_decode(tmp_path):
    """The control for the test above: decoding the 81 Mpx RGB bomb does show up (243 MB)."""
    measured = memory_probe(tmp_path, bomb_png(9000, 9000, colour_type=2, bit_depth=8), how="pillow")
    assert measured["outcome"] == "decoded"
    assert measured["rss"] > 200 * 2**20, measured


# --- normalised: loaded, with the right mode and content ----------------------------------------------------


def test_rgb_png_and_jpeg_round_trip():
    source = gradient()
    from_png = load_image(encode(source, "PNG"))
    assert from_png.mode == "RGB" and np.array_equal(np.asarray(from_png), np.asarray(source))
    from_jpeg = load_image(encode(source, "JPEG", quality=98))
    assert from_jpeg.mode == "RGB" and from_jpeg.size == (96, 64)
    assert np.abs(np.asarray(from_jpeg, np.int16) - np.asarray(source, np.int16)).mean() < 3


def test_cmyk_jpeg_becomes_rgb():
    cmyk = Image.new("CMYK", (64, 64), (255, 0, 0, 0))  # pure cyan
    image = load_image(encode(cmyk, "JPEG", quality=95))
    assert image.mode == "RGB"
    assert np.allclose(np.asarray(image)[32, 32], (0, 255, 255), atol=6)


def test_16_bit_grey_png_is_scaled_not_clipped():
    levels = np.arange(256, dtype=np.uint32)
    grey16 = np.tile((levels * 257).astype(np.uint16), (64, 1))  # 0, 257, ..., 65535
    source = encode(Image.fromarray(grey16), "PNG")
    assert Image.open(io.BytesIO(source)).mode == "I;16"
    image = load_image(source)
    assert image.mode == "RGB"
    pixels = np.asarray(image)
    assert np.array_equal(pixels[10, :, 0], levels.astype(np.uint8))  # clipping would give 255 from level 1
    assert np.array_equal(pixels[..., 0], pixels[..., 2])


def test_16_bit_grey_png_with_transparent_colour():
    rows = [b"\x00" + struct.pack(">H", 0x1234) * 32 + struct.pack(">H", 0xFFFF) * 32 for _ in range(64)]
    data = raw_png(64, 64, 16, 0, rows, extra=png_chunk(b"tRNS", struct.pack(">H", 0x1234)))
    image = load_image(data)
    assert image.mode == "RGBA"
    pixels = np.asarray(image)
    assert (pixels[:, :32, 3] == 0).all() and (pixels[:, 32:, 3] == 255).all()
    assert (pixels[:, 32:, :3] == 255).all()


def test_16_bit_rgb_png():
    row = b"\x00" + struct.pack(">HHH", 200 * 257, 100 * 257, 10 * 257 + 200) * 64
    image = load_image(raw_png(64, 64, 16, 2, [row] * 64))
    assert image.mode == "RGB"
    assert tuple(np.asarray(image)[5, 5]) == (200, 100, 10)


def test_palette_png_with_transparency_becomes_rgba():
    palette_image = Image.new("P", (64, 64), 0)
    palette_image.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    palette_image.paste(1, (0, 0, 32, 64))
    image = load_image(encode(palette_image, "PNG", transparency=1))
    assert image.mode == "RGBA"
    pixels = np.asarray(image)
    assert (pixels[:, :32, 3] == 0).all()
    assert (pixels[:, 32:] == (255, 0, 0, 255)).all()


def test_palette_png_whose_transparent_entry_is_unused_is_rgb():
    palette_image = Image.new("P", (64, 64), 0)
    palette_image.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    image = load_image(encode(palette_image, "PNG", transparency=1))
    assert image.mode == "RGB" and image.getpixel((3, 3)) == (255, 0, 0)


def test_la_png_becomes_rgba():
    grey = np.tile(np.arange(64, dtype=np.uint8) * 4, (64, 1))
    alpha = np.full((64, 64), 255, np.uint8)
    alpha[:8] = 0
    source = Image.merge("LA", (Image.fromarray(grey), Image.fromarray(alpha)))
    image = load_image(encode(source, "PNG"))
    assert image.mode == "RGBA"
    pixels = np.asarray(image)
    assert np.array_equal(pixels[..., 0], grey) and np.array_equal(pixels[..., 3], alpha)


@pytest.mark.parametrize("mode", ["L", "1", "P"])
def test_grey_bilevel_and_palette_become_rgb(mode):
    source = gradient(mode=mode)
    image = load_image(encode(source, "PNG"))
    assert image.mode == "RGB"
    assert np.array_equal(np.asarray(image), np.asarray(source.convert("RGB")))


def test_opaque_rgba_becomes_rgb_and_transparent_stays_rgba():
    opaque = gradient(mode="RGBA")
    assert load_image(encode(opaque, "PNG")).mode == "RGB"
    cut_out = gradient(mode="RGBA")
    cut_out.putalpha(0)
    cut_out.paste((10, 20, 30, 255), (20, 10, 60, 50))
    image = load_image(encode(cut_out, "WEBP", lossless=True))
    assert image.mode == "RGBA" and image.getpixel((30, 20)) == (10, 20, 30, 255)
    assert image.getpixel((2, 2))[3] == 0


def test_exif_orientation_is_applied():
    source = Image.new("RGB", (128, 64), (255, 0, 0))
    source.paste((0, 0, 255), (64, 0, 128, 64))  # left red, right blue
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: display turned 90 degrees clockwise
    image = load_image(encode(source, "JPEG", exif=exif.tobytes(), quality=95))
    assert image.size == (64, 128)
    top, bottom = np.asarray(image)[10, 32], np.asarray(image)[118, 32]
    assert top[0] > 200 and top[2] < 50, top  # the left (red) half is now on top
    assert bottom[2] > 200 and bottom[0] < 50, bottom
    assert 0x0112 not in image.getexif()


@pytest.mark.parametrize(
    "exif",
    [
        b"Exif\x00\x00" + b"\xde\xad\xbe\xef" * 16,  # not TIFF at all
        b"Exif\x00\x00II*\x00\xff\xff\xff\x7f",  # IFD offset far past the end
        b"Exif\x00\x00" + tiff_ifd([(0x0112, 3, 1, struct.pack("<HH", 9, 0))]),  # orientation 9 (no such)
        b"Exif\x00\x00" + tiff_ifd([(0x0112, 2, 4, b"six\x00")]),  # orientation as text
        b"Exif\x00\x00" + tiff_ifd([(0x0112, 3, 1000, struct.pack("<I", 4000))]),  # values past the end
        b"Exif\x00\x00" + tiff_ifd([(0x8769, 4, 1, struct.pack("<I", 8))]),  # Exif IFD pointing at itself
        b"Exif\x00\x00MM\x00*",  # cut short
    ],
    ids=["garbage", "offset-past-end", "orientation-9", "orientation-text", "count-past-end", "loop", "short"],
)
def test_bad_exif_loads_unrotated(exif):
    image = load_image(exif_jpeg(exif))
    assert image.mode == "RGB" and image.size == (96, 64)


def test_mpo_uses_the_primary_picture():
    data = encode(Image.new("RGB", (64, 64), "red"), "MPO", save_all=True, append_images=[Image.new("RGB", (64, 64))])
    assert Image.open(io.BytesIO(data)).format == "MPO"
    image = load_image(data)
    assert image.mode == "RGB" and image.getpixel((32, 32))[0] > 240


def test_path_with_spaces_and_non_ascii(tmp_path):
    path = tmp_path / "mes images" / "chat été 猫.jpg"
    path.parent.mkdir()
    path.write_bytes(encode(gradient(), "JPEG"))
    assert load_image(path).size == (96, 64)
    assert load_image(str(path)).size == (96, 64)


def test_image_is_fully_loaded_and_detached():
    image = load_image(encode(gradient(), "PNG"))
    assert type(image) is Image.Image  # not a lazy ImageFile holding a file open


# --- masks ---------------------------------------------------------------------------------------------------


def test_grey_mask_is_luminance():
    mask_source = Image.new("L", (96, 64), 0)
    mask_source.paste(255, (20, 10, 60, 50))
    mask = load_mask(encode(mask_source, "PNG"), size=(96, 64))
    assert mask.mode == "L" and mask.size == (96, 64)
    assert np.array_equal(np.asarray(mask), np.asarray(mask_source))


def test_cut_out_with_alpha_is_read_from_alpha():
    cut_out = Image.new("RGBA", (96, 64), (255, 255, 255, 0))  # white but transparent background
    cut_out.paste((0, 0, 0, 255), (20, 10, 60, 50))  # a black but opaque subject
    mask = load_mask(encode(cut_out, "PNG"), size=(96, 64))
    assert mask.getpixel((30, 20)) == 255 and mask.getpixel((2, 2)) == 0


def test_mask_of_the_same_shape_is_resized():
    mask_source = Image.new("L", (192, 128), 0)
    mask_source.paste(255, (96, 0, 192, 128))
    mask = load_mask(encode(mask_source, "PNG"), size=(96, 64))
    assert mask.size == (96, 64) and mask.mode == "L"
    assert mask.getpixel((80, 32)) == 255 and mask.getpixel((10, 32)) == 0


def test_mask_of_another_shape_is_refused():
    with pytest.raises(UserError, match=r"mask is 128x128 pixels but the image is 192x96"):
        load_mask(encode(Image.new("L", (128, 128), 255), "PNG"), size=(192, 96))
    with pytest.raises(UserError, match="rotated"):
        load_mask(encode(Image.new("L", (96, 192), 255), "PNG"), size=(192, 96))


def test_black_mask_is_refused():
    with pytest.raises(UserError, match="completely black"):
        load_mask(encode(Image.new("L", (96, 64), 0), "JPEG"), size=(96, 64))


def test_mask_errors_say_mask():
    with pytest.raises(UserError, match=r"^The mask is a PDF file"):
        load_mask(REFUSED["PDF"][0](), size=(96, 64))


def test_alpha_mask():
    assert alpha_mask(gradient()) is None
    assert alpha_mask(gradient(mode="RGBA")) is None
    partly = gradient(mode="RGBA")
    partly.putpixel((0, 0), (0, 0, 0, 128))
    alpha = alpha_mask(partly)
    assert alpha is not None and alpha.mode == "L" and alpha.getpixel((0, 0)) == 128 and alpha.getpixel((5, 5)) == 255


# --- fuzzing: a picture or a UserError, nothing else ---------------------------------------------------------


@functools.cache
def seeds() -> tuple[bytes, ...]:
    picture = gradient((80, 72))
    cut_out = gradient((72, 80), mode="RGBA")
    cut_out.putpixel((1, 1), (0, 0, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 8
    return (
        encode(picture, "PNG"),
        encode(cut_out, "PNG"),
        encode(picture.convert("P"), "PNG", transparency=3),
        encode(picture, "JPEG", quality=80, exif=exif.tobytes()),
        encode(picture, "JPEG", progressive=True),
        encode(picture, "WEBP", quality=80),
        encode(cut_out, "WEBP", lossless=True),
    )


@st.composite
def mutated(draw) -> bytes:
    data = bytearray(draw(st.sampled_from(seeds())))
    for _ in range(draw(st.integers(1, 4))):
        # mostly near the start, where the headers are
        limit = draw(st.sampled_from([64, 256, len(data)]))
        at = draw(st.integers(0, max(0, min(limit, len(data)) - 1)))
        action = draw(st.sampled_from(["flip", "cut", "insert", "overwrite", "delete"]))
        if action == "flip":
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif action == "cut":
            del data[at:]
        elif action == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif action == "overwrite":
            chunk = draw(st.binary(min_size=1, max_size=8))
            data[at : at + len(chunk)] = chunk
        else:
            del data[at : at + draw(st.integers(1, 32))]
        if not data:
            break
    return bytes(data)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(st.binary(max_size=512), mutated()))
def test_fuzz_load_image(data):
    try:
        image = load_image(data)
    except UserError as err:
        assert str(err).startswith("The image ")
    else:
        assert image.mode in ("RGB", "RGBA")
        assert min(image.size) >= images.MIN_SIDE
        image.tobytes()  # the pixels are really there
