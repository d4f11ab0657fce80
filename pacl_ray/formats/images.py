"""The one image decoder: encoded bytes -> an upright 8-bit RGB picture, as a person sees it.

Every place that decodes an image (ingest, partition scoring, embed, training, evaluation
datasets and feature extraction, the world builder) goes through :func:`decode_rgb`, so a picture
is the same picture in every stage:

* **EXIF orientation** (tag 0x0112, values 2-8, as phones write it) is applied, so a JPEG stored
  40x20 with Orientation 6 decodes 20x40, upright; width and height are the displayed ones.
* **Animated** GIF/PNG/WebP: the first frame.
* **Modes** (:func:`to_rgb`) are mapped to 8-bit RGB by *scaling*, never by clamping:

  ===============  ==========================================================================
  mode             8-bit value
  ===============  ==========================================================================
  ``I;16*``        ``v / 257`` (the full 16-bit range 0..65535 onto 0..255; signed: +32768 first)
  ``I`` (int32)    ``v / 257`` when every value is in 0..65535 (16-bit data, as TIFF/PGM and
                   older Pillow PNG decoders give it), else min-max over the image
  ``F`` (float32)  ``v * 255`` when every finite value is in [0, 1], else min-max over the image;
                   NaN/inf become 0
  ``1, L, P, CMYK, YCbCr, LAB, HSV, RGBX``  Pillow's conversion
  ``RGBA, LA, PA, RGBa, P`` with transparency  composited over white (a transparent pixel is
                   white, not black)
  ===============  ==========================================================================

  **Choice** (``I``/``F``): Pillow does not record the bit depth of 32-bit images; 16-bit data is
  by far the common source of ``I`` and [0, 1] of ``F``, and min-max keeps anything else visible.

Errors are :class:`ImageRejected` with a reason from :data:`pacl_ray.formats.tables.QUARANTINE_REASONS`
(missing_file, unreadable_file, zero_size_image, decompression_bomb, corrupt_image,
truncated_image), which ingest and the dataset readers quarantine.
"""

from __future__ import annotations

import io
import threading
import warnings
from dataclasses import dataclass
from typing import Optional

import numpy as np
import pyarrow.fs as pafs

from pacl_ray.formats import storage

ORIENTATION_TAG = 0x0112
ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa")


class ImageRejected(Exception):
    """An image cannot be used: ``reason`` from ``tables.QUARANTINE_REASONS`` and a ``detail``."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


@dataclass
class Decoded:
    """A decoded picture: ``image`` upright PIL RGB (uint8), displayed ``width``/``height``,
    the file's ``mode`` and ``format``, its EXIF ``orientation`` (1 = none) and frame count."""

    image: "object"
    width: int
    height: int
    mode: str
    format: Optional[str]
    orientation: int
    frames: int


def read_image_bytes(uri: str) -> bytes:
    """The bytes of an image file (local path or pyarrow URI).

    Raises :class:`ImageRejected` missing_file (no such file) or unreadable_file (bad URI,
    a directory, an I/O error).
    """
    try:
        fs, path = storage.resolve(uri)
        info = fs.get_file_info(path)
    except Exception as err:  # bad URI scheme, unreachable bucket, ...
        raise ImageRejected("unreadable_file", f"{uri}: {err}") from err
    if info.type == pafs.FileType.NotFound:
        raise ImageRejected("missing_file", f"{uri}: no such file")
    if info.type != pafs.FileType.File:
        raise ImageRejected("unreadable_file", f"{uri}: not a regular file ({info.type.name})")
    try:
        with fs.open_input_stream(path) as handle:
            return handle.read()
    except OSError as err:
        raise ImageRejected("unreadable_file", f"{uri}: {err}") from err


def _broken_reason(err: Exception) -> str:
    """Pillow reports a cut-off file as an OSError mentioning truncation; anything else is corrupt."""
    return "truncated_image" if isinstance(err, OSError) and "truncated" in str(err).lower() else "corrupt_image"


def _orientation(image) -> int:
    try:
        value = int(image.getexif().get(ORIENTATION_TAG, 1))
    except Exception:  # a broken EXIF block does not make the pixels unusable
        return 1
    return value if 1 <= value <= 8 else 1


