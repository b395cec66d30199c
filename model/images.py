"""Safe image decoding in one place: every upload, gallery file and example goes through `load_image`.

Uploads are untrusted: they may be empty, truncated, not images at all, decompression bombs, or in
any of PIL's modes. `load_image` refuses the bad ones with a message a user can act on and turns the
rest into a fully decoded, upright RGB image, so nothing downstream has to think about formats.
"""
from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_SUFFIXES = frozenset(ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN)
"""File name endings PIL can open: a folder's other files are not images."""
MAX_PIXELS = 40_000_000
MAX_BYTES = 32 * 2**20
_MB = 2**20


class ImageError(ValueError):
    """A user-facing message saying what is wrong with the upload."""


def load_image(source: bytes | str | os.PathLike, *, max_pixels: int = MAX_PIXELS,
               max_bytes: int = MAX_BYTES) -> Image.Image:
    """Decode `source` (the file's bytes, or a path) into an upright RGB image, fully loaded.

    The pixel limit is checked on the header's size before any pixel is decoded. PIL's own
    decompression-bomb guard (`Image.MAX_IMAGE_PIXELS`) still applies on top and is reported the same way.
    Errors about a path start with the file's name.
    """
    if isinstance(source, (bytes, bytearray)):
        return _decode(bytes(source), max_pixels, max_bytes)
    path = Path(source)
    try:
        _check_byte_size(path.stat().st_size, max_bytes)  # before reading a huge file into memory
        return _decode(path.read_bytes(), max_pixels, max_bytes)
    except FileNotFoundError:
        raise ImageError(f"{path.name}: file not found") from None
    except IsADirectoryError:
        raise ImageError(f"{path.name}: is a folder, not a file") from None
    except ImageError as e:
        raise ImageError(f"{path.name}: {e}") from None


def _decode(data: bytes, max_pixels: int, max_bytes: int) -> Image.Image:
    _check_byte_size(len(data), max_bytes)
    try:
        image = Image.open(io.BytesIO(data))
        width, height = image.size
        if width * height > max_pixels:
            raise ImageError(f"image too large: {width}x{height} = {width * height / 1e6:.3g} MP "
                             f"exceeds the {max_pixels / 1e6:.3g} MP limit")
        # Pixels are decoded here (the first frame of an animation), so decoding errors land below.
        return _to_rgb(ImageOps.exif_transpose(image))
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        # PIL refused the header before we saw its size (over 2 * Image.MAX_IMAGE_PIXELS).
        raise ImageError(f"image too large: more than {2 * Image.MAX_IMAGE_PIXELS / 1e6:.3g} MP "
                         f"exceeds the {max_pixels / 1e6:.3g} MP limit") from None
    except UnidentifiedImageError:
        raise ImageError("not an image (could not identify format)") from None
    except (OSError, SyntaxError, EOFError, ValueError) as e:
        raise ImageError(f"truncated or corrupt image data ({e})") from None


def _check_byte_size(n_bytes: int, max_bytes: int) -> None:
    if n_bytes == 0:
        raise ImageError("empty file (0 bytes)")
    if n_bytes > max_bytes:
        raise ImageError(f"file too large: {n_bytes / _MB:.1f} MB exceeds the {max_bytes / _MB:g} MB limit")


def _to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB. Transparency is composited on white, as a browser shows it on our page."""
    if image.mode in ("I", "I;16", "I;16L", "I;16B", "I;16N"):
        # PIL's own conversion clips these to 0..255 (a mid-grey 16-bit pixel would turn white): rescale.
        pixels = np.asarray(image).astype(np.float32)  # (H, W)
        image = Image.fromarray((np.clip(pixels, 0, 65535) / 257).round().astype(np.uint8))
    if image.has_transparency_data:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def file_sha256(data: bytes) -> str:
    """Hex SHA-256 of the file's bytes: the index dedupes uploads and gallery files by this."""
    return hashlib.sha256(data).hexdigest()


def image_key(image: Image.Image) -> str:
    """Stable hash of the decoded pixels, mode and size: the key of visual-feature caches.

    Unlike `file_sha256`, two files that decode to the same pixels (a re-save, other metadata) share it.
    """
    digest = hashlib.sha256(f"{image.mode}:{image.width}x{image.height}:".encode())
    digest.update(image.tobytes())
    return digest.hexdigest()
