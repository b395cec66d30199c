"""model/images.py: every odd or hostile upload either becomes an upright RGB image or a clear ImageError.

Each file is built here with PIL (or by hand, for headers that lie), so the suite needs no fixtures on disk.
"""
from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from model.images import ImageError, file_sha256, image_key, load_image

RED, BLUE, WHITE = (255, 0, 0), (0, 0, 255), (255, 255, 255)


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def png_claiming(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims `width` x `height` RGB pixels, followed by a few bytes of IDAT.

    Decoding it would fail (the data is far too short), so refusing it by size proves the check
    looks at the header before decoding.
    """
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB, no interlace
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 16))
            + chunk(b"IEND", b""))


def close(pixel: tuple[int, ...], expected: tuple[int, ...], tol: int = 8) -> bool:
    return all(abs(a - b) <= tol for a, b in zip(pixel, expected, strict=True))


def test_a_camera_photo_is_within_the_default_limits_and_a_bigger_file_is_not():
    with pytest.raises(ImageError) as error:  # a 24 MP header with no pixels: refused for its data only
        load_image(png_claiming(6000, 4000))
    assert "too large" not in str(error.value)
    with pytest.raises(ImageError, match=r"^file too large: 33\.0 MB exceeds the 32 MB limit$"):
        load_image(b"\x89PNG" + bytes(33 * 2**20 - 4))


def test_plain_rgb_png_round_trips_exactly():
    pixels = np.random.default_rng(0).integers(0, 256, (12, 20, 3), dtype=np.uint8)
    image = load_image(encode(Image.fromarray(pixels), "PNG"))
    assert image.mode == "RGB" and image.size == (20, 12)
    np.testing.assert_array_equal(np.asarray(image), pixels)


def test_cmyk_jpeg_becomes_rgb():
    data = encode(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "JPEG", quality=95)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    image = load_image(data)
    assert image.mode == "RGB"
    assert close(image.getpixel((8, 8)), RED)


def test_16_bit_greyscale_png_is_rescaled_not_clipped():
    # PIL's own I;16 -> RGB conversion clips at 255, which would turn this mid grey white.
    data = encode(Image.fromarray(np.array([[0, 32896, 65535]], dtype=np.uint16)), "PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    image = load_image(data)
    assert image.mode == "RGB"
    assert [image.getpixel((x, 0)) for x in range(3)] == [(0, 0, 0), (128, 128, 128), WHITE]


def test_32_bit_integer_mode_is_read_as_16_bit():
    data = encode(Image.fromarray(np.array([[0, 32896, 65535]], dtype=np.int32)), "TIFF")
    assert Image.open(io.BytesIO(data)).mode == "I"
    image = load_image(data)
    assert [image.getpixel((x, 0)) for x in range(3)] == [(0, 0, 0), (128, 128, 128), WHITE]


def test_rgba_png_is_composited_on_white():
    rgba = np.array([[[255, 0, 0, 255], [0, 0, 0, 0], [0, 0, 0, 128]]], dtype=np.uint8)
    image = load_image(encode(Image.fromarray(rgba, "RGBA"), "PNG"))
    assert image.mode == "RGB"
    assert image.getpixel((0, 0)) == RED
    assert image.getpixel((1, 0)) == WHITE  # fully transparent black shows the white page
    assert close(image.getpixel((2, 0)), (127, 127, 127), tol=1)


def test_la_and_one_bit_images_become_rgb():
    la = Image.fromarray(np.array([[[100, 255], [0, 0]]], dtype=np.uint8), "LA")
    image = load_image(encode(la, "PNG"))
    assert [image.getpixel((x, 0)) for x in range(2)] == [(100, 100, 100), WHITE]

    one_bit = Image.new("1", (4, 2), 0)
    one_bit.putpixel((3, 1), 1)
    image = load_image(encode(one_bit, "PNG"))
    assert image.mode == "RGB" and image.getpixel((0, 0)) == (0, 0, 0) and image.getpixel((3, 1)) == WHITE


@pytest.mark.parametrize("fmt", ["PNG", "GIF"])
def test_palette_with_transparency_is_composited_on_white(fmt):
    palette_image = Image.new("P", (3, 1), 0)
    palette_image.putpalette([0, 0, 0, 255, 0, 0] + [0] * (256 - 2) * 3)
    palette_image.putpixel((1, 0), 1)
    data = encode(palette_image, fmt, transparency=0)
    assert Image.open(io.BytesIO(data)).mode == "P"
    image = load_image(data)
    assert image.mode == "RGB"
    assert [image.getpixel((x, 0)) for x in range(3)] == [WHITE, RED, WHITE]


@pytest.mark.parametrize("fmt", ["GIF", "WEBP"])
def test_animation_gives_its_first_frame(fmt):
    frames = [Image.new("RGB", (8, 8), RED), Image.new("RGB", (8, 8), BLUE)]
    data = encode(frames[0], fmt, save_all=True, append_images=frames[1:], duration=100, loop=0, lossless=True)
    assert Image.open(io.BytesIO(data)).n_frames == 2
    image = load_image(data)
    assert image.size == (8, 8) and close(image.getpixel((4, 4)), RED)


def test_exif_orientation_is_applied():
    stored = Image.new("RGB", (40, 20), RED)
    stored.paste(BLUE, (20, 0, 40, 20))  # left half red, right half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: the camera was turned, view rotated 90 degrees clockwise
    image = load_image(encode(stored, "JPEG", quality=95, exif=exif))
    assert image.size == (20, 40)  # the oriented size, not the stored one
    assert close(image.getpixel((10, 5)), RED) and close(image.getpixel((10, 34)), BLUE)


def test_empty_data_and_empty_file(tmp_path: Path):
    with pytest.raises(ImageError, match=r"^empty file \(0 bytes\)$"):
        load_image(b"")
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    with pytest.raises(ImageError, match=r"^empty\.png: empty file \(0 bytes\)$"):
        load_image(empty)


def test_random_bytes_and_text_are_not_images(tmp_path: Path):
    with pytest.raises(ImageError, match=r"^not an image \(could not identify format\)$"):
        load_image(np.random.default_rng(0).bytes(4096))
    notes = tmp_path / "notes.txt"
    notes.write_text("a shopping list, not a picture\n")
    with pytest.raises(ImageError, match=r"^notes\.txt: not an image \(could not identify format\)$"):
        load_image(str(notes))


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_image_is_reported(fmt):
    pixels = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    data = encode(Image.fromarray(pixels), fmt)
    with pytest.raises(ImageError, match=r"^truncated or corrupt image data"):
        load_image(data[: len(data) // 2])


def test_header_size_is_checked_before_decoding():
    with pytest.raises(ImageError, match=r"^image too large: 8000x8000 = 64 MP exceeds the 40 MP limit$"):
        load_image(png_claiming(8000, 8000))
    # Within the limit the same bogus file gets as far as decoding, and fails there.
    with pytest.raises(ImageError, match=r"^truncated or corrupt image data"):
        load_image(png_claiming(100, 100))


def test_pils_own_decompression_bomb_error_becomes_an_image_error(tmp_path: Path):
    # 20000 x 20000 is past 2 * Image.MAX_IMAGE_PIXELS, where PIL itself refuses to open the file.
    with pytest.raises(ImageError, match=r"^image too large: more than \d+ MP exceeds the 40 MP limit$"):
        load_image(png_claiming(20_000, 20_000))
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_claiming(20_000, 20_000))
    with pytest.raises(ImageError, match=r"^bomb\.png: image too large"):
        load_image(bomb)


def test_pixel_limit_is_adjustable():
    data = encode(Image.new("RGB", (100, 50)), "PNG")
    assert load_image(data, max_pixels=5000).size == (100, 50)
    with pytest.raises(ImageError, match=r"^image too large: 100x50 = 0.005 MP exceeds the 0.004 MP limit$"):
        load_image(data, max_pixels=4000)


def test_byte_limit(tmp_path: Path):
    data = encode(Image.new("RGB", (8, 8)), "PNG") + b"\x00" * (3 * 2**19)  # trailing bytes after IEND
    with pytest.raises(ImageError, match=r"^file too large: 1\.5 MB exceeds the 1 MB limit$"):
        load_image(data, max_bytes=2**20)
    big = tmp_path / "big.png"
    big.write_bytes(data)
    with pytest.raises(ImageError, match=r"^big\.png: file too large: 1\.5 MB exceeds the 1 MB limit$"):
        load_image(big, max_bytes=2**20)
    assert load_image(big).size == (8, 8)


def test_missing_path_and_folder_name_the_file(tmp_path: Path):
    with pytest.raises(ImageError, match=r"^nothing\.png: file not found$"):
        load_image(tmp_path / "nothing.png")
    with pytest.raises(ImageError, match=r": is a folder, not a file$"):
        load_image(tmp_path)


def test_image_from_path_is_fully_loaded_and_detached(tmp_path: Path):
    path = tmp_path / "photo.jpg"
    path.write_bytes(encode(Image.new("RGB", (10, 10), BLUE), "JPEG"))
    image = load_image(path)
    path.unlink()
    assert getattr(image, "fp", None) is None
    assert close(image.getpixel((5, 5)), BLUE)


def test_file_sha256_is_the_hex_digest_of_the_bytes():
    assert file_sha256(b"abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


def test_image_key_follows_pixels_not_file_bytes():
    pixels = np.random.default_rng(1).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    plain = encode(Image.fromarray(pixels), "PNG")
    squeezed = encode(Image.fromarray(pixels), "PNG", compress_level=9, dpi=(300, 300))
    assert file_sha256(plain) != file_sha256(squeezed)
    assert image_key(load_image(plain)) == image_key(load_image(squeezed))

    changed = pixels.copy()
    changed[0, 0, 0] ^= 1
    assert image_key(load_image(encode(Image.fromarray(changed), "PNG"))) != image_key(load_image(plain))
    # Same bytes in another shape are another image.
    reshaped = Image.fromarray(pixels.reshape(8, 32, 3))
    assert image_key(reshaped) != image_key(load_image(plain))
