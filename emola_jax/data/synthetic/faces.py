"""A parametric 2D cartoon face driven by FACS action units, with 68 landmarks (iBUG order).

Geometry lives in a canonical face frame (x right, y down, the face half-width is about 1, the
origin between the eyes). Each facial part is an analytic curve of the identity (`Identity`) and
of the AU intensities; the 68 landmarks are points on those same curves, so they move exactly as
the drawn features do. A pose (`Pose`: in-plane roll, a yaw-like squash on a cylinder, scale,
translation) maps canonical points to pixels; the face is drawn with PIL at `supersample` times
the output size and box-downsampled (anti-aliasing), then a scene (`Scene`: lighting gradient,
colour tint, Gaussian noise) is applied at the output size.

Landmark layout (iBUG 300-W / dlib 68): jaw 0-16, image-left brow 17-21 (outer to inner), other
brow 22-26 (inner to outer), nose bridge 27-30, nostril base 31-35, eyes 36-41 and 42-47 (corner,
two upper-lid points, corner, two lower-lid points), outer lips 48-59, inner lips 60-67.
Pixel coordinates are continuous: pixel column i covers [i, i + 1).

AU cues are exaggerated on purpose so that they stay visible at 64 px: at full intensity the
brows move by about 0.17 face half-widths (6 px at 128 px), the upper lid opens by 80%, the lip
corners rise by 0.16 and the jaw drops by up to 0.32. Wrinkle lines (forehead for AU1/2,
glabella for AU4, crow's feet for AU6, nasal bridge for AU9, nasolabial folds for AU9/10/12,
chin for AU17, dimples for AU14, lip bulges for AU24) are drawn with a strength that follows the
AU intensity.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping

import numpy as np
from PIL import Image, ImageDraw

from emola_jax.data import facs

NUM_LANDMARKS = 68
HAIR_STYLES = ("bald", "short", "long", "bob", "bun")

# Skin tones from light to dark (sRGB); an identity interpolates between neighbours.
_SKIN_TONES = np.array([
    (255, 226, 204), (243, 204, 170), (226, 178, 138), (200, 146, 104),
    (160, 106, 70), (112, 72, 48), (80, 52, 36)], np.float64)
_HAIR_COLOURS = np.array([
    (24, 20, 18), (60, 40, 28), (105, 70, 40), (170, 130, 80), (215, 185, 120),
    (150, 60, 30), (160, 160, 160), (230, 228, 225)], np.float64)
_IRIS_COLOURS = np.array([
    (70, 45, 25), (110, 75, 40), (60, 100, 150), (80, 120, 80), (35, 30, 28)], np.float64)
_SCLERA = np.array((238, 236, 230), np.float64)
_TEETH = np.array((240, 236, 222), np.float64)
_MOUTH_INSIDE = np.array((70, 24, 28), np.float64)


@dataclasses.dataclass(frozen=True)
class Identity:
  """Shape and colours of one person (canonical units; colours are RGB floats 0-255)."""

  face_width: float = 0.96     # half-width of the face at the cheekbones
  jaw_top: float = -0.05       # y of jaw landmarks 0 and 16
  chin: float = 1.05           # y of the chin (landmark 8)
  jaw_shape: float = 2.2       # superellipse exponent: <2 pointed, >2 square
  crown: float = -1.0          # y of the top of the head (skin)
  eye_x: float = 0.405         # horizontal distance of eye centres from the midline
  eye_y: float = -0.12
  eye_width: float = 0.21      # half-width of an eye
  eye_upper: float = 0.095     # upper-lid height above the corner line
  eye_lower: float = 0.062     # lower-lid depth below the corner line
  eye_tilt: float = 0.01       # outer corner raised by this much
  iris_ratio: float = 0.46     # iris radius / eye half-width
  brow_y: float = -0.4         # brow centre line at its inner end
  brow_inner_x: float = 0.12
  brow_outer_x: float = 0.63
  brow_arch: float = 0.04
  brow_thickness: float = 0.07
  nose_bottom: float = 0.28
  nose_width: float = 0.13
  mouth_y: float = 0.54
  mouth_width: float = 0.27    # half-width
  lip_upper: float = 0.055
  lip_lower: float = 0.068
  mouth_curve: float = 0.0     # neutral corner height (+ down)
  hairline: float = -0.84
  hair_part: float = 0.0       # hairline slope
  hair_style: str = "short"
  skin: tuple[float, float, float] = (226.0, 178.0, 138.0)
  hair: tuple[float, float, float] = (60.0, 40.0, 28.0)
  iris: tuple[float, float, float] = (70.0, 45.0, 25.0)
  clothes: tuple[float, float, float] = (60.0, 80.0, 140.0)


@dataclasses.dataclass(frozen=True)
class Pose:
  """Head pose and framing: angles in radians, scale = face half-width / image width."""

  roll: float = 0.0
  yaw: float = 0.0
  scale: float = 0.35
  shift_x: float = 0.0         # fraction of the image width
  shift_y: float = 0.0
  gaze_x: float = 0.0          # iris offset in units of the eye half-width
  gaze_y: float = 0.0


@dataclasses.dataclass(frozen=True)
class Scene:
  """Background, lighting and sensor noise."""

  background: tuple[float, float, float] = (200.0, 205.0, 210.0)
  light_angle: float = 0.0     # direction of the brightness gradient
  light_strength: float = 0.0  # relative brightness change from the centre to the border
  brightness: float = 1.0
  tint: tuple[float, float, float] = (1.0, 1.0, 1.0)
  noise_sigma: float = 0.0     # in 0-255 units
  noise_seed: int = 0


def _u(rng: np.random.Generator, lo: float, hi: float) -> float:
  return float(rng.uniform(lo, hi))


def _palette_colour(rng: np.random.Generator, palette: np.ndarray,
                    jitter: float) -> tuple[float, float, float]:
  # Interpolate between two neighbouring palette entries so colours form a continuum.
  t = rng.uniform(0, len(palette) - 1)
  i = min(int(t), len(palette) - 2)
  colour = palette[i] * (1 - (t - i)) + palette[i + 1] * (t - i)
  colour = colour * rng.uniform(1 - jitter, 1 + jitter, size=3)
  return tuple(float(c) for c in np.clip(colour, 0, 255))


def sample_identity(rng: np.random.Generator) -> Identity:
  """A random person: face shape, feature sizes and colours."""
  eye_y = _u(rng, -0.15, -0.09)
  nose_bottom = _u(rng, 0.24, 0.31)
  hue = rng.uniform(0, 1)
  clothes = np.array([np.sin(2 * np.pi * (hue + k / 3)) for k in range(3)]) * 70 + 110
  return Identity(
      face_width=_u(rng, 0.9, 1.02),
      jaw_top=eye_y + _u(rng, 0.03, 0.1),
      chin=_u(rng, 0.98, 1.08),
      jaw_shape=_u(rng, 1.7, 2.8),
      crown=_u(rng, -1.06, -0.95),
      eye_x=_u(rng, 0.38, 0.43),
      eye_y=eye_y,
      eye_width=_u(rng, 0.19, 0.23),
      eye_upper=_u(rng, 0.085, 0.105),
      eye_lower=_u(rng, 0.055, 0.07),
      eye_tilt=_u(rng, -0.015, 0.03),
      iris_ratio=_u(rng, 0.42, 0.5),
      brow_y=eye_y - _u(rng, 0.26, 0.3),
      brow_inner_x=_u(rng, 0.1, 0.15),
      brow_outer_x=_u(rng, 0.6, 0.68),
      brow_arch=_u(rng, 0.02, 0.06),
      brow_thickness=_u(rng, 0.055, 0.085),
      nose_bottom=nose_bottom,
      nose_width=_u(rng, 0.11, 0.15),
      mouth_y=nose_bottom + _u(rng, 0.22, 0.28),
      mouth_width=_u(rng, 0.25, 0.3),
      lip_upper=_u(rng, 0.045, 0.065),
      lip_lower=_u(rng, 0.055, 0.08),
      mouth_curve=_u(rng, -0.01, 0.01),
      hairline=_u(rng, -0.92, -0.8),
      hair_part=_u(rng, -0.1, 0.1),
      hair_style=HAIR_STYLES[int(rng.choice(len(HAIR_STYLES), p=(0.1, 0.3, 0.3, 0.15, 0.15)))],
      skin=_palette_colour(rng, _SKIN_TONES, 0.04),
      hair=_palette_colour(rng, _HAIR_COLOURS, 0.08),
      iris=_palette_colour(rng, _IRIS_COLOURS, 0.1),
      clothes=tuple(float(c) for c in clothes),
  )


def sample_pose(rng: np.random.Generator) -> Pose:
  """Small head-pose jitter and framing, chosen so that every landmark stays in the image."""
  return Pose(
      roll=_u(rng, -0.14, 0.14),
      yaw=_u(rng, -0.14, 0.14),
      scale=_u(rng, 0.33, 0.365),
      shift_x=_u(rng, -0.02, 0.02),
      shift_y=_u(rng, -0.015, 0.015),
      gaze_x=_u(rng, -0.12, 0.12),
      gaze_y=_u(rng, -0.08, 0.08),
  )


def sample_scene(rng: np.random.Generator) -> Scene:
  """Random background colour, lighting gradient, tint and noise level."""
  return Scene(
      background=tuple(float(c) for c in rng.uniform(20, 240, size=3)),
      light_angle=_u(rng, 0, 2 * np.pi),
      light_strength=_u(rng, 0.0, 0.3),
      brightness=_u(rng, 0.8, 1.12),
      tint=tuple(float(c) for c in rng.uniform(0.92, 1.08, size=3)),
      noise_sigma=_u(rng, 0.0, 8.0),
      noise_seed=int(rng.integers(2**31)),
  )


def _intensities(aus: Mapping[int, float]) -> dict[int, float]:
  """AU -> intensity in [0, 1], zero for absent AUs; rejects unknown AUs and bad values."""
  out = {au: 0.0 for au in facs.AU_NAMES}
  for au, value in aus.items():
    if au not in facs.AU_NAMES:
      raise ValueError(f"faces.py: AU{au} is not one of the FABA AUs {list(facs.AU_NAMES)}")
    if not 0.0 <= float(value) <= 1.0:
      raise ValueError(f"faces.py: AU{au} intensity {value} must lie in [0, 1]")
    out[au] = float(value)
  return out


class _Ops:
  """Draw operations in canonical coordinates, transformed to pixels in one batch."""

  def __init__(self):
    self.points: list[np.ndarray] = []
    self.ops: list[tuple[str, int, int, tuple[int, int, int], float]] = []
    self.count = 0

  def add(self, kind: str, pts: np.ndarray, colour, width: float = 0.0) -> None:
    pts = np.asarray(pts, np.float64).reshape(-1, 2)
    rgb = tuple(int(round(min(max(c, 0.0), 255.0))) for c in colour)
    self.points.append(pts)
    self.ops.append((kind, self.count, self.count + len(pts), rgb, width))
    self.count += len(pts)

  def poly(self, pts, colour) -> None:
    self.add("poly", pts, colour)

  def line(self, pts, colour, width: float) -> None:
    self.add("line", pts, colour, width)


def _ellipse(cx: float, cy: float, rx: float, ry: float, n: int = 24) -> np.ndarray:
  a = np.linspace(0, 2 * np.pi, n, endpoint=False)
  return np.stack([cx + rx * np.cos(a), cy + ry * np.sin(a)], 1)


def _bezier(p0, p1, p2, n: int = 10) -> np.ndarray:
  t = np.linspace(0, 1, n)[:, None]
  p0, p1, p2 = (np.asarray(p, np.float64) for p in (p0, p1, p2))
  return (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t ** 2 * p2


def _mix(a, b, t: float) -> np.ndarray:
  return np.asarray(a, np.float64) * (1 - t) + np.asarray(b, np.float64) * t


def _thick_polygon(centre: np.ndarray, half: np.ndarray) -> np.ndarray:
  """Polygon around a polyline with a per-point half thickness."""
  d = np.gradient(centre, axis=0)
  d /= np.linalg.norm(d, axis=1, keepdims=True) + 1e-9
  normal = np.stack([-d[:, 1], d[:, 0]], 1)
  return np.concatenate([centre + normal * half[:, None], (centre - normal * half[:, None])[::-1]])


class _Face:
  """All curves of one face in canonical coordinates, plus its 68 landmarks."""

  def __init__(self, a: dict[int, float], p: Identity, gaze: tuple[float, float]):
    self.a, self.p, self.gaze = a, p, gaze
    self.lm = np.zeros((NUM_LANDMARKS, 2))
    self._jaw()
    self._brows()
    self._eyes()
    self._nose()
    self._mouth()

  # --- jaw -----------------------------------------------------------------------------------
  def _jaw_drop(self) -> float:
    a = self.a
    return max(0.14 + 0.12 * a[26] if a[26] else 0.0, 0.2 + 0.12 * a[27] if a[27] else 0.0)

  def _jaw_curve(self, phi: np.ndarray) -> np.ndarray:
    p, a = self.p, self.a
    c, s = np.cos(phi), np.sin(phi)
    e = 2.0 / p.jaw_shape
    x = -p.face_width * np.sign(c) * np.abs(c) ** e
    y = p.jaw_top + (p.chin - p.jaw_top) * np.abs(s) ** e
    # The jaw drop moves the chin most and the jaw angles little; the chin raiser lifts the chin.
    y = y + self._jaw_drop() * s ** 3 - 0.08 * a[17] * s ** 8
    return np.stack([x, y], 1)

  def _jaw(self) -> None:
    self.lm[0:17] = self._jaw_curve(np.linspace(0, np.pi, 17))

  # --- brows ---------------------------------------------------------------------------------
  def _brow(self, side: int) -> tuple[np.ndarray, np.ndarray]:
    """Centre line (13 points, inner to outer) and half thickness; side -1 = image left."""
    p, a = self.p, self.a
    s = np.linspace(0, 1, 13)
    x = side * (p.brow_inner_x + (p.brow_outer_x - p.brow_inner_x) * s)
    y = p.brow_y - p.brow_arch * np.sin(np.pi * s ** 1.36) + 0.02 * s
    y = y - 0.17 * a[1] * (1 - s) ** 1.3 - 0.15 * a[2] * s ** 1.1 - 0.05 * a[2]
    y = y + 0.085 * a[4] * (1 - 0.35 * s) + 0.05 * a[9] * (1 - s) ** 2
    # The brow lowerer also pulls the brows together (inner ends move to the midline).
    x = x - side * (0.06 * a[4] + 0.02 * a[9]) * (1 - s) ** 1.5
    half = 0.5 * p.brow_thickness * (1 - 0.45 * s)
    return np.stack([x, y], 1), half

  def _brows(self) -> None:
    left, _ = self._brow(-1)
    right, _ = self._brow(1)
    self.lm[17:22] = left[[12, 9, 6, 3, 0]]
    self.lm[22:27] = right[[0, 3, 6, 9, 12]]

  # --- eyes ----------------------------------------------------------------------------------
  def _eye(self, side: int) -> tuple[np.ndarray, np.ndarray]:
    """Upper and lower lid (13 points each, outer corner to inner corner)."""
    p, a = self.p, self.a
    t = np.linspace(0, 1, 13)
    cx = side * p.eye_x
    x = cx + side * p.eye_width * (1 - 2 * t) * (1 - 0.15 * a[6])
    base = p.eye_y - (p.eye_tilt + 0.03 * a[6]) * (1 - t)  # cheek lifts the outer corner
    up = p.eye_upper * (1 + 0.8 * a[5]) * (1 - 0.22 * a[4]) * (1 - 0.1 * a[6]) * (1 - 0.3 * a[7])
    lo = p.eye_lower * (1 - 0.7 * a[6]) * (1 - 0.45 * a[7])
    bump = np.sin(np.pi * t)
    upper = base - up * bump ** 0.85 * (1 + 0.15 * (t - 0.5))
    lower = base + lo * bump ** (0.9 + 0.8 * a[7])  # a tightened lower lid is flatter
    closure = 1.0 if a[43] else 0.0
    upper = upper * (1 - closure) + lower * closure
    return np.stack([x, upper], 1), np.stack([x, lower], 1)

  def _eyes(self) -> None:
    lu, ll = self._eye(-1)
    ru, rl = self._eye(1)
    self.lm[36:42] = [lu[0], lu[4], lu[8], lu[12], ll[8], ll[4]]
    self.lm[42:48] = [ru[12], ru[8], ru[4], ru[0], rl[4], rl[8]]

  # --- nose ----------------------------------------------------------------------------------
  def _nose_base(self) -> tuple[float, float]:
    p, a = self.p, self.a
    return (p.nose_bottom - 0.035 * a[9] - 0.015 * a[10],
            p.nose_width * (1 + 0.12 * a[9]))

  def _nose(self) -> None:
    p = self.p
    nb, nw = self._nose_base()
    tip = nb - 0.05
    for k in range(4):
      self.lm[27 + k] = (0.0, p.eye_y + (tip - p.eye_y) * k / 3)
    self.lm[31:36] = [(-nw, nb - 0.025), (-nw / 2, nb + 0.005), (0.0, nb + 0.012),
                      (nw / 2, nb + 0.005), (nw, nb - 0.025)]

  # --- mouth ---------------------------------------------------------------------------------
  def _mouth_params(self) -> dict[str, float]:
    p, a = self.p, self.a
    drop = self._jaw_drop()
    width = (p.mouth_width + 0.07 * a[12] + 0.11 * a[20] - 0.04 * a[14] - 0.05 * a[23]
             - 0.01 * a[24] - 0.015 * a[15]) * (1 - 0.15 * (a[27] > 0))
    if a[26] and not a[20]:
      width *= 1 - 0.12 * a[26]  # a dropped jaw without stretched lips rounds the mouth
    corner = (p.mouth_curve - 0.16 * a[12] + 0.1 * a[15] + 0.02 * a[20] + 0.02 * a[17]
              + 0.25 * drop)
    thin = max(0.22, (1 - 0.35 * a[20]) * (1 - 0.35 * a[23]) * (1 - 0.75 * a[24]))
    part = 0.02 + 0.045 * a[25] if a[25] else 0.0
    gap = max(part, drop * 0.95)
    return dict(
        y=p.mouth_y - 0.03 * a[9] - 0.02 * a[10],
        width=width,
        corner=corner,
        up=p.lip_upper * thin * (1 + 0.7 * a[10]),
        low=p.lip_lower * thin * (1 + 0.25 * a[17]),
        gap=gap,
        gap_up=min(gap * 0.3, 0.04) + 0.02 * a[27] + 0.025 * a[10] * (gap > 0),
        raise10=0.08 * a[10] + 0.02 * a[9],
        push17=0.07 * a[17],
        flat=2.0 + 4.0 * a[20],  # the lip stretcher opens the mouth into a wide rectangle
    )

  def _lips(self, u: np.ndarray) -> dict[str, np.ndarray]:
    """Outer/inner upper/lower lip y at normalised mouth positions u in [-1, 1]."""
    m = self._mouth_params()
    contact = m["y"] + m["corner"] * u ** 2 - m["push17"] * (1 - u ** 2)
    inner = np.clip(np.abs(u) / 0.9, 0, 1)
    g = (1 - inner ** m["flat"]) ** 0.5
    inner_up = contact - 0.35 * m["raise10"] * (1 - u ** 2) - m["gap_up"] * g
    inner_low = contact - 0.35 * m["raise10"] * (1 - u ** 2) + (m["gap"] - m["gap_up"]) * g
    bow = 1 - 0.25 * np.exp(-(u / 0.13) ** 2)
    outer_up = (inner_up - m["up"] * (1 - np.abs(u) ** 2.2) ** 0.8 * bow
                - m["raise10"] * np.exp(-((np.abs(u) - 0.3) / 0.35) ** 2))
    outer_low = inner_low + m["low"] * (1 - u ** 2) ** 0.7
    return dict(x=u * m["width"], contact=contact, inner_up=inner_up, inner_low=inner_low,
                outer_up=np.minimum(outer_up, inner_up), outer_low=outer_low)

  def _mouth(self) -> None:
    u = np.array([-1, -0.62, -0.28, 0, 0.28, 0.62, 1, 0.9, 0.4, -0.4, -0.9])
    L = self._lips(u)
    x = L["x"]
    pts = lambda key, idx: [(x[i], L[key][i]) for i in idx]
    self.lm[48:55] = pts("outer_up", range(7))
    self.lm[48] = (x[0], L["contact"][0])
    self.lm[54] = (x[6], L["contact"][6])
    self.lm[55:60] = pts("outer_low", [5, 4, 3, 2, 1])
    self.lm[60] = (x[10], L["contact"][10])
    self.lm[61:64] = pts("inner_up", [9, 3, 8])
    self.lm[64] = (x[7], L["contact"][7])
    self.lm[65:68] = pts("inner_low", [8, 3, 9])

  # --- drawing -------------------------------------------------------------------------------
  def draw(self, ops: _Ops) -> None:
    p = self.p
    skin = np.array(p.skin)
    shadow = skin * 0.55
    hair = np.array(p.hair)
    line = lambda t: _mix(skin, shadow, min(1.0, t))

    phi = np.linspace(0, np.pi, 41)
    jaw = self._jaw_curve(phi)
    psi = np.linspace(0, np.pi, 31)
    fore = np.stack([p.face_width * np.cos(psi),
                     p.jaw_top - (p.jaw_top - p.crown) * np.sin(psi) ** 0.8], 1)
    face = np.concatenate([jaw, fore[1:-1]])

    self._draw_back(ops, skin, hair)
    ops.poly(face, skin)
    self._draw_forehead(ops, line)
    self._draw_hair_front(ops, hair)
    self._draw_eyes(ops, line, hair)
    self._draw_brows(ops, skin, hair, line)
    self._draw_nose(ops, line, skin)
    self._draw_folds(ops, line)
    self._draw_mouth(ops, skin)

  def _draw_back(self, ops: _Ops, skin: np.ndarray, hair: np.ndarray) -> None:
    p = self.p
    w = p.face_width
    top = p.crown - 0.12
    if p.hair_style in ("long", "bob"):
      bottom = 1.45 if p.hair_style == "long" else 0.75
      t = np.linspace(0, np.pi, 25)
      arc = np.stack([-1.12 * w * np.cos(t), p.jaw_top - (p.jaw_top - top) * np.sin(t)], 1)
      ops.poly(np.concatenate([[(-1.22 * w, bottom)], arc, [(1.22 * w, bottom)]]), hair * 0.85)
    if p.hair_style == "bun":
      ops.poly(_ellipse(0, top - 0.12, 0.3, 0.24), hair * 0.9)
    neck_top = 0.55
    ops.poly([(-0.42, neck_top), (0.42, neck_top), (0.46, 1.9), (-0.46, 1.9)], skin * 0.82)
    t = np.linspace(0, np.pi, 21)
    shoulders = np.stack([-1.9 * np.cos(t), 1.62 - 0.25 * np.sin(t)], 1)
    collar = _bezier((0.5, 1.43), (0.0, 1.75), (-0.5, 1.43), 9)
    ops.poly(np.concatenate([[(-1.9, 2.6)], shoulders[:9], collar, shoulders[13:], [(1.9, 2.6)]]),
             self.p.clothes)
    for side in (-1, 1):
      ops.poly(_ellipse(side * 0.97 * w, p.eye_y + 0.16, 0.1, 0.19, 16), skin * 0.9)

  def _draw_forehead(self, ops: _Ops, line) -> None:
    # Horizontal forehead wrinkles: central for AU1, lateral for AU2.
    p, a = self.p, self.a
    if a[1] + a[2] <= 0:
      return
    left, _ = self._brow(-1)
    top = min(left[:, 1].min(), p.brow_y) - p.brow_thickness
    for dy in (0.06, 0.12):
      y = top - dy
      if a[1] > 0:
        ops.line(_bezier((-0.22, y + 0.015), (0, y - 0.02), (0.22, y + 0.015), 7),
                 line(0.8 * a[1]), 0.022)
      if a[2] > 0:
        for side in (-1, 1):
          ops.line(_bezier((side * 0.25, y + 0.01), (side * 0.42, y - 0.02),
                           (side * 0.6, y + 0.02), 7), line(0.8 * a[2]), 0.022)

  def _draw_hair_front(self, ops: _Ops, hair: np.ndarray) -> None:
    p = self.p
    if p.hair_style == "bald":
      return
    w = 1.06 * p.face_width
    temple = p.jaw_top + (0.25 if p.hair_style in ("long", "bob") else -0.05)
    t = np.linspace(-0.08, np.pi + 0.08, 29)
    outer = np.stack([w * np.cos(t), p.jaw_top - (p.jaw_top - (p.crown - 0.08)) * np.sin(t)], 1)
    x = np.linspace(-w * 0.97, w * 0.97, 25)
    r = np.abs(x) / w
    hl = p.hairline + p.hair_part * x + (temple - p.hairline) * r ** 6
    ops.poly(np.concatenate([outer, np.stack([x, hl], 1)]), hair)

  def _draw_eyes(self, ops: _Ops, line, hair: np.ndarray) -> None:
    p, a = self.p, self.a
    lash = np.minimum(hair * 0.5, 45.0)
    for side in (-1, 1):
      upper, lower = self._eye(side)
      # Under-eye bulge of the raised cheek, and crow's feet at the outer corner (AU6).
      if a[6] + a[7] > 0:
        ops.line(lower[2:11] + (0, 0.05), line(0.9 * a[6] + 0.4 * a[7]), 0.024)
      if a[6] > 0:
        o = upper[0]
        for ang in (-0.45, 0.0, 0.45):
          d = np.array([side * np.cos(ang), np.sin(ang)])
          ops.line([o + 0.04 * d, o + 0.14 * d], line(a[6]), 0.025)
      if a[43]:
        ops.line(upper, lash, 0.028)
        for k in (3, 6, 9):
          ops.line([upper[k], upper[k] + (side * 0.015 * (k - 6) / 3, 0.035)], lash, 0.014)
        continue
      ops.poly(np.concatenate([upper, lower[::-1]]), _SCLERA)
      # Iris and pupil clipped to the lids: clamp circle points into the eye opening.
      order = np.argsort(upper[:, 0])
      xs = upper[order, 0]
      up_y, lo_y = upper[order, 1], lower[order, 1]
      cx = side * p.eye_x + self.gaze[0] * p.eye_width
      cy = p.eye_y - 0.005 + self.gaze[1] * p.eye_width
      r = p.iris_ratio * p.eye_width
      for radius, colour in ((r, p.iris), (0.45 * r, (15, 12, 12))):
        c = _ellipse(cx, cy, radius, radius, 20)
        c[:, 0] = np.clip(c[:, 0], xs[0], xs[-1])
        c[:, 1] = np.clip(c[:, 1], np.interp(c[:, 0], xs, up_y), np.interp(c[:, 0], xs, lo_y))
        ops.poly(c, colour)
      ops.line(upper, lash, 0.03)
      ops.line(lower, line(0.6), 0.012)

  def _draw_brows(self, ops: _Ops, skin: np.ndarray, hair: np.ndarray, line) -> None:
    a = self.a
    colour = np.minimum(hair * 0.8, skin * 0.45)
    for side in (-1, 1):
      centre, half = self._brow(side)
      ops.poly(_thick_polygon(centre, half), colour)
    if a[4] > 0:  # vertical glabella furrows between the knitted brows
      left, _ = self._brow(-1)
      y0 = left[0, 1]
      for x in (-0.045, 0.045):
        ops.line([(x, y0 - 0.02), (x * 0.8, y0 + 0.09)], line(0.9 * a[4]), 0.02)

  def _draw_nose(self, ops: _Ops, line, skin: np.ndarray) -> None:
    p, a = self.p, self.a
    nb, nw = self._nose_base()
    ops.line(_bezier((-0.05, p.eye_y + 0.06), (-0.07, nb - 0.15), (-nw * 0.75, nb - 0.08), 8),
             line(0.3), 0.018)
    for side in (-1, 1):
      ops.line(_bezier((side * nw * 0.75, nb - 0.09), (side * nw * 1.25, nb - 0.02),
                       (side * nw * 0.5, nb + 0.01), 8), line(0.6), 0.02)
      ops.poly(_ellipse(side * nw * 0.45, nb - 0.005, 0.035, 0.016, 12), skin * 0.35)
    if a[9] > 0:  # wrinkles across the nasal bridge
      for dy in (0.02, 0.07, 0.12):
        y = p.eye_y + dy
        ops.line(_bezier((-0.09, y + 0.01), (0, y - 0.02), (0.09, y + 0.01), 7),
                 line(0.9 * a[9]), 0.022)

  def _draw_folds(self, ops: _Ops, line) -> None:
    a = self.a
    nb, nw = self._nose_base()
    corner = self.lm[54]
    fold = max(0.9 * a[12], 0.8 * a[10], 0.7 * a[9], 0.35 * a[6])
    if fold > 0.15:
      for side in (-1, 1):
        start = (side * (nw + 0.04), nb - 0.06)
        end = (side * (abs(corner[0]) + 0.07), corner[1] + 0.1)
        ctrl = (side * (abs(corner[0]) + 0.1), nb + 0.08)
        ops.line(_bezier(start, ctrl, end, 9), line(fold), 0.024)
    if a[14] > 0:
      for side in (-1, 1):
        c = (side * (abs(corner[0]) + 0.035), corner[1])
        ops.line(_bezier((c[0], c[1] - 0.04), (c[0] + side * 0.02, c[1]), (c[0], c[1] + 0.04), 6),
                 line(0.9 * a[14]), 0.02)
    if a[17] > 0:  # chin boss: furrow under the lower lip and a dimpled chin
      y = self.lm[57, 1] + 0.07
      ops.line(_bezier((-0.15, y), (0, y + 0.05), (0.15, y), 8), line(a[17]), 0.026)
      chin = self.lm[8]
      ops.line(_bezier((chin[0] - 0.07, chin[1] - 0.09), (chin[0], chin[1] - 0.13),
                       (chin[0] + 0.07, chin[1] - 0.09), 7), line(0.5 * a[17]), 0.016)
    if a[24] > 0:  # bulges above and below pressed lips
      top, bottom = self.lm[51], self.lm[57]
      for y, bend in ((top[1] - 0.04, -0.02), (bottom[1] + 0.04, 0.02)):
        ops.line(_bezier((-0.14, y), (0, y + bend), (0.14, y), 7), line(a[24]), 0.026)

  def _draw_mouth(self, ops: _Ops, skin: np.ndarray) -> None:
    u = np.linspace(-1, 1, 25)
    L = self._lips(u)
    x = L["x"]
    lip = skin * np.array((0.8, 0.58, 0.6)) + np.array((30, 0, 0))
    gap = L["inner_low"] - L["inner_up"]
    if gap.max() > 0.004:
      inner = np.concatenate([np.stack([x, L["inner_up"]], 1),
                              np.stack([x, L["inner_low"]], 1)[::-1]])
      ops.poly(inner, _MOUTH_INSIDE)
      # Teeth rows taper towards the mouth corners, as the dental arch curves away.
      teeth = np.abs(u) < 0.7
      taper = np.sqrt(np.clip(1 - (u / 0.7) ** 2, 0, 1))
      tooth = 0.05 * self.p.mouth_width / 0.27 * taper
      up_bottom = np.minimum(L["inner_up"] + tooth, L["inner_low"] - 0.004)
      ops.poly(np.concatenate([np.stack([x, L["inner_up"] - 0.01], 1)[teeth],
                               np.stack([x, up_bottom], 1)[teeth][::-1]]), _TEETH)
      if gap.max() > 0.14:
        low_top = np.maximum(L["inner_low"] - 0.7 * tooth, up_bottom)
        ops.poly(np.concatenate([np.stack([x, low_top], 1)[teeth],
                                 np.stack([x, L["inner_low"] + 0.01], 1)[teeth][::-1]]),
                 _TEETH * 0.95)
    ops.poly(np.concatenate([np.stack([x, L["outer_up"]], 1),
                             np.stack([x, L["inner_up"]], 1)[::-1]]), lip)
    ops.poly(np.concatenate([np.stack([x, L["inner_low"]], 1),
                             np.stack([x, L["outer_low"]], 1)[::-1]]), lip * 1.06)
    if gap.max() <= 0.004:
      # Closed lips: a dark line where they meet (inner_up == inner_low there).
      ops.line(np.stack([x, L["inner_up"]], 1), lip * 0.55, 0.016)


def _to_pixels(pts: np.ndarray, pose: Pose, size: int) -> np.ndarray:
  """Canonical points -> continuous pixel coordinates of a `size` x `size` image."""
  radius = 1.45  # the head is treated as a cylinder of this radius for the yaw squash
  theta = np.arcsin(np.clip(pts[:, 0] / radius, -1, 1))
  x = radius * np.sin(theta + pose.yaw)
  y = pts[:, 1]
  unit = pose.scale * size
  c, s = np.cos(pose.roll), np.sin(pose.roll)
  px = size * (0.5 + pose.shift_x) + unit * (c * x - s * y)
  py = size * (0.44 + pose.shift_y) + unit * (s * x + c * y)
  return np.stack([px, py], 1)


def face_landmarks(aus: Mapping[int, float], identity: Identity, pose: Pose,
                   size: int = 128) -> np.ndarray:
  """The 68 landmarks (68, 2) in pixels of a `size` image, without drawing anything."""
  face = _Face(_intensities(aus), identity, (pose.gaze_x, pose.gaze_y))
  return _to_pixels(face.lm, pose, size).astype(np.float32)


@functools.lru_cache(maxsize=8)
def _light_grid(size: int) -> tuple[np.ndarray, np.ndarray]:
  g = (np.arange(size, dtype=np.float32) + 0.5) / size - 0.5
  return g[None, :], g[:, None]


def render_face(aus: Mapping[int, float], identity: Identity, pose: Pose, scene: Scene,
                size: int = 128, supersample: int = 3) -> tuple[np.ndarray, np.ndarray]:
  """Draw a face.

  Args:
    aus: AU number -> intensity in [0, 1]; absent or 0 = inactive.
    identity, pose, scene: see the dataclasses; `sample_*` draw random ones.
    size: output width and height in pixels.
    supersample: drawing scale before box downsampling (anti-aliasing); 1 disables it.

  Returns:
    (image uint8 [size, size, 3], landmarks float32 [68, 2] in pixel coordinates of the image).
  """
  if size < 16 or supersample < 1:
    raise ValueError(f"faces.render_face: size={size} must be >= 16 and supersample="
                     f"{supersample} >= 1")
  face = _Face(_intensities(aus), identity, (pose.gaze_x, pose.gaze_y))
  ops = _Ops()
  face.draw(ops)
  big = size * supersample
  pts = _to_pixels(np.concatenate(ops.points), pose, big) - 0.5  # PIL: pixel centres at integers
  unit = pose.scale * big
  canvas = Image.new("RGB", (big, big), tuple(int(c) for c in scene.background))
  draw = ImageDraw.Draw(canvas)
  for kind, start, end, colour, width in ops.ops:
    xy = pts[start:end].ravel().tolist()
    if kind == "poly":
      draw.polygon(xy, fill=colour)
    else:
      draw.line(xy, fill=colour, width=max(1, int(round(width * unit))), joint="curve")
  if supersample > 1:
    canvas = canvas.reduce(supersample)
  img = np.asarray(canvas, dtype=np.float32)
  gx, gy = _light_grid(size)
  gain = 1 + 2 * scene.light_strength * (gx * np.cos(scene.light_angle)
                                         + gy * np.sin(scene.light_angle))
  img = img * (gain[..., None] * scene.brightness * np.asarray(scene.tint, np.float32))
  if scene.noise_sigma > 0:
    noise = np.random.default_rng(scene.noise_seed).standard_normal(img.shape, np.float32)
    img += noise * scene.noise_sigma
  image = np.clip(img + 0.5, 0, 255).astype(np.uint8)
  return image, _to_pixels(face.lm, pose, size).astype(np.float32)


def random_face(rng: np.random.Generator, aus: Mapping[int, float], size: int = 128,
                supersample: int = 3) -> tuple[np.ndarray, np.ndarray]:
  """`render_face` with a random identity, pose and scene drawn from `rng`."""
  return render_face(aus, sample_identity(rng), sample_pose(rng), sample_scene(rng), size,
                     supersample)
