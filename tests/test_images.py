"""Tests for CLIP image preprocessing against the PIL-backed `transformers` CLIP processor.

The reference is `transformers.CLIPImageProcessorPil` (transformers 5's PIL backend, the former
"slow" `CLIPImageProcessor` that LLaVA-1.5 used), not the torchvision-backed `CLIPImageProcessor`.
"""

import io

import matplotlib.cbook
import numpy as np
import pytest
import skimage.data
import transformers
from PIL import Image

from emola_jax.data import images


def _photos():
  astronaut = Image.fromarray(skimage.data.astronaut())  # 512 x 512
  with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as f:
    hopper = Image.open(f).convert("RGB")  # 512 wide x 600 high
  return {
      "astronaut": astronaut,
      "grace_hopper": hopper,
      "hopper_wide": hopper.crop((0, 0, 512, 301)),  # odd sizes exercise rounding in crop/pad
      "astronaut_small": astronaut.resize((97, 80)),  # upscaling
  }


PHOTOS = _photos()


def _reference(image, size):
  processor = transformers.CLIPImageProcessorPil(size={"shortest_edge": size},
                                                 crop_size={"height": size, "width": size})
  return processor(images=image, return_tensors="np")["pixel_values"][0]


@pytest.mark.parametrize("name", sorted(PHOTOS))
@pytest.mark.parametrize("size", [336, 224, 64])
def test_crop_mode_matches_clip_processor(name, size):
  image = PHOTOS[name]
  ours = images.preprocess_image(image, size, mode="crop")
  assert ours.dtype == np.float32 and ours.shape == (3, size, size)
  np.testing.assert_allclose(ours, _reference(image, size), rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", sorted(PHOTOS))
@pytest.mark.parametrize("size", [336, 224, 64])
def test_pad_mode_matches_pad_then_clip_processor(name, size):
  image = PHOTOS[name]
  # The reference pad: LLaVA's square canvas in the mean colour, image centred.
  w, h = image.size
  side = max(w, h)
  canvas = Image.new("RGB", (side, side), (122, 116, 104))
  canvas.paste(image, ((side - w) // 2, (side - h) // 2))
  np.testing.assert_allclose(images.preprocess_image(image, size, mode="pad"),
                             _reference(canvas, size), rtol=0, atol=1e-5)


def test_pad_colour_and_layout():
  # A 4x2 white image padded to 4x4: rows 0 and 3 are the mean colour, rows 1-2 white.
  square = np.asarray(images.expand_to_square(Image.new("RGB", (4, 2), (255, 255, 255))))
  assert square.shape == (4, 4, 3)
  assert (square[[0, 3]] == (122, 116, 104)).all() and (square[1:3] == 255).all()
  # The mean colour normalises to (nearly) zero: that is why LLaVA pads with it.
  pixels = images.preprocess_image(Image.new("RGB", (8, 8), (122, 116, 104)), 8, mode="crop")
  assert np.abs(pixels).max() < 0.012


def test_array_input_and_decode():
  array = skimage.data.astronaut()
  np.testing.assert_array_equal(images.preprocess_image(array, 64, "crop"),
                                images.preprocess_image(Image.fromarray(array), 64, "crop"))
  buf = io.BytesIO()
  Image.fromarray(array).convert("RGBA").save(buf, format="PNG")
  decoded = images.decode_image(buf.getvalue())
  assert decoded.mode == "RGB" and np.array_equal(np.asarray(decoded), array)
  with pytest.raises(images.ImageDecodeError, match="rec-3"):
    images.decode_image(b"not an image", record_id="rec-3")
  with pytest.raises(ValueError, match="uint8"):
    images.preprocess_image(array.astype(np.float32), 64)
  with pytest.raises(ValueError, match="mode"):
    images.preprocess_image(array, 64, mode="stretch")
