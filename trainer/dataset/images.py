"""The one way an image or a mask gets into the app: every upload and every CLI path goes through here.

The file is untrusted. Before any pixel is decoded we check the file size, the format (an allow-list: PNG,
JPEG, WEBP) and the pixel count (``MAX_PIXELS``, our own cap, well below Pillow's ~89 Mpx warning); only then
is the image decoded, turned upright (EXIF orientation) and normalised to mode "RGB" or "RGBA" (RGBA only when
some pixel is actually transparent). Anything wrong with the file is a ``UserError`` with one sentence saying
what is wrong and what to do; a bug in this module still raises its own exception.

Choices worth knowing:

* Animated PNG/WEBP files are refused (training on frame 1 of an animation would surprise people). A JPEG with
  extra pictures appended (MPO: phone depth maps, HDR gain maps, stereo pairs) is not an animation: its
  primary picture is used.
* 16-bit images are scaled to 8 bits (65535 -> 255), never clipped.
* Colour profiles are not applied (a CMYK JPEG gets Pillow's plain conversion; Display-P3 pixels are read as
  sRGB): applying them would hand every upload's ICC profile to a C colour engine for a small gain.
* Decoding is serialised by a lock: it bounds peak memory (one decode of at most ``MAX_PIXELS`` at a time) and
  keeps the process-wide ``warnings`` filter that makes Pillow's ``DecompressionBombWarning`` an error from
  being raced by our own threads.
"""

from __future__ import annotations

import io
import os
import re
import stat
import struct
import threading
import warnings

import numpy as np
from PIL import Image, ImageOps

from trainer.errors import UserError

ALLOWED_FORMATS = ("PNG", "JPEG", "WEBP")
MAX_FILE_BYTES = 50 * 1024 * 1024
# 64 Mpx: room for 48-61 Mpx phone and camera photos (8160x6144 is 50.1 Mpx); refuses anything Pillow itself
# would warn about (~89 Mpx) and both bombs of the reliability plan (12000x12000 and 30000x30000).
MAX_PIXELS = 64_000_000
MIN_SIDE = 64

_DECODE_LOCK = threading.Lock()
_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


def load_image(source: str | os.PathLike | bytes, *, what: str = "image") -> Image.Image:
    """Read, check and fully decode an image file (or its bytes); return it in mode "RGB" or "RGBA".

    ``what`` names the picture in messages ("The mask is a PDF file, ..."). RGBA is returned only when at least
    one pixel is not fully opaque (including palette and tRNS transparency). Raises ``UserError`` for every
    problem with the file itself; an animated image is refused, not reduced to its first frame.
    """
    data = _read_bytes(source, what)
    _check_header(data, what)
    with _DECODE_LOCK, warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        image = _decode(data, what)
    return image


def load_mask(source: str | os.PathLike | bytes, *, size: tuple[int, int]) -> Image.Image:
    """Load a mask for an image of ``size`` (width, height); return mode "L", white = trained, black = not.

    A mask with transparency is read from its alpha channel (a cut-out of the subject works as a mask);
    otherwise from its brightness. A mask of another size but the same shape (aspect ratio within 2%) is
    resized to ``size``; another shape, or an all-black mask, is a ``UserError``.
    """
    width, height = size
    if width <= 0 or height <= 0:
        raise ValueError(f"size must be positive, got {size!r}")
    image = load_image(source, what="mask")
    alpha = alpha_mask(image)
    mask = alpha if alpha is not None else image.convert("L")
    if mask.size != (width, height):
        mask_w, mask_h = mask.size
        ratio, wanted = mask_w / mask_h, width / height
        if abs(ratio - wanted) / wanted > 0.02:
            rotated = abs(mask_h / mask_w - wanted) / wanted <= 0.02
            hint = " (it looks rotated by 90 degrees)" if rotated else ""
            raise UserError(
                f"The mask is {mask_w}x{mask_h} pixels but the image is {width}x{height}{hint}; "
                "the mask must have the image's shape, so make it from the same picture."
            )
        shrinking = mask_w * mask_h > width * height
        resample = Image.Resampling.LANCZOS if shrinking else Image.Resampling.BILINEAR
        mask = mask.resize((width, height), resample)
    if mask.getextrema()[1] < 8:
        raise UserError(
            "The mask is completely black, so nothing would be trained; paint the subject white and the rest black."
        )
    return mask


def alpha_mask(image: Image.Image) -> Image.Image | None:
    """The alpha channel (mode "L") of an image with transparency, or None when every pixel is opaque."""
    if "A" not in image.getbands():
        if not image.has_transparency_data:
            return None
        image = image.convert("RGBA")
    alpha = image.getchannel("A")
    if alpha.getextrema()[0] == 255:
        return None
    return alpha


# --- reading the bytes -------------------------------------------------------------------------------------


