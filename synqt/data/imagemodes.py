"""Every image mode Pillow opens, to 8-bit RGB by the mode's real value range, or refused.

Pillow's ``convert("RGB")`` is right for the 8-bit modes (1, L, LA, P, PA, RGBA, RGBX, CMYK,
YCbCr, LAB, HSV) but clips the wide ones: a 16-bit PNG (mode ``I;16``) with values 0..65535
becomes white wherever a value exceeds 255, so dark and bright images look alike. Those modes
are mapped here by their range instead:

- ``I;16``, ``I;16L``, ``I;16B``, ``I;16N`` (16-bit PNG, TIFF): 0..65535 -> 0..255 (x 255/65535, rounded).
- ``I`` (32-bit integer storage): from PNG or PPM/PGM (which Pillow scales to 16 bits) or from a TIFF
  whose BitsPerSample is at most 16: 0..2**bits-1 -> 0..255. Otherwise the range is unknown: refused.
- ``F`` (32-bit float): values in [0, 1] -> 0..255. Values outside [0, 1] (or NaN) are refused.

48- and 64-bit PNGs open as RGB / RGBA already reduced to 8 bits by Pillow (the high byte).
Any other mode is refused with a ``DataError`` naming the file and the mode.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image

from synqt.errors import DataError

# Pillow converts these to RGB correctly by itself (colour-space maths or channel drop).
PILLOW_TO_RGB = ("1", "L", "LA", "P", "PA", "RGBA", "RGBX", "RGBa", "CMYK", "YCbCr", "LAB", "HSV")
UINT16_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
# How each mode becomes RGB, as `synqt data check --decode` reports it.
HOW = {
    "RGB": "as is",
    "1": "bilevel -> 0/255",
    "L": "gray replicated",
    "LA": "gray replicated, alpha dropped",
    "La": "un-premultiplied, gray replicated, alpha dropped",
    "P": "palette looked up",
    "PA": "palette looked up, alpha dropped",
    "RGBA": "alpha dropped",
    "RGBa": "un-premultiplied, alpha dropped",
    "RGBX": "padding dropped",
    "CMYK": "Pillow CMYK -> RGB",
    "YCbCr": "Pillow YCbCr -> RGB",
    "LAB": "Pillow CIELAB -> sRGB",
    "HSV": "Pillow HSV -> RGB",
    "F": "float [0, 1] x 255",
    "I": "integer range scaled to 8 bits",
    **{m: "16-bit range 0..65535 scaled to 0..255" for m in UINT16_MODES},
}
# Modes whose values are rescaled (not just a Pillow conversion): `data check --decode` lists them.
RESCALED = ("F", "I", *UINT16_MODES)


def _gray_to_rgb(values: np.ndarray) -> Image.Image:
    v = np.clip(np.rint(values), 0, 255).astype(np.uint8)
    return Image.fromarray(v, mode="L").convert("RGB")


def _int_bits(im: Image.Image) -> int | None:
    """Significant bits of a mode-I image, when the file format says; None when it does not."""
    if im.format in ("PNG", "PPM"):
        return 16
    tags = getattr(im, "tag_v2", None)
    if tags is not None:
        bits = tags.get(258)  # BitsPerSample
        bits = bits[0] if isinstance(bits, tuple) else bits
        if isinstance(bits, int) and 1 <= bits <= 16:
            return bits
    return None


def to_rgb(im: Image.Image, path: str | Path) -> Image.Image:
    """``im`` as an 8-bit RGB image, each mode mapped by its value range (module docstring).

    Raises DataError naming ``path``, the mode and the values found when no mapping is known.
    """
    mode = im.mode
    if mode == "RGB":
        return im.convert("RGB")  # loads the pixels; a copy detached from the open file
    if mode in PILLOW_TO_RGB:
        if mode == "P" and "transparency" in im.info:
            # same colours; going through RGBA avoids Pillow's "Palette images with Transparency" warning
            return im.convert("RGBA").convert("RGB")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            return im.convert("RGB")
    if mode == "La":
        return im.convert("LA").convert("RGB")  # Pillow has no La -> RGB; La -> LA un-premultiplies
    if mode in UINT16_MODES:
        return _gray_to_rgb(np.asarray(im).astype(np.float64) * (255.0 / 65535.0))
    if mode == "I":
        arr = np.asarray(im).astype(np.float64)
        bits = _int_bits(im)
        lo, hi = (float(arr.min()), float(arr.max())) if arr.size else (0.0, 0.0)
        if bits is None or lo < 0 or hi > 2**bits - 1:
            expect = f"0..{2**bits - 1} for {bits}-bit data" if bits else "a file format that states the bit depth"
            raise DataError(
                f"image {path}: mode I (32-bit integer, {im.format or 'unknown format'}) with values in "
                f"[{lo:g}, {hi:g}]: no 8-bit mapping is known (expected {expect}); save it as an 8- or 16-bit PNG"
            )
        return _gray_to_rgb(arr * (255.0 / (2**bits - 1)))
    if mode == "F":
        arr = np.asarray(im).astype(np.float64)
        finite = bool(np.isfinite(arr).all())
        lo, hi = (float(np.nanmin(arr)), float(np.nanmax(arr))) if arr.size and not np.isnan(arr).all() else (0, 0)
        if not finite or lo < 0.0 or hi > 1.0:
            found = f"values in [{lo:g}, {hi:g}]" + ("" if finite else " and NaN/inf")
            raise DataError(
                f"image {path}: mode F (32-bit float) with {found}; expected values in [0, 1] "
                "(save it as an 8- or 16-bit PNG, or scale it to [0, 1])"
            )
        return _gray_to_rgb(arr * 255.0)
    raise DataError(
        f"image {path}: mode {mode!r} has no known conversion to 8-bit RGB; expected one of "
        f"RGB, {', '.join(PILLOW_TO_RGB)}, La, I, F, {', '.join(UINT16_MODES)}"
    )
