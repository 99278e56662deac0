"""Images in: safe opening, then Idefics3's preprocessing, pixel for pixel as transformers'
`Idefics3ImageProcessorPil` does it (Pillow and numpy only).

Per image: RGB (transparency composited onto white) -> resize so the longest edge is
`size` -> either (tiling) resize up to multiples of the tile size, cut into tiles and add the
whole image squeezed to one tile as the global view, or (no tiling) squeeze to one tile ->
x/255 -> (x - mean)/std. A batch is padded with zeros to the largest tile and the largest image
count; `pixel_attention_mask` marks the real pixels. Resizes run on uint8 images through
Pillow, as transformers does, so the filters and roundings are the same.

`open_image` is the one door for untrusted image input: it reads the header first and refuses
an image too big to decode before decoding it, so a small file that claims 20000x20000 pixels
costs no memory.
"""
from __future__ import annotations

import io
import json
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from lmforge.errors import LmforgeError

MAX_IMAGE_SIZE = 4096  # transformers' cap on the resized longest edge
# Decoding limit: 50 megapixels (a 8000x6000 photo passes); an RGBA decode of it is 200 MB.
MAX_PIXELS = 50_000_000
MAX_FILE_BYTES = 64 << 20
# Raster formats Pillow decodes itself (JPEG includes MPO, as phones write). Not EPS (Pillow hands it to Ghostscript), nor the
# rarer plugins: untrusted bytes reach only these decoders.
FORMATS = ("PNG", "JPEG", "GIF", "WEBP", "BMP", "TIFF", "ICO", "PPM", "TGA")


@dataclass
class ImageConfig:
    """The preprocessing settings of an Idefics3 / SmolVLM folder (preprocessor_config.json)."""

    longest_edge: int = 4 * 364  # `size`: the image is resized so its longest edge is this
    tile: int = 364  # `max_image_size`: the vision encoder's input side
    do_resize: bool = True
    do_image_splitting: bool = True
    resample: int = 1  # Pillow's LANCZOS
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: list = field(default_factory=lambda: [0.5, 0.5, 0.5])
    image_std: list = field(default_factory=lambda: [0.5, 0.5, 0.5])
    do_convert_rgb: bool = True

    @classmethod
    def from_dict(cls, d: dict) -> "ImageConfig":
        """Tolerant: what matters is mapped, the rest ignored (HF configs carry many keys)."""
        out = cls()
        size, tile = d.get("size") or {}, d.get("max_image_size") or {}
        if size.get("longest_edge"):
            out.longest_edge = int(size["longest_edge"])
        if tile.get("longest_edge"):
            out.tile = int(tile["longest_edge"])
        for key in ("do_resize", "do_image_splitting", "do_rescale", "do_normalize", "do_convert_rgb"):
            if key in d:
                setattr(out, key, bool(d[key]))
        for key in ("resample", "rescale_factor", "image_mean", "image_std"):
            if d.get(key) is not None:
                setattr(out, key, d[key])
        for key in ("image_mean", "image_std"):
            v = getattr(out, key)
            setattr(out, key, [float(v)] * 3 if isinstance(v, (int, float)) else [float(x) for x in v])
        return out

    @classmethod
    def from_folder(cls, folder: Path) -> "ImageConfig | None":
        """From preprocessor_config.json (hub folders), else the "image_processor" section of
        processor_config.json (what transformers 5 saves); None when neither is there."""
        for name, section in (("preprocessor_config.json", None), ("processor_config.json", "image_processor")):
            path = Path(folder) / name
            if not path.exists():
                continue
            try:
                d = json.loads(path.read_text())
                d = d.get(section) if section else d
                if isinstance(d, dict):
                    return cls.from_dict(d)
            except (json.JSONDecodeError, TypeError, ValueError, AttributeError) as e:
                raise LmforgeError(f"{path}: not a valid image processor config ({_one_line(e)})") from None
        return None