def _read_bytes(source: str | os.PathLike | bytes, what: str) -> bytes:
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        _check_file_size(len(data), what)
        return data
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"load_image takes a path or bytes, not {type(source).__name__}")
    path = os.fspath(source)
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise UserError(f"The {what} file {path} does not exist; check the path.") from None
    except OSError as err:
        raise UserError(f"The {what} file {path} cannot be read ({err.strerror}); check the path.") from None
    if not stat.S_ISREG(info.st_mode):
        raise UserError(f"The {what} path {path} is not a file; give the path of a PNG, JPEG or WEBP image.")
    _check_file_size(info.st_size, what)
    try:
        with open(path, "rb") as handle:
            data = handle.read(MAX_FILE_BYTES + 1)  # the file may have grown since stat
    except OSError as err:
        raise UserError(f"The {what} file {path} cannot be read ({err.strerror}); check the path.") from None
    _check_file_size(len(data), what)
    return data


def _check_file_size(n_bytes: int, what: str) -> None:
    if n_bytes == 0:
        raise UserError(f"The {what} file is empty (0 bytes); upload the picture again.")
    if n_bytes > MAX_FILE_BYTES:
        raise UserError(
            f"The {what} file is {n_bytes / 2**20:.0f} MB, over the {MAX_FILE_BYTES // 2**20} MB limit; "
            "save it as a JPEG or scale it down, and upload it again."
        )


# --- before decoding: what is it, and how big? --------------------------------------------------------------

_OTHER_FORMATS = (  # (test on the first bytes, what the file is)
    (lambda d: d.startswith(b"%PDF"), "a PDF"),
    (lambda d: d.startswith(b"8BPS"), "a Photoshop (PSD)"),
    (lambda d: d.startswith((b"GIF87a", b"GIF89a")), "a GIF"),
    (lambda d: d.startswith(b"BM"), "a BMP"),
    (lambda d: d.startswith((b"II*\x00", b"MM\x00*")), "a TIFF (or camera RAW)"),
    (lambda d: d[4:8] == b"ftyp" and d[8:12] in (b"avif", b"avis"), "an AVIF"),
    (lambda d: d[4:8] == b"ftyp" and d[8:12] in (b"heic", b"heix", b"heim", b"heis", b"mif1", b"msf1"), "a HEIC"),
    (lambda d: d[4:8] == b"ftyp", "a video (MP4/MOV)"),
    (lambda d: d.startswith((b"\xff\x0a", b"\x00\x00\x00\x0cJXL ")), "a JPEG XL"),
    (lambda d: d.startswith(b"PK\x03\x04"), "a ZIP"),
    (lambda d: d.startswith(b"\x00\x00\x01\x00"), "an icon (ICO)"),
    (lambda d: b"<svg" in d[:4096].lower(), "an SVG"),
    (lambda d: d.lstrip()[:15].lower().startswith((b"<!doctype html", b"<html")), "a web page (HTML)"),
)


def _allowed_kind(data: bytes) -> str | None:
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if data.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return None


def _check_header(data: bytes, what: str) -> None:
    """Refuse other formats by name, and PNG/WEBP sizes over the cap before Pillow sees the file.

    Pillow opens lazily, but libwebp allocates a WEBP's whole canvas (twice) as soon as it is opened.
    """
    if _allowed_kind(data) is None:
        head = data[:4096].lstrip(b"\xef\xbb\xbf \t\r\n")
        for test, name in _OTHER_FORMATS:
            if test(head):
                raise UserError(
                    f"The {what} is {name} file, not a PNG, JPEG or WEBP image; "
                    "export it as PNG or JPEG and upload that."
                )
        raise UserError(
            f"The {what} is not a PNG, JPEG or WEBP image (its contents match no picture format this app reads); "
            "export it as PNG or JPEG and upload that."
        )
    kind = _allowed_kind(data)
    size = _webp_size(data) if kind == "WEBP" else _png_size(data) if kind == "PNG" else None
    if size is not None:
        _check_pixels(size, what)


def _png_size(data: bytes) -> tuple[int, int] | None:
    """Size from a PNG's IHDR chunk (always the first), or None if it is not there."""
    if data[12:16] != b"IHDR" or len(data) < 24:
        return None
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def _webp_size(data: bytes) -> tuple[int, int] | None:
    """Canvas size from a WEBP's first chunk (VP8X, VP8 or VP8L), or None if it cannot be read."""
    tag, body = data[12:16], data[20:40]
    try:
        if tag == b"VP8X" and len(body) >= 10:
            return 1 + int.from_bytes(body[4:7], "little"), 1 + int.from_bytes(body[7:10], "little")
        if tag == b"VP8 " and len(body) >= 10 and body[3:6] == b"\x9d\x01\x2a":
            width, height = struct.unpack("<HH", body[6:10])
            return width & 0x3FFF, height & 0x3FFF
        if tag == b"VP8L" and len(body) >= 5 and body[0] == 0x2F:
            bits = int.from_bytes(body[1:5], "little")
            return 1 + (bits & 0x3FFF), 1 + ((bits >> 14) & 0x3FFF)
    except struct.error:
        return None
    return None


