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

**Reduced-scale decoding** (``min_side``): a JPEG whose shorter side is at least twice
``min_side`` is decoded with Pillow's draft mode (libjpeg's DCT scaling by 1/2, 1/4 or 1/8, chosen
as the largest reduction that keeps the shorter side >= ``min_side``), which costs a fraction of a
full decode; other formats, and JPEGs already small, decode in full, pixel for pixel as without
it. :func:`min_side_for` gives the ``min_side`` a transform needs (the rule is there); every call
site that knows its model's transform passes it.

**Stored size** (:func:`store`, ingest's ``ingest.max_image_side``): an image whose longer
displayed side exceeds the maximum is stored resized to it (aspect ratio kept), decoded with draft
mode to at least twice that size and resampled with Lanczos, re-encoded as JPEG at
:data:`JPEG_QUALITY`; its original displayed size is recorded.

Errors are :class:`ImageRejected` with a reason from :data:`pacl_ray.formats.tables.QUARANTINE_REASONS`
(missing_file, unreadable_file, zero_size_image, decompression_bomb, corrupt_image,
truncated_image), which ingest and the dataset readers quarantine. A file that is not an image, or
a JPEG start marker followed by garbage, is corrupt_image; a file cut off (inside its header after
at least one whole segment, or in its pixel data) is truncated_image. A
decompression_bomb's detail cites the limit passed in (Pillow raises only at twice its limit, and
its message names that doubled number).
"""

from __future__ import annotations

import io
import math
import re
import threading
import warnings
from dataclasses import dataclass
from typing import Optional

import numpy as np
import pyarrow.fs as pafs

from pacl_ray.formats import storage

ORIENTATION_TAG = 0x0112
ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa")
# JPEG quality of re-encoded images (rotated, converted or resized): img2dataset's default; at 95
# the re-encoding's error is far below what the training augmentation changes.
JPEG_QUALITY = 95
# Resizing at ingest decodes (draft mode) to at least this multiple of the stored size before the
# Lanczos resample, as Pillow's ``thumbnail`` does, so the DCT reduction never sets the quality.
RESIZE_DRAFT_GAP = 2.0


class ImageRejected(Exception):
    """An image cannot be used: ``reason`` from ``tables.QUARANTINE_REASONS`` and a ``detail``."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


@dataclass
class Decoded:
    """A decoded picture: ``image`` upright PIL RGB (uint8), displayed ``width``/``height`` (of
    ``image``: reduced when decoded in draft mode), the file's ``mode`` and ``format``, its EXIF
    ``orientation`` (1 = none), frame count and full-scale displayed size."""

    image: "object"
    width: int
    height: int
    mode: str
    format: Optional[str]
    orientation: int
    frames: int
    original_width: int  # the displayed size at full scale (differs from width/height only after draft)
    original_height: int


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


def _jpeg_segments_before_cut(data: bytes) -> Optional[int]:
    """How many whole header segments a JPEG holds before one that runs past the end of the file;
    None when the bytes are not such a JPEG (no start marker, a byte where a marker belongs that is
    not one, a segment length below 2, or a complete header)."""
    if data[:2] != b"\xff\xd8":
        return None
    at, whole = 2, 0
    while at + 4 <= len(data):
        if data[at] != 0xFF:
            return None
        marker = data[at + 1]
        if marker == 0xFF:  # fill byte
            at += 1
            continue
        if marker == 0xDA:  # start of scan: the header is complete
            return None
        length = int.from_bytes(data[at + 2: at + 4], "big")
        if length < 2:
            return None
        if at + 2 + length > len(data):
            return whole
        whole, at = whole + 1, at + 2 + length
    return whole


def _header_fault(err: Exception, data: bytes) -> ImageRejected:
    """A failure while Pillow reads the header (before any pixel) -> :class:`ImageRejected`.

    Pillow's ``OSError: Truncated File Read`` there means a header segment claims more bytes than
    the file holds. **Choice**: in a JPEG whose first segment after the start marker already does
    (a start marker followed by garbage) that is corrupt_image; after at least one whole segment it
    is a file cut off inside its header, truncated_image (as a cut in the pixel data is)."""
    size = len(data)
    if isinstance(err, OSError) and "truncated file read" in str(err).lower():
        whole = _jpeg_segments_before_cut(data)
        if whole == 0:
            return ImageRejected("corrupt_image", f"a JPEG start marker followed by no valid header: the first "
                                                  f"segment claims more bytes than the file holds ({size} bytes)")
        where = f"after {whole} whole JPEG header segment(s)" if whole else "inside its header"
        return ImageRejected("truncated_image", f"the file is cut off {where} ({size} bytes): "
                                                "a header segment runs past the end")
    return ImageRejected("corrupt_image", f"the image header is unreadable ({type(err).__name__}: {err})")


