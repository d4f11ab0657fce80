"""pacl_ray.formats.images: the one decoder -- EXIF orientation, every Pillow mode scaled to 8-bit RGB."""

from __future__ import annotations

import io
import threading

import numpy as np
import pytest
from PIL import Image, ImageOps

from pacl_ray.formats import images
from pacl_ray.formats.images import ImageRejected


def save(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def halves(size=(40, 20)) -> Image.Image:
    """Left half red, right half blue (stored orientation)."""
    array = np.zeros((size[1], size[0], 3), np.uint8)
    array[:, : size[0] // 2] = (255, 0, 0)
    array[:, size[0] // 2:] = (0, 0, 255)
    return Image.fromarray(array, "RGB")


def with_orientation(image: Image.Image, orientation: int, fmt: str = "JPEG") -> bytes:
    exif = Image.Exif()
    exif[images.ORIENTATION_TAG] = orientation
    return save(image, fmt, exif=exif.tobytes(), **({"quality": 100, "subsampling": 0} if fmt == "JPEG" else {}))


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


# --------------------------------------------------------------------------- EXIF orientation


def test_phone_jpeg_orientation_6_is_upright():
    """Stored 40x20 (left red, right blue), Orientation 6 = rotate 90 degrees clockwise to display:
    displayed 20x40 with red on top, blue below."""
    decoded = images.decode(with_orientation(halves(), 6))
    assert (decoded.width, decoded.height, decoded.image.size) == (20, 40, (20, 40))
    assert decoded.orientation == 6 and decoded.image.mode == "RGB"
    assert np.abs(pixels(decoded.image)[5, 10] - (255, 0, 0)).max() < 8  # top: red
    assert np.abs(pixels(decoded.image)[34, 10] - (0, 0, 255)).max() < 8  # bottom: blue


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_orientation_matches_pillows_exif_transpose(orientation):
    data = with_orientation(halves((6, 4)).resize((6, 4)), orientation, "PNG")
    expected = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")
    decoded = images.decode(data)
    assert decoded.image.size == expected.size == ((4, 6) if orientation >= 5 else (6, 4))
    assert np.array_equal(pixels(decoded.image), pixels(expected))


def test_broken_exif_keeps_the_pixels():
    data = save(halves(), "JPEG", exif=b"Exif\x00\x00garbage")
    decoded = images.decode(data)
    assert (decoded.width, decoded.height, decoded.orientation) == (40, 20, 1)


# --------------------------------------------------------------------------- modes, scaled not clamped


def ramp16() -> np.ndarray:
    return (np.arange(256, dtype=np.uint32) * 257).astype(np.uint16).reshape(1, 256).repeat(2, axis=0)


def test_16bit_grayscale_png_is_scaled_not_clamped():
    data = save(Image.fromarray(ramp16()), "PNG")
    assert Image.open(io.BytesIO(data)).mode == "I;16"
    decoded = images.decode(data)
    values = pixels(decoded.image)
    assert decoded.mode == "I;16"
    assert values[0, :, 0].tolist() == list(range(256))  # v / 257: the full ramp, 256 levels
    assert (values[..., 0] == values[..., 1]).all() and (values[..., 1] == values[..., 2]).all()


def _gif_two_frames() -> bytes:
    first, second = Image.new("RGB", (4, 4), (255, 0, 0)), Image.new("RGB", (4, 4), (0, 0, 255))
    return save(first, "GIF", save_all=True, append_images=[second], duration=100, loop=0)


def _palette_with_transparency() -> bytes:
    image = Image.new("P", (4, 4), 1)
    image.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    image.putpixel((0, 0), 0)
    return save(image, "PNG", transparency=0)


# (name, encoded bytes, the file's mode, expected RGB at pixel (0, 0), and at (x, y) -> value)
MODE_CASES = [
    ("I;16 ramp", save(Image.fromarray(ramp16()), "PNG"), "I;16", (0, 0, 0), ((255, 0), (255, 255, 255))),
    ("I;16B big-endian TIFF", save(Image.frombytes("I;16B", (256, 2), ramp16().astype(">u2").tobytes()), "TIFF"),
     "I;16B", (0, 0, 0), ((128, 0), (128, 128, 128))),
    ("16-bit PGM (Pillow opens it as I)", b"P5\n256 2\n65535\n" + ramp16().astype(">u2").tobytes(), "I",
     (0, 0, 0), ((200, 1), (200, 200, 200))),
    ("I 16-bit values", save(Image.fromarray(ramp16().astype(np.int32), "I"), "TIFF"), "I", (0, 0, 0), ((255, 1), (255, 255, 255))),
    ("I outside 16 bits: min-max", save(Image.fromarray(np.array([[-1000, 0, 1000]], np.int32), "I"), "TIFF"), "I",
     (0, 0, 0), ((2, 0), (255, 255, 255))),
    ("F in [0, 1]", save(Image.fromarray(np.array([[0.0, 0.5, 1.0]], np.float32), "F"), "TIFF"), "F",
     (0, 0, 0), ((1, 0), (128, 128, 128))),
    ("F other range: min-max", save(Image.fromarray(np.array([[-2.0, 0.0, 2.0]], np.float32), "F"), "TIFF"), "F",
     (0, 0, 0), ((1, 0), (128, 128, 128))),
    ("P with transparency", _palette_with_transparency(), "P", (255, 255, 255), ((1, 1), (0, 255, 0))),
    ("LA half transparent", save(Image.new("LA", (2, 2), (0, 0)), "PNG"), "LA", (255, 255, 255), ((1, 1), (255, 255, 255))),
    ("RGBA half alpha", save(Image.new("RGBA", (2, 2), (0, 0, 0, 128)), "PNG"), "RGBA", (127, 127, 127), ((1, 1), (127, 127, 127))),
    ("CMYK", save(Image.new("CMYK", (2, 2), (0, 255, 255, 0)), "TIFF"), "CMYK", (255, 0, 0), ((1, 1), (255, 0, 0))),
    ("1 bit", save(Image.new("1", (2, 2), 1), "PNG"), "1", (255, 255, 255), ((1, 1), (255, 255, 255))),
    ("L", save(Image.new("L", (2, 2), 77), "PNG"), "L", (77, 77, 77), ((1, 1), (77, 77, 77))),
    ("animated GIF: first frame", _gif_two_frames(), "P", (255, 0, 0), ((3, 3), (255, 0, 0))),
]


@pytest.mark.parametrize("name, data, mode, at_origin, other", MODE_CASES, ids=[c[0] for c in MODE_CASES])
def test_every_mode_becomes_8bit_rgb_by_scaling(name, data, mode, at_origin, other):
    decoded = images.decode(data)
    assert decoded.mode == mode
    assert decoded.image.mode == "RGB"
    values = pixels(decoded.image)
    assert np.abs(values[0, 0] - at_origin).max() <= 1
    (x, y), expected = other
    assert np.abs(values[y, x] - expected).max() <= 1


def test_animated_frames_counted():
    assert images.decode(_gif_two_frames()).frames == 2


# --------------------------------------------------------------------------- what ingest stores


def test_normalize_keeps_upright_rgb_bytes():
    data = save(halves(), "JPEG")
    assert images.normalize(data) == (data, 40, 20, None)


def test_normalize_rotated_jpeg_is_stored_upright_without_exif():
    stored, width, height, converted_from = images.normalize(with_orientation(halves(), 6))
    assert (width, height, converted_from) == (20, 40, None)
    again = Image.open(io.BytesIO(stored))
    assert again.format == "JPEG" and again.size == (20, 40)
    assert again.getexif().get(images.ORIENTATION_TAG, 1) == 1  # no second rotation downstream
    assert np.abs(pixels(again.convert("RGB"))[5, 10] - (255, 0, 0)).max() < 8


def test_normalize_16bit_is_png_with_the_ramp():
    stored, width, height, converted_from = images.normalize(save(Image.fromarray(ramp16()), "PNG"))
    assert (width, height, converted_from) == (256, 2, "I;16")
    again = Image.open(io.BytesIO(stored))
    assert again.format == "PNG" and again.mode == "RGB"
    assert pixels(again)[0, :, 0].tolist() == list(range(256))


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "data, limit, reason",
    [
        (b"", None, "zero_size_image"),
        (b"not an image", None, "corrupt_image"),
        (save(halves((64, 64)), "JPEG")[:300], None, "truncated_image"),
        (save(halves((101, 100)), "PNG"), 5_000, "decompression_bomb"),
        (save(halves((200, 200)), "PNG"), 5_000, "decompression_bomb"),
    ],
)
def test_decode_errors(data, limit, reason):
    with pytest.raises(ImageRejected) as info:
        images.decode(data, limit)
    assert info.value.reason == reason


def test_a_jpeg_start_marker_followed_by_garbage_is_corrupt_with_a_readable_detail():
    garbage = bytes((i * 97 + 13) % 256 for i in range(500))
    with pytest.raises(ImageRejected) as info:
        images.decode(b"\xff\xd8\xff\xe0" + garbage)  # APP0 whose length runs past the end
    assert info.value.reason == "corrupt_image"
    assert "start marker followed by no valid header" in info.value.detail
    assert "Truncated File Read" not in info.value.detail


def test_a_jpeg_cut_inside_its_header_or_pixels_is_truncated_with_a_readable_detail():
    data = save(halves((64, 64)), "JPEG")
    with pytest.raises(ImageRejected) as header:
        images.decode(data[:300])
    with pytest.raises(ImageRejected) as pixels_:
        images.decode(data[:-50])
    assert (header.value.reason, pixels_.value.reason) == ("truncated_image", "truncated_image")
    assert "cut off after" in header.value.detail and "(300 bytes)" in header.value.detail
    assert "Truncated File Read" not in header.value.detail
    assert pixels_.value.detail.startswith("the pixel data ends early")


@pytest.mark.parametrize("size", [(101, 100), (200, 200)])  # Pillow warns above the limit, raises above 2x
def test_a_bomb_detail_cites_the_limit_given_not_pillows_doubled_one(size):
    with pytest.raises(ImageRejected) as info:
        images.decode(save(halves(size), "PNG"), 5_000)
    assert info.value.reason == "decompression_bomb"
    assert info.value.detail.startswith(f"{size[0] * size[1]:,} pixels exceeds the limit of 5,000 pixels")
    assert "10000" not in info.value.detail.replace(",", "")


def test_bomb_limit_restored_across_threads():
    before = Image.MAX_IMAGE_PIXELS
    big, small = save(halves((101, 100)), "PNG"), save(halves((10, 10)), "PNG")
    errors = []

    def work(i):
        try:
            images.decode(big if i % 2 else small, 5_000 if i % 2 else 10**9)
        except ImageRejected as err:
            errors.append(err.reason)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == ["decompression_bomb"] * 8
    assert Image.MAX_IMAGE_PIXELS == before


def test_load_rgb_names_the_file(tmp_path):
    with pytest.raises(ImageRejected, match="missing_file") as info:
        images.load_rgb(str(tmp_path / "nope.jpg"))
    assert "nope.jpg" in info.value.detail
    (tmp_path / "bad.jpg").write_bytes(b"garbage")
    with pytest.raises(ImageRejected) as info:
        images.load_rgb(str(tmp_path / "bad.jpg"))
    assert info.value.reason == "corrupt_image" and "bad.jpg" in info.value.detail
    (tmp_path / "dir.jpg").mkdir()
    with pytest.raises(ImageRejected, match="unreadable_file"):
        images.read_image_bytes(str(tmp_path / "dir.jpg"))


# --------------------------------------------------------------------------- reduced-scale decoding


def photo(size, seed=0) -> Image.Image:
    """Smooth colour fields plus grain: JPEG decodes of it differ visibly when the scale differs."""
    rng = np.random.default_rng(seed)
    low = Image.fromarray(rng.integers(0, 255, (6, 8, 3), dtype=np.uint8)).resize(size, Image.BICUBIC)
    grain = rng.normal(0, 10, (size[1], size[0], 3))
    return Image.fromarray(np.clip(np.asarray(low, np.float64) + grain, 0, 255).astype(np.uint8))


@pytest.mark.parametrize("min_side, expected", [(100, (200, 150)), (150, (200, 150)), (74, (100, 75)),
                                                (37, (50, 38)), (38, (100, 75)), (10, (50, 38)),
                                                (151, (400, 300))])
def test_draft_decode_is_the_smallest_dct_scale_at_least_min_side(min_side, expected):
    data = save(photo((400, 300)), "JPEG", quality=90)
    decoded = images.decode(data, min_side=min_side)
    assert decoded.image.size == (decoded.width, decoded.height) == expected
    assert min(decoded.image.size) >= min(min_side, 300)
    assert (decoded.original_width, decoded.original_height) == (400, 300)


def test_draft_decode_of_a_small_image_is_the_full_decode():
    data = save(photo((120, 90)), "JPEG", quality=90)
    full = images.decode_rgb(data)
    for min_side in (46, 64, 90, 200):  # no reduction of at least 1/2 keeps the shorter side >= min_side
        assert np.array_equal(pixels(images.decode_rgb(data, min_side=min_side)), pixels(full))
    assert images.decode_rgb(data, min_side=45).size == (60, 45)  # 1/2 fits exactly


def test_draft_decode_is_close_to_a_full_decode_resized():
    data = save(photo((800, 600)), "JPEG", quality=95)
    drafted = images.decode_rgb(data, min_side=150)
    assert drafted.size == (200, 150)
    reference = images.decode_rgb(data).resize(drafted.size, Image.Resampling.BOX)
    assert np.abs(pixels(drafted) - pixels(reference)).mean() < 4


def test_draft_decode_keeps_the_orientation_and_non_jpeg_decodes_in_full():
    rotated = images.decode(with_orientation(photo((400, 200)), 6), min_side=50)
    assert rotated.image.size == (50, 100) and (rotated.original_width, rotated.original_height) == (200, 400)
    assert rotated.orientation == 6
    png = save(photo((400, 200)), "PNG")
    assert images.decode_rgb(png, min_side=50).size == (400, 200)
    assert np.array_equal(pixels(images.decode_rgb(png, min_side=50)), pixels(images.decode_rgb(png)))


def test_crop_min_side_never_lets_a_random_resized_crop_enlarge():
    from timm.data import create_transform

    assert images.crop_min_side(224, (0.5, 1.0)) == 366  # 224 / (sqrt(3/4) sqrt(0.5)) = 365.8
    assert images.crop_min_side((224, 224), (0.08, 1.0)) == 915
    rrc = create_transform(224, is_training=True, scale=(0.5, 1.0)).transforms[0]
    side = images.min_side_for(create_transform(224, is_training=True, scale=(0.5, 1.0)))
    assert side == 366
    # brute force: the crops timm draws on an image of that shorter side are all >= 224 px
    import random

    random.seed(0)
    for shape in ((side, side), (side * 3 // 2, side), (side, side * 2)):
        image = Image.new("RGB", shape)
        sizes = [rrc.get_params(image, rrc.scale, rrc.ratio)[2:] for _ in range(3000)]
        assert min(min(s) for s in sizes) >= 224, shape
        if shape[0] == shape[1]:  # a square image nearly reaches the bound (it is not loose)
            assert min(min(s) for s in sizes) < 235


def test_min_side_for_eval_transforms_and_unknown_ones():
    from timm.data import create_transform
    from torchvision import transforms as T

    assert images.min_side_for(create_transform(224, is_training=False, crop_pct=0.875)) == 256
    assert images.min_side_for(create_transform(224, is_training=False, crop_pct=1.0, crop_mode="squash")) == 224
    assert images.min_side_for(create_transform(224, is_training=False, crop_pct=1.0, crop_mode="border")) == 224
    assert images.min_side_for(T.Compose([T.Compose([T.Resize(200), T.CenterCrop(180)]), T.ToTensor()])) == 200
    assert images.min_side_for(T.Compose([T.CenterCrop(100), T.ToTensor()])) is None  # native resolution
    assert images.min_side_for(lambda image: image) is None


# --------------------------------------------------------------------------- stored size (ingest.max_image_side)


@pytest.mark.parametrize("size, max_side, expected", [((3000, 2000), 512, (512, 341)), ((2000, 3000), 512, (341, 512)),
                                                      ((900, 900), 512, (512, 512)), ((1000, 10), 100, (100, 1)),
                                                      ((500, 300), 512, (500, 300)), ((512, 100), 512, (512, 100))])
def test_fitted_size_keeps_the_aspect_ratio_and_max_side(size, max_side, expected):
    assert images.fitted_size(*size, max_side) == expected


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_store_resizes_to_the_max_side_keeping_the_aspect_ratio(fmt):
    source = photo((1200, 800))
    kept = images.store(save(source, fmt), max_side=300)
    assert kept.resized and (kept.width, kept.height) == (300, 200)
    assert (kept.original_width, kept.original_height) == (1200, 800) and kept.converted_from is None
    again = Image.open(io.BytesIO(kept.data))
    assert again.format == "JPEG" and again.size == (300, 200)
    reference = source.resize((300, 200), Image.Resampling.LANCZOS)
    assert np.abs(pixels(again) - pixels(reference)).mean() < 4  # the same picture, smaller


def test_store_leaves_small_images_untouched():
    data = save(photo((300, 200)), "JPEG")
    kept = images.store(data, max_side=300)
    assert kept.data == data and not kept.resized
    assert (kept.width, kept.height, kept.original_width, kept.original_height) == (300, 200, 300, 200)
    assert images.store(data, max_side=0) == kept
    assert images.normalize(data) == (data, 300, 200, None)


def test_store_resizes_rotated_jpegs_by_their_displayed_size():
    kept = images.store(with_orientation(halves((400, 200)), 6), max_side=100)
    assert (kept.width, kept.height, kept.original_width, kept.original_height) == (50, 100, 200, 400)
    again = Image.open(io.BytesIO(kept.data))
    assert again.size == (50, 100) and again.getexif().get(images.ORIENTATION_TAG, 1) == 1
    upright = pixels(again.convert("RGB"))
    assert np.abs(upright[10, 25] - (255, 0, 0)).max() < 16 and np.abs(upright[90, 25] - (0, 0, 255)).max() < 16
    # the same upright picture as the unresized path stores
    small = images.store(with_orientation(halves((400, 200)), 6))
    assert (small.width, small.height, small.data[:2]) == (200, 400, b"\xff\xd8")


def test_store_composites_a_transparent_png_over_white_when_resizing():
    rgba = Image.new("RGBA", (400, 200), (0, 0, 255, 255))
    rgba.paste((0, 0, 0, 0), (0, 0, 200, 200))  # left half fully transparent
    kept = images.store(save(rgba, "PNG"), max_side=100)
    assert (kept.width, kept.height, kept.converted_from) == (100, 50, "RGBA")
    values = pixels(Image.open(io.BytesIO(kept.data)).convert("RGB"))
    assert np.abs(values[25, 10] - (255, 255, 255)).max() < 8 and np.abs(values[25, 90] - (0, 0, 255)).max() < 8
    assert images.store(save(rgba, "PNG"), max_side=400).data[:4] == b"\x89PNG"  # not resized: PNG as before