def _scale_to_uint8(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Map [lo, hi] linearly onto 0..255 (rounded); a constant image maps to 0."""
    span = hi - lo
    if span <= 0:
        return np.zeros(values.shape, dtype=np.uint8)
    return np.clip(np.rint((values - lo) * (255.0 / span)), 0, 255).astype(np.uint8)


def _wide_to_l(image):
    """16-bit, 32-bit int and float images -> 8-bit L by scaling (see the module table)."""
    from PIL import Image

    values = np.asarray(image)
    if image.mode.startswith("I;16"):
        wide = values.astype(np.float64)
        if np.issubdtype(values.dtype, np.signedinteger):
            wide += 32768.0
        eight = _scale_to_uint8(wide, 0.0, 65535.0)
    elif image.mode == "I":
        wide = values.astype(np.float64)
        lo, hi = (float(wide.min()), float(wide.max())) if wide.size else (0.0, 0.0)
        eight = _scale_to_uint8(wide, 0.0, 65535.0) if lo >= 0 and hi <= 65535 else _scale_to_uint8(wide, lo, hi)
    else:  # "F"
        wide = values.astype(np.float64)
        finite = np.isfinite(wide)
        wide = np.where(finite, wide, 0.0)
        lo, hi = (float(wide[finite].min()), float(wide[finite].max())) if finite.any() else (0.0, 0.0)
        eight = _scale_to_uint8(wide, 0.0, 1.0) if lo >= 0 and hi <= 1 else _scale_to_uint8(wide, lo, hi)
    return Image.fromarray(eight, "L")


def to_rgb(image):
    """Any PIL image -> an 8-bit RGB PIL image by scaling, never clamping (see the module table)."""
    from PIL import Image

    if image.mode == "RGB":
        return image
    if image.mode.startswith("I;16") or image.mode in ("I", "F"):
        return _wide_to_l(image).convert("RGB")
    if image.mode in ALPHA_MODES or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


_PILLOW_GLOBALS = threading.Lock()  # Pillow's bomb limit and the warnings filters are process-wide


def _open(data: bytes, max_pixels: Optional[int]):
    """Open and fully load the first frame; every failure becomes :class:`ImageRejected`."""
    from PIL import Image, UnidentifiedImageError

    bomb_errors = (Image.DecompressionBombError, Image.DecompressionBombWarning)
    # Pillow checks the limit while reading the header: hold the process-wide settings only then,
    # so threads (the dataset readers validate in a pool) never see each other's limit.
    with _PILLOW_GLOBALS, warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        previous = Image.MAX_IMAGE_PIXELS
        if max_pixels is not None:
            Image.MAX_IMAGE_PIXELS = max_pixels if max_pixels > 0 else None
        try:
            image = Image.open(io.BytesIO(data))
        except bomb_errors as err:
            raise ImageRejected("decompression_bomb", str(err)) from err
        except UnidentifiedImageError as err:
            raise ImageRejected("corrupt_image", f"not a recognised image ({len(data)} bytes)") from err
        except Exception as err:  # e.g. OSError "Truncated File Read" inside the header
            raise ImageRejected(_broken_reason(err), f"{type(err).__name__}: {err}") from err
        finally:
            Image.MAX_IMAGE_PIXELS = previous
    width, height = image.size
    if width <= 0 or height <= 0:
        raise ImageRejected("zero_size_image", f"{width}x{height} pixels")
    try:
        image.seek(0)  # animated images: the first frame
        image.load()
    except bomb_errors as err:
        raise ImageRejected("decompression_bomb", str(err)) from err
    except Exception as err:  # Pillow raises OSError/SyntaxError/ValueError for broken streams
        raise ImageRejected(_broken_reason(err), f"{type(err).__name__}: {err}") from err
    return image


def decode(data: bytes, max_pixels: Optional[int] = None) -> Decoded:
    """Encoded image bytes -> :class:`Decoded` (upright RGB, first frame, scaled to 8 bits).

    ``max_pixels``: the decompression-bomb limit (Pillow's ``MAX_IMAGE_PIXELS``, which warns above
    it and raises above twice it; both count as a bomb here); 0 disables it, None keeps Pillow's.
    Raises :class:`ImageRejected` zero_size_image, decompression_bomb, corrupt_image or
    truncated_image.
    """
    if not data:
        raise ImageRejected("zero_size_image", "the file is empty (0 bytes)")
    image = _open(data, max_pixels)
    mode, fmt, frames = image.mode, image.format, int(getattr(image, "n_frames", 1) or 1)
    orientation = _orientation(image)
    try:
        rgb = to_rgb(image)
    except (ValueError, OSError) as err:  # a mode Pillow cannot convert
        raise ImageRejected("corrupt_image", f"cannot convert mode {mode} to RGB: {err}") from err
    if orientation != 1:
        rgb = _transpose(rgb, orientation)
    return Decoded(rgb, rgb.width, rgb.height, mode, fmt, orientation, frames)


def _transpose(image, orientation: int):
    """Apply an EXIF orientation value (2-8), as Pillow's ``ImageOps.exif_transpose`` does."""
    from PIL import Image

    method = {
        2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
        5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
        8: Image.Transpose.ROTATE_90,
    }[orientation]
    return image.transpose(method)


def decode_rgb(data: bytes, max_pixels: Optional[int] = None):
    """Encoded image bytes -> an upright 8-bit RGB PIL image (see :func:`decode`)."""
    return decode(data, max_pixels).image


def load_rgb(uri: str, max_pixels: Optional[int] = None):
    """An image file (local path or pyarrow URI) -> an upright 8-bit RGB PIL image.

    Raises :class:`ImageRejected` (the reason names the file) when it cannot be read or decoded.
    """
    data = read_image_bytes(uri)
    try:
        return decode(data, max_pixels).image
    except ImageRejected as err:
        raise ImageRejected(err.reason, f"{uri}: {err.detail}") from err


def normalize(data: bytes, max_pixels: Optional[int] = None) -> tuple[bytes, int, int, Optional[str]]:
    """Bytes to store for an image -> (bytes, displayed width, height, original mode or None).

    An upright, single-frame RGB file keeps its original bytes. Anything else (another mode, an
    EXIF orientation, an animation) is decoded with :func:`decode` and re-encoded (JPEG stays JPEG
    at quality 95, everything else becomes PNG) without EXIF, so every later decode sees the same
    upright pixels. The mode is reported only when it was not RGB.
    """
    decoded = decode(data, max_pixels)
    converted_from = None if decoded.mode == "RGB" else decoded.mode
    if decoded.mode == "RGB" and decoded.orientation == 1 and decoded.frames == 1:
        return data, decoded.width, decoded.height, None
    fmt = "JPEG" if decoded.format == "JPEG" else "PNG"
    buffer = io.BytesIO()
    decoded.image.save(buffer, fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return buffer.getvalue(), decoded.width, decoded.height, converted_from