def _pixel_fault(err: Exception) -> ImageRejected:
    """A failure while decoding the pixels: truncated_image when Pillow says the data stops early
    (``image file is truncated (N bytes not processed)``), else corrupt_image."""
    message = str(err)
    if isinstance(err, OSError) and "truncated" in message.lower():
        return ImageRejected("truncated_image", f"the pixel data ends early, the file is cut off ({message})")
    return ImageRejected("corrupt_image", f"the pixel data cannot be decoded ({type(err).__name__}: {message})")


def _bomb(err: Exception, max_pixels: Optional[int]) -> ImageRejected:
    """decompression_bomb citing the limit in force (``max_pixels``; Pillow's own when None), not
    the 2x limit at which Pillow raises instead of warning."""
    from PIL import Image

    limit = max_pixels if max_pixels is not None else Image.MAX_IMAGE_PIXELS
    found = re.search(r"\((\d+) pixels\)", str(err))
    size = f"{int(found.group(1)):,} pixels" if found else "the image"
    return ImageRejected("decompression_bomb", f"{size} exceeds the limit of {limit:,} pixels "
                                               "(a decompression-bomb guard)")


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


def draft_side(width: int, height: int, min_side: Optional[int] = None, min_long_side: Optional[int] = None) -> int:
    """The shorter side to request from Pillow's draft mode for a ``width`` x ``height`` image so
    that the decoded shorter side stays >= ``min_side`` and the longer >= ``min_long_side``; 0 when
    no DCT reduction (at least 1/2) is possible, i.e. decode in full.

    Pillow's JPEG draft picks the scale ``s`` in (8, 4, 2, 1) at most ``min(W // w, H // h)`` for a
    requested (w, h) and decodes ``ceil(W / s)`` x ``ceil(H / s)``; requesting (m, m) with m this
    value gives ``s <= short // m``, so the decoded shorter side is >= m and the longer side keeps
    the aspect ratio (>= ``min_long_side`` by the choice of m).
    """
    short, long = min(width, height), max(width, height)
    need = max(int(min_side or 0), math.ceil((min_long_side or 0) * short / long) if long else 0, 1)
    return need if short >= 2 * need else 0


def _open(data: bytes, max_pixels: Optional[int], min_side: Optional[int] = None,
          min_long_side: Optional[int] = None):
    """Open and fully load the first frame; every failure becomes :class:`ImageRejected`.
    A JPEG is decoded at reduced scale when :func:`draft_side` allows it."""
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
            raise _bomb(err, max_pixels) from err
        except UnidentifiedImageError as err:
            raise ImageRejected("corrupt_image", f"not a recognised image ({len(data)} bytes)") from err
        except Exception as err:  # e.g. OSError "Truncated File Read" inside the header
            raise _header_fault(err, data) from err
        finally:
            Image.MAX_IMAGE_PIXELS = previous
    width, height = image.size
    if width <= 0 or height <= 0:
        raise ImageRejected("zero_size_image", f"{width}x{height} pixels")
    try:
        image.seek(0)  # animated images: the first frame
        side = draft_side(width, height, min_side, min_long_side) if (min_side or min_long_side) else 0
        if side and image.format == "JPEG":  # before load(): the DCT scale is a decoder setting
            image.draft("RGB", (side, side))
        image.load()
    except bomb_errors as err:
        raise _bomb(err, max_pixels) from err
    except Exception as err:  # Pillow raises OSError/SyntaxError/ValueError for broken streams
        raise _pixel_fault(err) from err
    return image, (width, height)


