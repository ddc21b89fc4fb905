"""Face-landmark prior providers: one interface, chosen by name in the config.

- `npy`: the precomputed vector stored with the example (`prior` field). FABA-Instruct ships 212-d
  vectors: 106 landmarks x (x, y), the raw output of InsightFace's 2d106det model, passed through
  unchanged (the reference does).
- `dlib`: 68 landmarks from dlib's shape predictor (the model file shipped by the
  `face-recognition-models` package) in dlib's frontal-face-detector box -> 136-d.
- `face_alignment`: 68 landmarks from the `face-alignment` library's 2D FAN network -> 136-d;
  its weights are a local file (`weights_path=`), never downloaded here.
- `none`: an empty vector, for models without a prior token.

Computed landmarks are normalised to [0, 1] so the vector does not depend on resolution, in one of
two frames (`frame=`):
- "landmarks" (default): the square around the landmarks themselves (centred on their bounding
  box, side = its longer extent), so x and y keep their proportions. Invariant to resolution and to
  where the face sits in the image, and immune to detector jitter: on the test photos dlib's HOG
  box size varies by up to 15% across resolutions while its landmarks move by ~1% of the face.
- "box": the detector's face box (`detect=True`) or the whole image (`detect=False`, for aligned
  face crops); landmarks may fall slightly outside a detector box.
Faces are detected when `detect=True`; no face found -> `NoFaceError`, never a zero prior.
Providers load their models lazily and drop them when pickled, so they travel to Grain workers.
"""

from __future__ import annotations

import abc
import importlib.util
import os
import threading
from typing import Any

import numpy as np
from PIL import Image

NUM_68 = 68
FAN_CROP = 256  # FAN input resolution (face_alignment's CROP_RESOLUTION).
FAN_HEATMAP = 64  # FAN heatmap resolution.
FAN_REFERENCE_SCALE = 195.0  # face_alignment: scale = (box width + height) / 195.
FAN_CENTER_Y_OFFSET = 0.12  # face_alignment moves the box centre up by 12% of its height.


class NoFaceError(ValueError):
  """The face detector found no face in an image."""


class MissingPriorError(ValueError):
  """An example has no precomputed prior, or one of the wrong size."""


class PriorProvider(abc.ABC):
  """Maps (image, the example's stored prior) to the prior vector, float32 [prior_dim]."""

  prior_dim: int

  @abc.abstractmethod
  def __call__(self, image: Image.Image | None, record_prior: np.ndarray | None,
               record_id: str = "<unknown>") -> np.ndarray:
    """Returns the prior of one example; errors name `record_id`."""

  # Models are loaded on first use (in the worker process) and not pickled.
  _LAZY: tuple[str, ...] = ()

  def __getstate__(self) -> dict[str, Any]:
    state = dict(self.__dict__)
    for name in self._LAZY + ("_lock",):
      state[name] = None
    return state

  def __setstate__(self, state: dict[str, Any]) -> None:
    self.__dict__.update(state)
    self._lock = threading.Lock()


class NoPrior(PriorProvider):
  """No prior token: an empty vector."""

  prior_dim = 0

  def __call__(self, image, record_prior, record_id="<unknown>"):
    return np.zeros((0,), np.float32)


class NpyPrior(PriorProvider):
  """The vector precomputed for the example (the `prior` field of a shard record)."""

  def __init__(self, prior_dim: int = 212):
    self.prior_dim = int(prior_dim)

  def __call__(self, image, record_prior, record_id="<unknown>"):
    if record_prior is None or np.size(record_prior) == 0:
      raise MissingPriorError(
          f"record {record_id!r} has no precomputed prior (its `prior` field is empty); prepare "
          "the shards with the landmark files, or choose a computed prior (dlib, face_alignment)")
    vector = np.asarray(record_prior, np.float32).reshape(-1)
    if vector.size != self.prior_dim:
      raise MissingPriorError(f"record {record_id!r}: its prior has {vector.size} values, the "
                              f"model expects prior_dim={self.prior_dim}")
    return vector


