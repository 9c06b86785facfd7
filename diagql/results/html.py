"""A Result as HTML for Jupyter: its table as the rich rendering draws it, then thumbnails of
the items a TOPK k INPUTS answer ranks (tokens for text), or heat maps of a conv map's
neurons for AVG and ARGMAX; images are inline PNGs encoded here, without a plotting library.
"""
from __future__ import annotations

import base64
import html
import re
import struct
import zlib

import numpy as np

from diagql.results.formats import probability_text

THUMBNAIL = 84  # pixels a thumbnail's longer side is shown at
HEAT_CELL = 6  # pixels per neuron in a heat map
MAX_MAPS = 64  # channels drawn as heat maps


def page(result, table_html: str) -> str:
    """The whole HTML: the table (rich's export), then pictures where the result has them."""
    extra = ""
    if result.ranked is not None:
        extra = _thumbnails(result)
    elif result.kind in ("avg", "argmax") and result.groups is None:
        extra = _heat_maps(result)
    return table_html + extra


# --- thumbnails -------------------------------------------------------------------------------


def _thumbnails(result) -> str:
    ranked = result.ranked
    cells = []
    for j, item in enumerate(result.items.tolist()):
        preview = ranked.previews[j] if j < len(ranked.previews) else None
        label = "" if ranked.labels is None else f"label {int(ranked.labels[j])} · "
        caption = (f"#{j + 1} item {item}<br>{label}pred {int(ranked.predictions[j])} "
                   f"({probability_text(ranked.confidence[j])})<br>{float(result.values[j]):.4g}")
        if isinstance(preview, np.ndarray):
            picture = _img(gray_or_rgb(preview), THUMBNAIL)
        elif isinstance(preview, list):
            picture = (f"<div style=\"font-family:monospace;font-size:11px;max-width:220px\">"
                       f"{html.escape(' '.join(preview))}</div>")
        else:
            picture = ""
        cells.append(f"<figure style=\"margin:4px;text-align:center;font-size:11px\">{picture}"
                     f"<figcaption>{caption}</figcaption></figure>")
    return ("<div style=\"display:flex;flex-wrap:wrap;align-items:flex-end\">"
            + "".join(cells) + "</div>")


def gray_or_rgb(image: np.ndarray) -> np.ndarray:
    """An input image scaled to 0..255 uint8 over its own range (its values may be
    normalised: only their order matters to the eye)."""
    image = np.nan_to_num(np.asarray(image, dtype=np.float64))
    low, high = float(image.min()), float(image.max())
    scaled = (image - low) / (high - low) if high > low else np.zeros_like(image)
    return np.round(scaled * 255).astype(np.uint8)


# --- heat maps ---------------------------------------------------------------------------------

_LABEL = re.compile(r"\[(\d+(?:,\d+)*)\]$")


def map_shape(labels: list[str]) -> tuple[int, ...] | None:
    """The (channels, height, width) of a conv map from its neurons' labels in index order
    (the last one is the largest coordinate), or None for a layer that is not one."""
    match = _LABEL.search(labels[-1]) if labels else None
    if match is None:
        return None
    shape = tuple(int(c) + 1 for c in match.group(1).split(","))
    if len(shape) != 3 or int(np.prod(shape)) != len(labels):
        return None
    return shape


def _heat_maps(result) -> str:
    shape = map_shape(result.labels)
    if shape is None:
        return ""
    values = np.asarray(result.values, dtype=np.float64).reshape(shape)
    top = float(np.nanmax(np.abs(values))) or 1.0
    cells = []
    for c in range(min(shape[0], MAX_MAPS)):
        cells.append(f"<figure style=\"margin:3px;text-align:center;font-size:10px\">"
                     f"{_img(heat(values[c], top), HEAT_CELL * max(shape[1:]))}"
                     f"<figcaption>{html.escape(result.layer or '')}[{c}]</figcaption></figure>")
    more = (f"<div style=\"font-size:11px\">… {shape[0] - MAX_MAPS} more channels</div>"
            if shape[0] > MAX_MAPS else "")
    return ("<div style=\"font-size:11px\">per neuron, blue negative, red positive, "
            f"full colour at ±{top:.4g}</div><div style=\"display:flex;flex-wrap:wrap\">"
            + "".join(cells) + "</div>" + more)


def heat(values: np.ndarray, top: float) -> np.ndarray:
    """(H, W, 3) uint8: white at 0, red toward +top, blue toward -top."""
    share = np.clip(np.nan_to_num(values) / top, -1, 1)
    fade = np.round(255 * (1 - np.abs(share))).astype(np.uint8)
    rgb = np.full(values.shape + (3,), 255, dtype=np.uint8)
    rgb[..., 1] = fade
    rgb[..., 2] = np.where(share > 0, fade, 255)
    rgb[..., 0] = np.where(share < 0, fade, 255)
    return rgb


# --- PNG ----------------------------------------------------------------------------------------


def _img(pixels: np.ndarray, size: int) -> str:
    height, width = pixels.shape[:2]
    scale = size / max(height, width)
    return (f"<img src=\"data:image/png;base64,{base64.b64encode(png(pixels)).decode()}\" "
            f"width=\"{round(width * scale)}\" height=\"{round(height * scale)}\" "
            f"style=\"image-rendering:pixelated\">")


def png(pixels: np.ndarray) -> bytes:
    """A PNG of (H, W) gray or (H, W, 3) RGB uint8 pixels."""
    pixels = np.ascontiguousarray(pixels, dtype=np.uint8)
    height, width = pixels.shape[:2]
    color = 2 if pixels.ndim == 3 else 0
    rows = pixels.reshape(height, -1)
    raw = b"".join(b"\x00" + rows[i].tobytes() for i in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

    header = struct.pack(">IIBBBBB", width, height, 8, color, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw))
            + chunk(b"IEND", b""))
