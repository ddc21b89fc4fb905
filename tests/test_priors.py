"""Tests for the landmark prior providers (npy, dlib, face_alignment) on real photos."""

import pickle

import matplotlib.cbook
import numpy as np
import pytest
import skimage.data
from PIL import Image

from emola_jax.data import priors

ASTRONAUT = Image.fromarray(skimage.data.astronaut())
with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as _f:
  HOPPER = Image.open(_f).convert("RGB")
GREY = Image.new("RGB", (320, 240), (128, 128, 128))
PHOTOS = {"astronaut": ASTRONAUT, "grace_hopper": HOPPER}

# dlib's 68-point layout (iBUG 300-W): jaw 0-16, brows 17-26, nose 27-35, eyes 36-47, mouth 48-67.
EYES, MOUTH, NOSE_TIP, JAW = slice(36, 48), slice(48, 68), 30, slice(0, 17)


@pytest.fixture(scope="module")
def dlib_prior():
  return priors.make_prior_provider("dlib")


def test_npy_passes_the_stored_vector_through():
  provider = priors.make_prior_provider("npy", prior_dim=212)
  stored = np.linspace(0, 191, 212).astype(np.float64)  # raw 2d106det pixels, not normalised
  out = provider(ASTRONAUT, stored, record_id="AffectNet/x")
  assert out.dtype == np.float32 and out.shape == (212,)
  np.testing.assert_array_equal(out, stored.astype(np.float32))
  with pytest.raises(priors.MissingPriorError, match="AffectNet/x"):
    provider(ASTRONAUT, np.zeros((0,), np.float32), record_id="AffectNet/x")
  with pytest.raises(priors.MissingPriorError, match="AffectNet/y"):
    provider(ASTRONAUT, None, record_id="AffectNet/y")
  with pytest.raises(priors.MissingPriorError, match="136 values"):
    provider(ASTRONAUT, np.zeros(136), record_id="z")


@pytest.mark.parametrize("name", sorted(PHOTOS))
def test_dlib_landmarks_on_real_faces(dlib_prior, name):
  image = PHOTOS[name]
  points, box = dlib_prior.landmarks(image, record_id=name)
  w, h = image.size
  assert points.shape == (68, 2)
  # The face box is a plausible face: inside the image, a sizeable square-ish region.
  assert 0 <= box.left and box.left + box.width <= w + 1 and 0 <= box.top
  assert 0.1 * w < box.width < 0.9 * w and 0.7 < box.width / box.height < 1.4
  # Anatomy: eyes above the nose tip above the mouth; the mouth is between the jaw's ends.
  eyes_y, mouth_y = points[EYES, 1].mean(), points[MOUTH, 1].mean()
  assert eyes_y < points[NOSE_TIP, 1] < mouth_y
  jaw_x, mouth_x = points[JAW, 0], points[MOUTH, 0]
  assert jaw_x.min() < mouth_x.min() < mouth_x.max() < jaw_x.max()
  # Left eye (36-41, image left) left of the right eye (42-47).
  assert points[36:42, 0].mean() < points[42:48, 0].mean()
  # Default frame: the square around the landmarks -> every value in [0, 1], proportions kept.
  vector = dlib_prior(image, None, record_id=name)
  assert vector.dtype == np.float32 and vector.shape == (136,)
  low, high = points.min(0), points.max(0)
  side = (high - low).max()
  expected = (points - ((low + high) / 2 - side / 2)) / side
  np.testing.assert_allclose(vector.reshape(68, 2), expected, atol=1e-6)
  assert vector.min() >= 0 and vector.max() <= 1 and np.isclose(vector.max(), 1)
  # frame="box": the detector box; inner face points (brows, eyes, nose, mouth) lie inside it.
  boxed = priors.make_prior_provider("dlib", frame="box")(image, None).reshape(68, 2)
  np.testing.assert_allclose(boxed, (points - [box.left, box.top]) / [box.width, box.height],
                             atol=1e-6)
  assert ((boxed[17:] > 0) & (boxed[17:] < 1)).all()


@pytest.mark.parametrize("name", sorted(PHOTOS))
def test_dlib_prior_is_resolution_invariant(dlib_prior, name):
  image = PHOTOS[name]
  w, h = image.size
  ref = dlib_prior(image, None)
  for factor in (0.75, 1.5):
    other = image.resize((int(w * factor), int(h * factor)), Image.Resampling.BICUBIC)
    diff = np.abs(dlib_prior(other, None) - ref)
    assert diff.mean() < 0.03 and diff.max() < 0.08, (factor, diff.mean(), diff.max())


def test_dlib_without_detection_normalises_by_the_image():
  # An aligned-crop-like input: the astronaut's face with a margin, landmarks in image units.
  crop = ASTRONAUT.crop((150, 50, 290, 190))
  provider = priors.make_prior_provider("dlib", detect=False, frame="box")
  xy = provider(crop, None).reshape(68, 2)
  assert ((xy > 0) & (xy < 1)).all()
  assert xy[EYES, 1].mean() < xy[MOUTH, 1].mean()
  bigger = provider(crop.resize((280, 280), Image.Resampling.BICUBIC), None).reshape(68, 2)
  assert np.abs(bigger - xy).mean() < 0.02
  # No detection asked: it runs on a face-free image too (unlike detect=True).
  assert np.isfinite(provider(GREY, None)).all()