# -- opening ------------------------------------------------------------------------------------
def open_image(source, name: str | None = None, max_pixels: int = MAX_PIXELS):
    """A decoded PIL image from a path, bytes or an already open PIL image; a one-line
    LmforgeError naming the source when it is not an image Pillow reads, is SVG, claims more
    than `max_pixels` pixels (refused from the header, before decoding), or is truncated."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(source, Image.Image):
        return source
    name = name or (str(source) if isinstance(source, (str, Path)) else f"<{len(source)} bytes>")
    data = _read_source(source, name)
    head = data[:1024].lstrip().lower()
    if head.startswith(b"<svg") or (head.startswith(b"<?xml") and b"<svg" in head) or b"<svg" in head[:256]:
        raise LmforgeError(f"image {name}: SVG is not supported (send PNG, JPEG, WebP or GIF)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # we check the size ourselves
            img = Image.open(io.BytesIO(data), formats=FORMATS)  # reads the header only
            w, h = img.size
            if w * h > max_pixels:
                raise LmforgeError(f"image {name}: {w}x{h} pixels is too large (limit {max_pixels:,} pixels)")
            img.load()
    except LmforgeError:
        raise
    except Image.DecompressionBombError:  # Pillow's own limit (2x its MAX_IMAGE_PIXELS), met in the header
        raise LmforgeError(f"image {name}: too large (over {2 * (Image.MAX_IMAGE_PIXELS or 0):,} pixels; "
                           f"limit {max_pixels:,} pixels)") from None
    except UnidentifiedImageError:
        raise LmforgeError(f"image {name}: not an image file lmforge reads ({', '.join(FORMATS)})") from None
    except (OSError, SyntaxError, ValueError, EOFError, MemoryError) as e:  # truncated or corrupt data
        raise LmforgeError(f"image {name}: truncated or corrupt ({_one_line(e)})") from None
    return img


def _read_source(source, name: str) -> bytes:
    if isinstance(source, (bytes, bytearray, memoryview)):
        return bytes(source)
    if not isinstance(source, (str, Path)):
        raise LmforgeError(f"image {name}: expected a path, bytes or a PIL image, got {type(source).__name__}")
    path = Path(source)
    if not path.is_file():
        raise LmforgeError(f"image {name}: no such file")
    if path.stat().st_size > MAX_FILE_BYTES:
        raise LmforgeError(f"image {name}: {path.stat().st_size:,} bytes is too large (limit {MAX_FILE_BYTES:,} bytes)")
    return path.read_bytes()


def _one_line(e: Exception) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def to_rgb(img) -> np.ndarray:
    """uint8 [H, W, 3]: transparency (an alpha band, or a palette/greyscale transparent colour)
    composited onto white, every other mode converted by Pillow (transformers' `convert_to_rgb`)."""
    from PIL import Image

    if "A" in img.getbands() or img.info.get("transparency") is not None:
        img = img.convert("RGBA")
        white = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, img)
    return np.array(img.convert("RGB"))


# -- sizes (transformers' arithmetic, roundings included) ----------------------------------------
def fit_longest_edge(height: int, width: int, longest: int) -> tuple[int, int]:
    """Resize target with the longest edge at `longest` (the other edge rounded up to even), then
    capped at MAX_IMAGE_SIZE."""
    aspect = width / height
    if width >= height:
        width, height = longest, int(longest / aspect)
        height += height % 2
    else:
        height, width = longest, int(longest * aspect)
        width += width % 2
    height, width = max(height, 1), max(width, 1)
    aspect = width / height
    if width >= height and width > MAX_IMAGE_SIZE:
        width, height = MAX_IMAGE_SIZE, int(MAX_IMAGE_SIZE / aspect)
    elif height > width and height > MAX_IMAGE_SIZE:
        height, width = MAX_IMAGE_SIZE, int(MAX_IMAGE_SIZE * aspect)
    return max(height, 1), max(width, 1)


def fit_tiles(height: int, width: int, tile: int) -> tuple[int, int]:
    """Resize target whose sides are multiples of `tile` (the longer side rounded up first)."""
    aspect = width / height
    if width >= height:
        width = math.ceil(width / tile) * tile
        height = math.ceil(int(width / aspect) / tile) * tile
    else:
        height = math.ceil(height / tile) * tile
        width = math.ceil(int(height * aspect) / tile) * tile
    return height, width


