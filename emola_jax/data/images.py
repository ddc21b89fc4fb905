"""CLIP image preprocessing (LLaVA-1.5's, optionally padded to a square first), in numpy + PIL.

The output equals the PIL-backed `transformers` CLIP processor (`CLIPImageProcessorPil` in
transformers 5, the historical "slow" `CLIPImageProcessor` that LLaVA-1.5 used): resize the
shortest side to S with PIL bicubic (long side `int(S * long / short)`), centre crop S x S (top-left
corner at `(size - S) // 2`), rescale by 1/255 (in float64, then float32), normalise in float32.
Rescale + normalise of a uint8 pixel depends only on its value and channel, so they are done with
a 256-entry lookup table per channel, which gives the same float32 numbers and is fast.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# LLaVA pads with the mean colour in 0-255 integers: (122, 116, 104).
PAD_COLOR = tuple(int(m * 255) for m in CLIP_MEAN)
MODES = ("pad", "crop")


def _lookup_tables() -> np.ndarray:
  values = (np.arange(256, dtype=np.float64) * (1 / 255)).astype(np.float32)
  mean = np.asarray(CLIP_MEAN, np.float32)[:, None]
  std = np.asarray(CLIP_STD, np.float32)[:, None]
  return (values[None, :] - mean) / std  # [3, 256] float32


_LUT = _lookup_tables()


class ImageDecodeError(ValueError):
  """Image bytes that PIL cannot decode."""


def decode_image(data: bytes, record_id: str = "<unknown>") -> Image.Image:
  """Decodes JPEG/PNG/... bytes to RGB (alpha dropped, like LLaVA's `.convert('RGB')`)."""
  try:
    image = Image.open(io.BytesIO(data))
    image.load()
  except Exception as e:  # PIL raises several unrelated types for bad data.
    raise ImageDecodeError(f"record {record_id!r}: cannot decode its image ({len(data)} bytes): "
                           f"{e}") from e
  return image.convert("RGB")


def expand_to_square(image: Image.Image, fill: tuple[int, int, int] = PAD_COLOR) -> Image.Image:
  """Pads the shorter side symmetrically (extra pixel after) to a square of the longer side."""
  w, h = image.size
  if w == h:
    return image
  side = max(w, h)
  out = Image.new(image.mode, (side, side), fill)
  out.paste(image, ((side - w) // 2, (side - h) // 2))
  return out


def _to_pil(image: Image.Image | np.ndarray) -> Image.Image:
  if isinstance(image, Image.Image):
    return image if image.mode == "RGB" else image.convert("RGB")
  array = np.asarray(image)
  if array.dtype != np.uint8 or array.ndim != 3 or array.shape[-1] != 3:
    raise ValueError(f"expected a PIL image or a uint8 [H, W, 3] array, got {array.dtype} "
                     f"{array.shape}")
  return Image.fromarray(array, "RGB")


def preprocess_image(image: Image.Image | np.ndarray, image_size: int,
                     mode: str = "pad") -> np.ndarray:
  """Returns CLIP pixel values, float32 [3, image_size, image_size].

  Args:
    image: a PIL image (converted to RGB) or a uint8 [H, W, 3] RGB array.
    image_size: S, the CLIP input resolution (336 for ViT-L/14-336).
    mode: "pad" pads to a square with the CLIP mean colour first (LLaVA-1.5 training), "crop" is
      plain CLIP preprocessing (resize + centre crop; the reference evaluation).
  """
  if mode not in MODES:
    raise ValueError(f"image mode {mode!r} is not one of {MODES}")
  pil = _to_pil(image)
  if mode == "pad":
    pil = expand_to_square(pil)
  w, h = pil.size
  short, long = (w, h) if w <= h else (h, w)
  new_long = int(image_size * long / short)
  size = (image_size, new_long) if w <= h else (new_long, image_size)
  if size != (w, h):
    pil = pil.resize(size, resample=Image.Resampling.BICUBIC)
  rw, rh = pil.size
  top, left = (rh - image_size) // 2, (rw - image_size) // 2
  crop = np.asarray(pil)[top:top + image_size, left:left + image_size]
  planes = np.ascontiguousarray(crop.transpose(2, 0, 1))  # uint8 CHW: cheap, makes take() fast
  return np.stack([_LUT[c].take(planes[c]) for c in range(3)])
