"""Image decoding: every mode becomes 8-bit RGB; unreadable files raise `ImageError` naming the file.

Every decode is bounded (`open_image`, also what `vitforge serve` decodes uploads with): the header is read first
and an image of more than `max_pixels` pixels is refused before any pixel is decoded (a decompression bomb, a
40000 x 40000 PNG of a few kilobytes, never reaches memory); a truncated file is an error, never a half-grey image
(PIL's `ImageFile.LOAD_TRUNCATED_IMAGES` is left at its default, False).
"""

from __future__ import annotations

import contextlib
import io
import threading
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from vitforge.constants import DEFAULT_MAX_IMAGE_PIXELS
from vitforge.errors import first_line

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm")
__all__ = ["DEFAULT_MAX_IMAGE_PIXELS", "ImageError", "image_header", "image_size", "is_image_file", "open_image",
           "to_rgb"]
_PIL_LOCK = threading.Lock()


class ImageError(Exception):
    """An image that cannot be decoded. `str(e)` is '<name>: <reason>'."""


@contextlib.contextmanager
def _quiet_pil():
    """Silence PIL's warnings (its decompression-bomb warning: `open_image` checks sizes itself; EXIF/ICC chatter)
    for the few header-sized calls made inside. Warning filters are process-wide in Python, so the calls are
    serialised by a lock: decode threads cannot interleave `catch_warnings` and leave a filter set for good, and
    nothing is changed outside the window (no global filter, `Image.MAX_IMAGE_PIXELS` untouched)."""
    with _PIL_LOCK, warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
        warnings.filterwarnings("ignore", module=r"PIL(\.|$)")
        yield


def image_header(source: str | bytes, label: str, *, max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> Image.Image:
    """Open an image lazily (header only) and refuse it when it has more than `max_pixels` pixels.

    Returns:
        The unloaded PIL image (use it as a context manager to close its file).

    Raises:
        ImageError: not found, not an image, or too large; the message starts with `label`.
    """
    try:
        with _quiet_pil():
            img = Image.open(io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source)
    except FileNotFoundError:
        raise ImageError(f"{label}: file not found") from None
    except UnidentifiedImageError:  # its message holds the file object's repr for bytes; say it plainly
        raise ImageError(f"{label}: cannot decode image (not in an image format PIL recognises)") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:  # the latter: over twice PIL's limit
        raise ImageError(f"{label}: cannot decode image ({first_line(e)})") from None
    w, h = img.size
    if max_pixels is not None and w * h > max_pixels:
        img.close()
        raise ImageError(f"{label}: {w}x{h} = {w * h:,} pixels declared, over the limit of {max_pixels:,} "
                         f"(decompression-bomb guard)")
    return img


def open_image(source: str | bytes, name: str | None = None, *,
               max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> Image.Image:
    """Decode a file path or encoded bytes to an RGB PIL image (EXIF orientation applied), bounded in size.

    The one decoder of every image vitforge reads (datasets, `predict`, `serve` uploads). Thread-safe.

    Args:
        source: a path or the encoded bytes.
        name: how errors name the image (default: the path, or '<bytes>').
        max_pixels: refuse images with more pixels (width x height) than this, read from the header before any
            decoding; None = only PIL's own decompression-bomb limit.

    Raises:
        ImageError: the data is not a decodable image (unreadable, truncated, too large); the message starts with
            `name` (or the path).
    """
    label = name or (source if isinstance(source, str) else "<bytes>")
    img = image_header(source, label, max_pixels=max_pixels)
    try:
        with img:
            img.load()  # outside the lock: decoding runs in parallel; a truncated file raises OSError here
            with _quiet_pil():
                ImageOps.exif_transpose(img, in_place=True)
            return to_rgb(img)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ImageError(f"{label}: cannot decode image ({first_line(e)})") from None


def image_size(path: str) -> tuple[int, int] | None:
    """(width, height) from the header only, or None if the file is not a readable image."""
    try:
        with image_header(path, path, max_pixels=None) as img:
            return img.size
    except ImageError:
        return None


def is_image_file(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to RGB.

    - 16/32-bit integer and float modes (I;16, I, F) are rescaled to 0-255 (16-bit by /257, others by their range).
    - Modes with transparency (RGBA, LA, PA, P with a transparency key) are composited over white, so transparent
      regions look the same whatever colour the encoder left under them.
    - Everything else (L, 1, P, CMYK, YCbCr, LAB, HSV) goes through PIL's own conversion.
    """
    if img.mode == "RGB":
        return img
    if img.mode.startswith("I;16") or img.mode in ("I", "F"):
        return _high_depth_to_rgb(img)
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def _high_depth_to_rgb(img: Image.Image) -> Image.Image:
    arr = np.asarray(img).astype(np.float64)
    if img.mode.startswith("I;16"):
        arr = arr / 257.0
    else:
        lo, hi = float(arr.min()), float(arr.max())
        if lo >= 0 and hi <= 255:
            pass
        elif lo >= 0 and hi <= 65535:
            arr = arr / 257.0
        else:
            arr = (arr - lo) / max(hi - lo, 1e-12) * 255.0
    gray = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), mode="L")
    return gray.convert("RGB")