# -- one image -> tiles --------------------------------------------------------------------------
def _resize(img: np.ndarray, height: int, width: int, resample: int) -> np.ndarray:
    from PIL import Image

    return np.array(Image.fromarray(img).resize((width, height), resample=resample))


def image_tiles(img, cfg: ImageConfig) -> tuple[list[np.ndarray], int, int]:
    """(uint8 [H, W, 3] tiles, rows, cols) of one PIL image: rows x cols tiles, then the global
    view; (0, 0) when the image fits one tile (then the global view is the only tile)."""
    arr = to_rgb(img) if cfg.do_convert_rgb else np.array(img)
    if cfg.do_resize:
        arr = _resize(arr, *fit_longest_edge(arr.shape[0], arr.shape[1], cfg.longest_edge), cfg.resample)
    t = cfg.tile
    if not cfg.do_image_splitting:
        return [_resize(arr, t, t, cfg.resample)], 0, 0
    arr = _resize(arr, *fit_tiles(arr.shape[0], arr.shape[1], t), cfg.resample)
    h, w = arr.shape[:2]
    if h <= t and w <= t:
        return [arr], 0, 0
    rows, cols = (h - t) // t + 1, (w - t) // t + 1
    tiles = [arr[r * t:(r + 1) * t, c * t:(c + 1) * t] for r in range(rows) for c in range(cols)]
    return tiles + [_resize(arr, t, t, cfg.resample)], rows, cols


def _normalize(tile: np.ndarray, cfg: ImageConfig) -> np.ndarray:
    """float32 [3, H, W]; float64 rescale then float32 normalisation, as transformers rounds."""
    x = np.moveaxis(tile, -1, 0)
    if cfg.do_rescale:
        x = (x.astype(np.float64) * cfg.rescale_factor).astype(np.float32)
    if cfg.do_normalize:
        x = x.astype(np.float32) if not np.issubdtype(x.dtype, np.floating) else x
        mean, std = np.array(cfg.image_mean, dtype=x.dtype), np.array(cfg.image_std, dtype=x.dtype)
        x = (x - mean[:, None, None]) / std[:, None, None]
    return x.astype(np.float32, copy=False)


@dataclass
class ImageBatch:
    """The model's image input: pixel_values [B, N, 3, H, W] float32 (zero-padded: tiles to the
    largest, rows to the most tiles), pixel_attention_mask [B, N, H, W] bool (True = a real
    pixel), and each image's tile grid (rows, cols), per prompt, for the prompt's image tokens."""

    pixel_values: torch.Tensor
    pixel_attention_mask: torch.Tensor
    grids: list[list[tuple[int, int]]]


def preprocess_images(images: list, cfg: ImageConfig | None = None) -> ImageBatch:
    """`images`: one list of images per prompt (or a flat list: one prompt). An image is a PIL
    image, a path or bytes (opened with `open_image`)."""
    cfg = cfg or ImageConfig()
    if images and not isinstance(images[0], (list, tuple)):
        images = [images]
    per_prompt, grids = [], []
    for prompt_images in images:
        tiles, grid = [], []
        for img in prompt_images:
            t, rows, cols = image_tiles(open_image(img), cfg)
            tiles += [_normalize(x, cfg) for x in t]
            grid.append((rows, cols))
        per_prompt.append(tiles)
        grids.append(grid)
    if not any(per_prompt):
        raise LmforgeError("no images to preprocess")
    n = max(len(p) for p in per_prompt)
    H = max(t.shape[1] for p in per_prompt for t in p)
    W = max(t.shape[2] for p in per_prompt for t in p)
    pixels = torch.zeros(len(per_prompt), n, 3, H, W)
    mask = torch.zeros(len(per_prompt), n, H, W, dtype=torch.bool)
    for b, p in enumerate(per_prompt):
        for j, t in enumerate(p):
            pixels[b, j, :, : t.shape[1], : t.shape[2]] = torch.from_numpy(t)
            mask[b, j, : t.shape[1], : t.shape[2]] = True
    return ImageBatch(pixels, mask, grids)