def _check_pixels(size: tuple[int, int], what: str) -> None:
    width, height = size
    if width * height > MAX_PIXELS:
        raise UserError(
            f"The {what} is {width}x{height} pixels ({width * height / 1e6:.0f} megapixels), over this app's "
            f"limit of {MAX_PIXELS / 1e6:.0f} megapixels; scale it down (2048 pixels on the long side is plenty) "
            "and upload it again."
        )
    if min(width, height) < MIN_SIDE:
        raise UserError(
            f"The {what} is only {width}x{height} pixels; it must be at least {MIN_SIDE} pixels on each side "
            "(1024x1024 or larger trains best)."
        )


# --- decoding ----------------------------------------------------------------------------------------------


def _decode(data: bytes, what: str) -> Image.Image:
    kind = _allowed_kind(data)
    try:
        image = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise _too_many_pixels(err, what) from None
    except Image.UnidentifiedImageError:
        raise _damaged(kind, "its header cannot be read", what) from None
    except MemoryError:
        raise
    except Exception as err:  # any failure to parse an untrusted header is the file's fault
        raise _damaged(kind, err, what) from err

    _check_pixels(image.size, what)
    frames = getattr(image, "n_frames", 1)
    if frames > 1 and image.format != "MPO":
        raise UserError(f"The {what} is animated ({frames} frames); upload a single still picture instead.")

    try:
        image.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise _too_many_pixels(err, what) from None
    except MemoryError:
        raise
    except Exception as err:  # truncated data, bad compressed stream, oversized metadata, ...
        raise _damaged(kind, err, what) from err

    try:
        upright = ImageOps.exif_transpose(image)
    except Exception:  # unreadable EXIF: keep the picture as stored
        upright = image.copy()
    image = upright if upright is not None else image

    image = _normalise_mode(image, what)
    if image.mode == "RGBA" and image.getchannel("A").getextrema()[1] == 0:
        raise UserError(
            f"The {what} is completely transparent, so there is nothing in it to train on; "
            "export it again with the subject opaque."
        )
    return image


def _too_many_pixels(err: Exception, what: str) -> UserError:
    found = re.search(r"\((\d+) pixels\)", str(err))
    size = f" ({int(found.group(1)) / 1e6:.0f} megapixels)" if found else ""
    return UserError(
        f"The {what} has too many pixels{size}, over this app's limit of {MAX_PIXELS / 1e6:.0f} megapixels; "
        "scale it down (2048 pixels on the long side is plenty) and upload it again."
    )


def _damaged(kind: str | None, err: Exception | str, what: str) -> UserError:
    detail = str(err).strip() or type(err).__name__
    if "MAX_TEXT_" in detail:  # PngImagePlugin's caps on (compressed) text, ICC and other metadata chunks
        return UserError(
            f"The {what} carries an oversized text (metadata) chunk, which is refused as a possible "
            "decompression bomb; open it in an image editor and export it again as PNG or JPEG."
        )
    if len(detail) > 100:
        detail = detail[:97] + "..."
    return UserError(
        f"The {what} looks like a {kind or 'picture'} file but is damaged or incomplete ({detail}); "
        "export or download it again."
    )


def _normalise_mode(image: Image.Image, what: str) -> Image.Image:
    """Return the decoded picture as "RGB", or as "RGBA" when some pixel is not fully opaque."""
    if image.mode in _SIXTEEN_BIT_MODES or image.mode == "F":
        image = _to_eight_bit(image)
    try:
        if image.mode in ("RGBa", "La"):  # premultiplied alpha
            image = image.convert("RGBA" if image.mode == "RGBa" else "LA")
        if image.has_transparency_data:
            rgba = image.convert("RGBA")
            if rgba.getchannel("A").getextrema()[0] < 255:
                return rgba
            return rgba.convert("RGB")
        return image if image.mode == "RGB" else image.convert("RGB")
    except ValueError as err:  # a mode Pillow cannot convert
        raise UserError(
            f"The {what} uses a colour mode this app cannot convert ({image.mode}); "
            "export it again as an ordinary RGB PNG or JPEG."
        ) from err


def _to_eight_bit(image: Image.Image) -> Image.Image:
    """A 16-bit (or float) greyscale picture as "L" (or "LA" for tRNS), scaled rather than clipped."""
    values = np.asarray(image)
    if image.mode == "F":
        values = np.nan_to_num(values.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        scaled = values * 255.0 if values.max(initial=0.0) <= 1.0 else values
        grey = np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
    else:
        wide = np.clip(values.astype(np.int64), 0, 65535)
        grey = ((wide + 128) // 257).astype(np.uint8)
    result = Image.fromarray(grey, "L")
    transparent = image.info.get("transparency")
    if isinstance(transparent, int) and image.mode != "F":
        alpha = np.where(values == transparent, 0, 255).astype(np.uint8)
        result = Image.merge("LA", (result, Image.fromarray(alpha, "L")))
    return result
