"""Image decoding: every mode becomes 8-bit RGB; unreadable files raise `ImageError` naming the file."""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from vitforge.errors import first_line

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm")
ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is corrupt, not silently grey


class ImageError(Exception):
    """An image that cannot be decoded. `str(e)` is '<name>: <reason>'."""


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


def open_image(source: str | bytes, name: str | None = None, *, max_pixels: int | None = None) -> Image.Image:
    """Decode a file path or encoded bytes to an RGB PIL image (EXIF orientation applied).

    Args:
        source: a file path or the encoded bytes.
        name: how the message of an error names the image (default: the path, or "<bytes>").
        max_pixels: refuse an image whose header declares more pixels than this, before decoding it (a
            decompression bomb: a small file that would expand to gigabytes). None = PIL's own limit only.

    Raises:
        ImageError: the data is not a decodable image, or is over `max_pixels`; the message starts with `name`.
    """
    label = name or (source if isinstance(source, str) else "<bytes>")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PIL's EXIF/ICC chatter is not the user's problem
            fp = io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source
            with Image.open(fp) as img:
                w, h = img.size
                if max_pixels is not None and w * h > max_pixels:
                    raise ImageError(f"{label}: {w}x{h} = {w * h:,} pixels declared, over the limit of "
                                     f"{max_pixels:,} (decompression-bomb guard)")
                img.load()
                img = ImageOps.exif_transpose(img)
                return to_rgb(img)
    except FileNotFoundError:
        raise ImageError(f"{label}: file not found") from None
    except UnidentifiedImageError:  # its message holds the file object's repr for bytes; say it plainly
        raise ImageError(f"{label}: cannot decode image (not in an image format PIL recognises)") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        reason = first_line(e)
        raise ImageError(f"{label}: cannot decode image ({reason})") from None


def image_size(path: str) -> tuple[int, int] | None:
    """(width, height) from the header only, or None if the file is not a readable image."""
    try:
        with Image.open(path) as img:
            return img.size
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        return None
