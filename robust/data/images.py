"""Encoded image bytes -> uint8 HWC RGB, for every mode PIL opens; one exception for anything unusable.

Conversions (the reason for each is in ``_to_rgb``):

=====================  ===================================================================================
mode                   result
=====================  ===================================================================================
RGB, L, 1, YCbCr, P    PIL's ``convert("RGB")`` (grey repeated to 3 channels, palette indices to colours)
CMYK                   PIL's ``convert("RGB")``: R = (255 - C)(255 - K) / 255 (etc.); PIL reads every CMYK
                       JPEG with Adobe's inverted polarity, which libjpeg-based writers (Photoshop, PIL)
                       use and mark with the Adobe APP14 segment
anything with alpha    composited over white (RGBA, LA, PA, P or L or RGB with a ``transparency`` entry)
I;16, I;16B, ... , I   16-bit grey: round(v * 255 / 65535), v clipped to [0, 65535] (PIL opens 16-bit PNG
                       as I;16; mode I is 32-bit, read on the same 16-bit scale as PIL's PNG plugin did)
F                      float grey on PIL's 0..255 scale (as ``convert("F")`` makes it): rounded, clipped
16-bit RGB(A), LA PNG  PIL keeps the high byte, floor(v / 256): exact for 8-bit data scaled by 257, else
                       at most 1 below round(v * 255 / 65535); PIL has no 16-bit RGB mode to do better
=====================  ===================================================================================

Images over ``PIL.Image.MAX_IMAGE_PIXELS`` pixels (89.5 M by default, about 270 MB as RGB) are refused
before any pixel is decoded: PIL itself only warns up to twice that and would decode them.
"""

from __future__ import annotations

import io
import struct

import numpy as np
from PIL import Image

# White: transparent pixels' stored colours are arbitrary (often black, or leftovers of an edit), so
# dropping alpha would show them; viewers show such images over white pages, and so did the labellers.
ALPHA_BACKGROUND = (255, 255, 255)
# What PIL raises on malformed input: the exceptions Pillow's own fuzz tests accept, plus the ones
# some plugins leak (struct, index and key errors on cut or garbled headers).
_PIL_ERRORS = (OSError, SyntaxError, ValueError, EOFError, NotImplementedError, OverflowError, struct.error,
               IndexError, KeyError, Image.DecompressionBombError)


class UndecodableImage(ValueError):
    """Bytes that are not an image PIL can decode to RGB (truncated, unknown format, too many pixels)."""


def decode_image(data: bytes) -> np.ndarray:
    """Encoded image bytes -> uint8 HWC RGB array (conversions in the module docstring); UndecodableImage
    for anything that does not decode, including decompression bombs."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            limit = Image.MAX_IMAGE_PIXELS
            if limit is not None and im.width * im.height > limit:
                raise UndecodableImage(f"{im.width}x{im.height} = {im.width * im.height} pixels exceeds "
                                       f"PIL.Image.MAX_IMAGE_PIXELS = {limit} (a decompression bomb?)")
            return _to_rgb(im)
    except UndecodableImage:
        raise
    except _PIL_ERRORS as err:
        raise UndecodableImage(f"{type(err).__name__}: {err}") from err


def _to_rgb(im: Image.Image) -> np.ndarray:
    # PIL's convert("RGB") clips I and F modes to 0..255 (every 16-bit value >= 255 becomes white),
    # so those are scaled here.
    if im.mode == "F":
        return _grey_to_rgb(np.rint(np.clip(np.nan_to_num(np.asarray(im)), 0, 255)).astype(np.uint8))
    if im.mode.startswith("I"):
        v = np.clip(np.asarray(im).astype(np.int64), 0, 65535)
        return _grey_to_rgb(((v + 128) // 257).astype(np.uint8))  # round(v / 257); 257 is odd: no ties
    if im.has_transparency_data:
        background = Image.new("RGBA", im.size, (*ALPHA_BACKGROUND, 255))
        return np.asarray(Image.alpha_composite(background, im.convert("RGBA")).convert("RGB"))
    return np.asarray(im.convert("RGB"))


def _grey_to_rgb(x_HW: np.ndarray) -> np.ndarray:
    return np.repeat(x_HW[..., None], 3, axis=-1)