def dlib_model_path(name: str = "shape_predictor_68_face_landmarks.dat") -> str:
  """Path of a model file shipped by the `face-recognition-models` package.

  Its own `pose_predictor_model_location()` needs `pkg_resources`, which setuptools >= 81 no longer
  ships, so the file is located from the package directory without importing the package.
  """
  spec = importlib.util.find_spec("face_recognition_models")
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError("the dlib landmark model comes with the `face-recognition-models` "
                            "package: pip install 'emola-jax[landmarks]'")
  path = os.path.join(list(spec.submodule_search_locations)[0], "models", name)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} is missing; reinstall face-recognition-models")
  return path


_SHARED: dict[tuple[str, ...], Any] = {}
_SHARED_LOCK = threading.Lock()


def _shared(key: tuple[str, ...], factory) -> tuple[Any, threading.Lock]:
  """One instance per process of a loaded model (the dlib predictor file alone is 100 MB), with a
  lock that serialises calls to it (Grain may call a provider from several reader threads)."""
  with _SHARED_LOCK:
    if key not in _SHARED:
      _SHARED[key] = (factory(), threading.Lock())
    return _SHARED[key]


class _Box:
  """A face box in pixels: left, top and size (the normalisation frame)."""

  def __init__(self, left: float, top: float, width: float, height: float):
    self.left, self.top, self.width, self.height = left, top, width, height

  def normalise(self, points: np.ndarray) -> np.ndarray:
    """[68, 2] pixel coordinates -> [136] in box units (x0, y0, x1, y1, ...)."""
    out = (points - np.asarray([self.left, self.top])) / np.asarray([self.width, self.height])
    return out.astype(np.float32).reshape(-1)


FRAMES = ("landmarks", "box")


def landmark_frame(points: np.ndarray, record_id: str = "<unknown>") -> _Box:
  """The square around the landmarks: centred on their bounding box, side = its longer extent."""
  low, high = points.min(axis=0), points.max(axis=0)
  side = float((high - low).max())
  if not side > 0:
    raise ValueError(f"record {record_id!r}: the landmarks collapsed to one point")
  center = (low + high) / 2
  return _Box(center[0] - side / 2, center[1] - side / 2, side, side)


class _DlibDetecting(PriorProvider):
  """Shared dlib frontal face detection (HOG, the highest-scoring face wins) and normalisation."""

  _LAZY = ("_detector",)

  def __init__(self, detect: bool, upsample: int, frame: str):
    if frame not in FRAMES:
      raise ValueError(f"prior frame {frame!r} is not one of {FRAMES}")
    self.detect = bool(detect)
    self.upsample = int(upsample)
    self.frame = frame
    self._detector = None
    self._lock = threading.Lock()

  def normalise(self, points: np.ndarray, box: _Box, record_id: str) -> np.ndarray:
    """[68, 2] pixels -> [136] float32 in the configured frame (x0, y0, x1, y1, ...)."""
    if self.frame == "landmarks":
      box = landmark_frame(points, record_id)
    return box.normalise(points)

  def _face_box(self, pixels: np.ndarray, record_id: str):
    """Returns (dlib.rectangle, _Box) of the face, or of the whole image when detect=False."""
    import dlib  # pylint: disable=import-outside-toplevel

    h, w = pixels.shape[:2]
    if not self.detect:
      return dlib.rectangle(0, 0, w - 1, h - 1), _Box(0, 0, w, h)
    if self._detector is None:
      self._detector = _shared(("dlib_frontal_face_detector",), dlib.get_frontal_face_detector)
    detector, lock = self._detector
    with lock:
      rects, scores, _ = detector.run(pixels, self.upsample, 0.0)
    if not rects:
      raise NoFaceError(
          f"record {record_id!r}: dlib's face detector found no face in the {w}x{h} image "
          f"(upsample={self.upsample}); for aligned face crops use detect=False")
    rect = rects[int(np.argmax(scores))]
    return rect, _Box(rect.left(), rect.top(), rect.width(), rect.height())