def decode(data: bytes, max_pixels: Optional[int] = None, min_side: Optional[int] = None,
           *, min_long_side: Optional[int] = None) -> Decoded:
    """Encoded image bytes -> :class:`Decoded` (upright RGB, first frame, scaled to 8 bits).

    ``max_pixels``: the decompression-bomb limit (Pillow's ``MAX_IMAGE_PIXELS``, which warns above
    it and raises above twice it; both count as a bomb here); 0 disables it, None keeps Pillow's.
    ``min_side`` (px): a JPEG may be decoded at reduced scale (draft mode) as long as its shorter
    side stays >= ``min_side`` (``min_long_side``: the longer side >= it); None/0 = full scale.
    Orientation does not matter (a side's length is the same upright). The result is at least that
    large unless the stored image is smaller, and identical to a full decode when no reduction
    of at least 1/2 fits (:func:`draft_side`). Raises :class:`ImageRejected` zero_size_image,
    decompression_bomb, corrupt_image or truncated_image.
    """
    if not data:
        raise ImageRejected("zero_size_image", "the file is empty (0 bytes)")
    image, (full_w, full_h) = _open(data, max_pixels, min_side, min_long_side)
    mode, fmt, frames = image.mode, image.format, int(getattr(image, "n_frames", 1) or 1)
    orientation = _orientation(image)
    try:
        rgb = to_rgb(image)
    except (ValueError, OSError) as err:  # a mode Pillow cannot convert
        raise ImageRejected("corrupt_image", f"cannot convert mode {mode} to RGB: {err}") from err
    if orientation != 1:
        rgb = _transpose(rgb, orientation)
    if orientation >= 5:  # a quarter turn: the displayed size is the stored one transposed
        full_w, full_h = full_h, full_w
    return Decoded(rgb, rgb.width, rgb.height, mode, fmt, orientation, frames, full_w, full_h)


def _transpose(image, orientation: int):
    """Apply an EXIF orientation value (2-8), as Pillow's ``ImageOps.exif_transpose`` does."""
    from PIL import Image

    method = {
        2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
        5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
        8: Image.Transpose.ROTATE_90,
    }[orientation]
    return image.transpose(method)


def decode_rgb(data: bytes, max_pixels: Optional[int] = None, min_side: Optional[int] = None):
    """Encoded image bytes -> an upright 8-bit RGB PIL image (see :func:`decode`; ``min_side``:
    the shorter side a reduced-scale JPEG decode must keep, e.g. ``min_side_for(transform)``)."""
    return decode(data, max_pixels, min_side).image


def load_rgb(uri: str, max_pixels: Optional[int] = None, min_side: Optional[int] = None):
    """An image file (local path or pyarrow URI) -> an upright 8-bit RGB PIL image (``min_side``:
    see :func:`decode`).

    Raises :class:`ImageRejected` (the reason names the file) when it cannot be read or decoded.
    """
    data = read_image_bytes(uri)
    try:
        return decode(data, max_pixels, min_side).image
    except ImageRejected as err:
        raise ImageRejected(err.reason, f"{uri}: {err.detail}") from err


# --------------------------------------------------------------------------- how small a decode may be