def test_no_face_raises_naming_the_image(dlib_prior):
  with pytest.raises(priors.NoFaceError, match="grey-0001"):
    dlib_prior(GREY, None, record_id="grey-0001")


def test_provider_pickles_after_use(dlib_prior):
  dlib_prior(ASTRONAUT, None)
  clone = pickle.loads(pickle.dumps(dlib_prior))
  np.testing.assert_array_equal(clone(ASTRONAUT, None), dlib_prior(ASTRONAUT, None))


def test_unknown_provider():
  with pytest.raises(ValueError, match="dlib"):
    priors.make_prior_provider("insightface")
  assert priors.make_prior_provider("none")(ASTRONAUT, None).shape == (0,)


# --- face_alignment (FAN) --------------------------------------------------------------------


def test_decode_heatmaps_hand_computed():
  hm = np.zeros((68, 64, 64), np.float32)
  hm[0, 30, 20] = 1.0  # landmark 0: peak at x=20, y=30, symmetric neighbours: no quarter shift
  hm[1, 10, 40] = 1.0  # landmark 1: peak at x=40, y=10, right and lower neighbours larger
  hm[1, 10, 41] = 0.5
  hm[1, 11, 40] = 0.5
  hm[2, 0, 5] = 1.0  # landmark 2: on the border row: no shift
  hm[2, 0, 6] = 0.5
  center, scale = np.array([100.0, 120.0]), 1.5
  side = 200 * scale  # the crop spans 300 px; one heatmap pixel = 300 / 64 px
  out = priors.decode_heatmaps(hm, center, scale)

  def to_image(x, y):
    return [x * side / 64 - side / 2 + center[0], y * side / 64 - side / 2 + center[1]]

  np.testing.assert_allclose(out[0], to_image(20.5, 30.5))
  np.testing.assert_allclose(out[1], to_image(40.75, 10.75))
  np.testing.assert_allclose(out[2], to_image(5.5, 0.5))


def test_heatmap_peaks_match_face_alignment():
  from face_alignment import utils as fa_utils
  rng = np.random.default_rng(0)
  hm = rng.random((1, 68, 64, 64)).astype(np.float32)
  hm[0, 3, 0, 10] = 2.0  # a peak on the border (no quarter shift)
  idx = np.argmax(hm.reshape(1, 68, -1), axis=-1)
  # face_alignment's decoder run as plain Python (`py_func`: skips numba's slow compilation).
  decode = fa_utils._get_preds_fromhm.py_func  # pylint: disable=protected-access
  expected, _ = decode(hm, idx, None, None)
  np.testing.assert_allclose(priors.heatmap_peaks(hm[0]), expected[0], atol=1e-6)


@pytest.fixture(scope="module")
def fan_weights(tmp_path_factory):
  import torch
  from face_alignment.models import FAN
  torch.manual_seed(0)
  path = tmp_path_factory.mktemp("fan") / "fan_random.pth"
  torch.save(FAN(1).state_dict(), path)  # one hourglass instead of four, for speed
  return str(path)


def test_face_alignment_with_random_fan_weights(fan_weights):
  # flip_input=False: each FAN forward takes seconds on a small CPU; two are run here.
  provider = priors.make_prior_provider("face_alignment", weights_path=fan_weights,
                                        flip_input=False)
  assert provider.prior_dim == 136
  points, box = provider.landmarks(HOPPER)
  vector = provider(HOPPER, None, record_id="hopper")
  assert vector.dtype == np.float32 and vector.shape == (136,) and np.isfinite(vector).all()
  np.testing.assert_array_equal(vector, provider.normalise(points, box, "hopper"))
  assert vector.min() >= 0 and vector.max() <= 1
  # Whatever the (random) network says, decoded points lie in the 256-px crop around the face,
  # which spans 200 * scale pixels, scale = (w + h) / 195, centred 12% of h above the box centre.
  side = 200 * (box.width + box.height) / 195
  cx, cy = box.left + box.width / 2, box.top + box.height / 2 - 0.12 * box.height
  assert (np.abs(points - [cx, cy]) <= side / 2).all()
  # The face box is dlib's, around the face.
  assert box.left < 300 < box.left + box.width and box.top < 250 < box.top + box.height
  boxed = priors.make_prior_provider("face_alignment", weights_path=fan_weights, frame="box")
  np.testing.assert_allclose(boxed.normalise(points, box, "hopper").reshape(68, 2),
                             (points - [box.left, box.top]) / [box.width, box.height], atol=1e-6)
  with pytest.raises(priors.NoFaceError, match="grey"):
    provider(GREY, None, record_id="grey")
  clone = pickle.loads(pickle.dumps(provider))
  assert clone.weights_path == fan_weights
  assert clone._net is None  # pylint: disable=protected-access


def test_face_alignment_missing_weights_says_how_to_get_them(tmp_path):
  with pytest.raises(FileNotFoundError, match=r"2DFAN4.*weights_path|weights_path.*2DFAN4"):
    priors.make_prior_provider("face_alignment", weights_path=str(tmp_path / "absent.pth"))