class DlibPrior(_DlibDetecting):
  """68 dlib landmarks (shape_predictor_68_face_landmarks) -> 136-d, normalised (see `frame`)."""

  _LAZY = ("_detector", "_predictor")
  prior_dim = 2 * NUM_68

  def __init__(self, detect: bool = True, upsample: int = 1, frame: str = "landmarks",
               predictor_path: str | None = None):
    super().__init__(detect, upsample, frame)
    self.predictor_path = predictor_path
    self._predictor = None

  def landmarks(self, image: Image.Image, record_id: str = "<unknown>") -> tuple[np.ndarray, _Box]:
    """[68, 2] landmarks in pixels and the face box."""
    import dlib  # pylint: disable=import-outside-toplevel

    pixels = np.ascontiguousarray(np.asarray(image.convert("RGB")))
    rect, box = self._face_box(pixels, record_id)
    if self._predictor is None:
      path = self.predictor_path or dlib_model_path()
      self._predictor = _shared(("dlib_shape_predictor", path), lambda: dlib.shape_predictor(path))
    predictor, lock = self._predictor
    with lock:
      shape = predictor(pixels, rect)
    points = np.asarray([[p.x, p.y] for p in shape.parts()], np.float64)
    return points, box

  def __call__(self, image, record_prior, record_id="<unknown>"):
    if image is None:
      raise ValueError(f"record {record_id!r}: the dlib prior needs the image")
    points, box = self.landmarks(image, record_id)
    return self.normalise(points, box, record_id)


def heatmap_peaks(heatmaps: np.ndarray) -> np.ndarray:
  """FAN heatmaps [68, H, W] -> [68, 2] (x, y) in heatmap pixels, decoded as face_alignment does:
  the arg-max pixel (1-based), moved a quarter pixel towards the larger of its two neighbours along
  each axis (interior pixels only), minus half a pixel."""
  n, hh, ww = heatmaps.shape
  idx = np.argmax(heatmaps.reshape(n, -1), axis=1)
  px, py = idx % ww, idx // ww
  points = np.stack([px, py], axis=1).astype(np.float64) + 1.0
  interior = (px > 0) & (px < ww - 1) & (py > 0) & (py < hh - 1)
  i, x, y = np.arange(n)[interior], px[interior], py[interior]
  dx = heatmaps[i, y, x + 1] - heatmaps[i, y, x - 1]
  dy = heatmaps[i, y + 1, x] - heatmaps[i, y - 1, x]
  points[interior] += 0.25 * np.sign(np.stack([dx, dy], axis=1))
  return points - 0.5


def decode_heatmaps(heatmaps: np.ndarray, center: np.ndarray, scale: float) -> np.ndarray:
  """FAN heatmaps [68, 64, 64] -> [68, 2] landmark pixels in the original image.

  The heatmap peaks are mapped back through the crop: x_img = x_hm * h / 64 - h / 2 + center_x,
  with h = 200 * scale. (face_alignment then truncates to whole pixels; we keep the fraction.)
  """
  side = 200.0 * scale
  return (heatmap_peaks(heatmaps) * (side / heatmaps.shape[-1]) - side / 2 +
          np.asarray(center, np.float64))