def crop_min_side(size, scale: tuple[float, float], ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> int:
    """The shorter image side (px) at which every random-resized crop is at least ``size`` px on
    each side, so the crop's resample to ``size`` never enlarges (torchvision/timm
    ``RandomResizedCrop``: area fraction ``s`` in ``scale``, aspect ``r`` in ``ratio``).

    Rule: a crop is ``sqrt(s A r)`` x ``sqrt(s A / r)`` for an image of area ``A``; its shorter
    side ``sqrt(s A) * min(sqrt(r), 1 / sqrt(r))`` is smallest at ``s = scale[0]`` and the
    extreme aspect, ``sqrt(scale[0] A) * q`` with ``q = min(sqrt(ratio[0]), 1 / sqrt(ratio[1]))``
    (``sqrt(3/4)`` for timm's defaults). Requiring that >= T (the larger output side) and using
    ``A >= short side ** 2`` gives ``short side >= T / (q sqrt(scale[0]))``: 366 px for 224 px at
    scale >= 0.5 (not 224 / sqrt(0.5) = 317, which forgets the aspect), 915 px at timm's 0.08.
    The fallback centre crop (after 10 rejected draws) is never smaller than that.
    """
    target = max(size) if isinstance(size, (tuple, list)) else int(size)
    q = min(math.sqrt(min(ratio[0], 1.0)), 1 / math.sqrt(max(ratio[1], 1.0)))
    return math.ceil(target / (q * math.sqrt(min(scale[0], 1.0))) - 1e-9)


def resize_min_side(size) -> int:
    """The shorter image side at which a resize to ``size`` (an int: the shorter side, as
    torchvision ``Resize`` and timm's eval transform take it; (h, w): the output, any aspect)
    never enlarges: the larger of ``size``."""
    return max(size) if isinstance(size, (tuple, list)) else int(size)


def min_side_for(transform) -> Optional[int]:
    """The ``min_side`` to decode for with ``transform`` (a PIL-image transform) so that
    reduced-scale decoding never goes below what its first resizing step needs; None (decode in
    full) when that step is not one known here.

    The first step of a ``Compose`` (nested ones included) decides: a random-resized crop
    (``scale``, ``ratio``, ``size``; timm's train transform) -> :func:`crop_min_side`; a
    ``Resize`` (timm's and open_clip's eval transforms) or timm ``ResizeKeepRatio`` without random
    scaling -> :func:`resize_min_side`. Anything else (a crop at native resolution, an unknown
    step) needs the full-scale image.
    """
    steps = getattr(transform, "transforms", None)
    if isinstance(steps, (list, tuple)):
        return min_side_for(steps[0]) if steps else None
    size = getattr(transform, "size", None)
    if size is None:
        return None
    name = type(transform).__name__
    if "RandomResizedCrop" in name and hasattr(transform, "scale") and hasattr(transform, "ratio"):
        return crop_min_side(size, tuple(transform.scale), tuple(transform.ratio))
    if name == "Resize":
        return resize_min_side(size)
    if name == "ResizeKeepRatio" and not (getattr(transform, "random_scale_prob", 0)
                                          or getattr(transform, "random_aspect_prob", 0)):
        return resize_min_side(size)  # shorter side >= both targets: every ratio it takes is >= 1
    return None


@dataclass(frozen=True)
class StoredImage:
    """What ingest stores for one image: the encoded ``data``, its displayed ``width``/``height``,
    the displayed size of the image as given (``original_width``/``original_height``; equal
    unless ``resized``) and its original Pillow mode when that was not RGB (``converted_from``)."""

    data: bytes
    width: int
    height: int
    original_width: int
    original_height: int
    converted_from: Optional[str]
    resized: bool


def fitted_size(width: int, height: int, max_side: int) -> tuple[int, int]:
    """(width, height) scaled so the longer side is ``max_side`` (aspect ratio kept, each side
    rounded, at least 1 px); unchanged when the longer side is already at most ``max_side``."""
    long = max(width, height)
    if not max_side or long <= max_side:
        return width, height
    scale = max_side / long
    fit = lambda v: max_side if v == long else max(1, min(max_side, round(v * scale)))  # noqa: E731
    return fit(width), fit(height)


def store(data: bytes, max_pixels: Optional[int] = None, max_side: int = 0,
          quality: int = JPEG_QUALITY) -> StoredImage:
    """Bytes to store for an image (ingest) -> :class:`StoredImage`.

    ``max_side`` (px; 0 = keep the size): an image whose longer displayed side is larger is
    resized so that side is ``max_side``, the aspect ratio kept (``fitted_size``): a JPEG is
    decoded with draft mode to at least :data:`RESIZE_DRAFT_GAP` times the new size, then
    resampled with Lanczos (antialiased), and the result is stored as JPEG at ``quality``
    whatever the input format (as img2dataset does; a transparent PNG is composited over white
    first, see :func:`to_rgb`).

    An image not resized is stored as by :func:`normalize`: an upright, single-frame RGB file
    keeps its original bytes; anything else (another mode, an EXIF orientation, an animation) is
    decoded and re-encoded (JPEG stays JPEG at ``quality``, everything else becomes PNG) without
    EXIF, so every later decode sees the same upright pixels. Raises :class:`ImageRejected` as
    :func:`decode`.
    """
    if max_side and max_side < 0:
        raise ValueError(f"max_side must be >= 0 (0 = keep the size), got {max_side}")
    decoded = decode(data, max_pixels, min_long_side=math.ceil(RESIZE_DRAFT_GAP * max_side) if max_side else None)
    converted_from = None if decoded.mode == "RGB" else decoded.mode
    original = (decoded.original_width, decoded.original_height)
    target = fitted_size(*original, max_side)
    if target != original:
        from PIL import Image

        image = decoded.image.resize(target, Image.Resampling.LANCZOS)
        return StoredImage(_encode(image, "JPEG", quality), *target, *original, converted_from, True)
    if decoded.mode == "RGB" and decoded.orientation == 1 and decoded.frames == 1:
        return StoredImage(data, *original, *original, None, False)
    fmt = "JPEG" if decoded.format == "JPEG" else "PNG"
    return StoredImage(_encode(decoded.image, fmt, quality), *original, *original, converted_from, False)


def _encode(image, fmt: str, quality: int) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **({"quality": quality} if fmt == "JPEG" else {}))
    return buffer.getvalue()


def normalize(data: bytes, max_pixels: Optional[int] = None) -> tuple[bytes, int, int, Optional[str]]:
    """Bytes to store for an image at its own size -> (bytes, displayed width, height, original
    mode or None): :func:`store` without resizing, as a tuple."""
    kept = store(data, max_pixels)
    return kept.data, kept.width, kept.height, kept.converted_from