class FaceAlignmentPrior(_DlibDetecting):
  """68 landmarks from face_alignment's 2D FAN -> 136-d, normalised (see `frame`).

  Faces are found with dlib's HOG detector (face_alignment's own detectors also need downloaded
  weights), cropped and scaled to 256 x 256 the way face_alignment does, and the network's heatmaps
  are decoded as face_alignment does (`decode_heatmaps`).
  """

  _LAZY = ("_detector", "_net")
  prior_dim = 2 * NUM_68

  def __init__(self, weights_path: str | None = None, detect: bool = True, upsample: int = 1,
               frame: str = "landmarks", flip_input: bool = True, device: str = "cpu"):
    super().__init__(detect, upsample, frame)
    if not weights_path or not os.path.exists(weights_path):
      raise FileNotFoundError(
          f"face_alignment FAN weights not found at weights_path={weights_path!r}. Nothing is "
          f"downloaded at run time: fetch the 2D FAN-4 weights ({_fan_url()}; face_alignment "
          "caches them as ~/.cache/torch/hub/checkpoints/2DFAN4-11f355bf06.pth.tar) on a machine "
          "with internet access and pass that file as weights_path")
    self.weights_path = weights_path
    self.flip_input = bool(flip_input)
    self.device = device
    self._net = None

  def _network(self):
    import torch  # pylint: disable=import-outside-toplevel
    from face_alignment.models import FAN  # pylint: disable=import-outside-toplevel

    with self._lock:
      if self._net is None:
        state = torch.load(self.weights_path, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and "state_dict" in state:
          state = state["state_dict"]
        num_modules = len({k.split(".")[0] for k in state if k.startswith("top_m_")})
        if num_modules < 1:
          raise ValueError(f"{self.weights_path} is not a face_alignment FAN state dict")
        net = FAN(num_modules)
        net.load_state_dict(state)
        self._net = net.to(self.device).eval()
    return self._net

  def heatmaps(self, crop: np.ndarray) -> np.ndarray:
    """FAN heatmaps [68, 64, 64] of a uint8 [256, 256, 3] face crop (flip-averaged if asked)."""
    import torch  # pylint: disable=import-outside-toplevel
    from face_alignment import utils as fa_utils  # pylint: disable=import-outside-toplevel

    net = self._network()
    x = torch.from_numpy(crop.transpose(2, 0, 1).astype(np.float32) / 255.0)[None].to(self.device)
    with torch.no_grad():
      out = net(x)[-1]
      if self.flip_input:
        out = out + fa_utils.flip(net(fa_utils.flip(x))[-1], is_label=True)
    return out[0].float().cpu().numpy()

  def landmarks(self, image: Image.Image, record_id: str = "<unknown>") -> tuple[np.ndarray, _Box]:
    from face_alignment import utils as fa_utils  # pylint: disable=import-outside-toplevel

    pixels = np.ascontiguousarray(np.asarray(image.convert("RGB")))
    _, box = self._face_box(pixels, record_id)
    center = np.asarray([box.left + box.width / 2.0,
                         box.top + box.height / 2.0 - box.height * FAN_CENTER_Y_OFFSET])
    scale = (box.width + box.height) / FAN_REFERENCE_SCALE
    crop = fa_utils.crop(pixels, center, scale, resolution=float(FAN_CROP))
    return decode_heatmaps(self.heatmaps(crop), center, scale), box

  def __call__(self, image, record_prior, record_id="<unknown>"):
    if image is None:
      raise ValueError(f"record {record_id!r}: the face_alignment prior needs the image")
    points, box = self.landmarks(image, record_id)
    return self.normalise(points, box, record_id)


def _fan_url() -> str:
  try:
    from face_alignment.api import models_urls  # pylint: disable=import-outside-toplevel
    return models_urls["2DFAN-4"]
  except ImportError:
    return "face_alignment.api.models_urls['2DFAN-4']"


PROVIDERS = {
    "npy": NpyPrior,
    "dlib": DlibPrior,
    "face_alignment": FaceAlignmentPrior,
    "none": NoPrior,
}


def make_prior_provider(name: str, **kwargs) -> PriorProvider:
  """Builds the provider `name` ("npy", "dlib", "face_alignment", "none") with its options."""
  if name not in PROVIDERS:
    raise ValueError(f"unknown prior provider {name!r}; choose one of {sorted(PROVIDERS)}")
  return PROVIDERS[name](**kwargs)
