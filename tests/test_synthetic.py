"""Tests of the synthetic FABA data: AU geometry, rendering, descriptions and the dataset writer."""

import hashlib
import json
import os
import re

import numpy as np
import pytest
from PIL import Image

from emola_jax.data import facs
from emola_jax.data import instructions
from emola_jax.data.synthetic import descriptions
from emola_jax.data.synthetic import faces
from emola_jax.data.synthetic import generate

# --- FABA-Bench emotion rule, written here from its published definition (EMOLA_FACTS.md 5) ---
_KEYWORDS = {
    "Happiness": "happiness happy smiling smile pleasant content contentment relaxed relaxation "
                 "cheerful joy amusement amused positivity positive lightheartedness joyful "
                 "friendly warmth bright",
    "Sadness": "sadness crying distress concern discomfort anguish somber",
    "Surprise": "surprise surprised startled puzzled astonishment disbelief wonder curiosity "
                "curious confusion bewilderment skepticism excitement uncertainty",
    "Anger": "anger mad irate outraged agitation irritated enraged annoyed incensed serious "
             "frustration displeased stern",
    "Neutral": "neutral neutrality calm contemplative concerned thoughtful focused solemn mild",
    "Disgust": "disgust distaste disgusted discomfort displeasure displeased disapproval disdain "
               "contempt",
    "Fear": "fear shock anxiety apprehension tension panic alertness focus worry alarm curiosity "
            "contemplation",
}
_ORDER = ("Happiness", "Sadness", "Surprise", "Anger", "Neutral", "Disgust", "Fear")
_NEGATIONS = ("not", "no", "isn't ", "nothing", "cannot", "won't", "shouldn't", "neither", "nor")


def parse_emotion(text: str) -> str:
  sentences = re.split(r"(?<!\w\.\w.)(?<![A-Z][a-z]\.)(?<=\.|\?)\s", text)
  kept = [s for s in sentences if not any(n in s.lower() for n in _NEGATIONS)]
  text = " ".join(kept) if kept else text
  m = re.match(r"^(.*?)[.!?]", text)
  first, rest = (m.group(1), text[m.end():]) if m else (text, "")
  words = {c: set(_KEYWORDS[c].split()) for c in _ORDER}
  for w in re.findall(r"\b\w+\b", first.lower()):
    for c in _ORDER:
      if w in words[c]:
        return c
  rest_words = re.findall(r"\b\w+\b", rest.lower())
  counts = [sum(w in words[c] for w in rest_words) for c in _ORDER]
  return _ORDER[int(np.argmax(counts))]


def test_parser_follows_the_published_rule():
  assert parse_emotion("The person looks calm. They seem happy.") == "Neutral"
  # A sentence with "nose" is dropped, so the second sentence becomes the first.
  assert parse_emotion("The nose shows joy. The face shows fear.") == "Fear"
  assert parse_emotion("A face shows concern and fear.") == "Sadness"


# --- geometry --------------------------------------------------------------------------------
_ID = faces.Identity()
_POSE = faces.Pose()


def _lm(aus):
  return faces.face_landmarks(aus, _ID, _POSE, size=128).astype(np.float64)


_NEUTRAL = _lm({})


def test_landmark_layout_is_ibug_68():
  lm = _NEUTRAL
  assert lm.shape == (68, 2)
  x, y = lm[:, 0], lm[:, 1]
  assert np.argmax(y[:17]) == 8                      # chin is the lowest jaw point
  assert np.all(np.diff(x[:17]) > 0)                 # jaw runs from image left to right
  assert np.all(np.diff(x[17:27]) > 0)               # brows: 17-21 then 22-26, left to right
  assert np.all(np.diff(y[27:31]) > 0)               # nose bridge runs downwards
  assert np.all(np.diff(x[31:36]) > 0)
  assert x[36] < x[39] < x[42] < x[45]               # eye corners
  assert y[37] < y[41] and y[38] < y[40] and y[43] < y[47] and y[44] < y[46]
  assert x[48] < x[51] < x[54] and y[51] < y[62] <= y[66] < y[57]
  assert y[17:27].max() < y[36:48].min()             # brows above eyes
  assert y[36:48].max() < y[31:36].min() < y[48:68].min() < y[8]
  # Symmetric about the midline with a frontal pose (mirrored iBUG pairs).
  pairs = [(0, 16), (4, 12), (17, 26), (21, 22), (36, 45), (39, 42), (31, 35), (48, 54)]
  mid = x[27]
  for a, b in pairs:
    assert x[a] - mid == pytest.approx(mid - x[b], abs=1e-3)
    assert y[a] == pytest.approx(y[b], abs=1e-3)


def _eye_open(lm):
  return np.mean(lm[[41, 40, 47, 46], 1] - lm[[37, 38, 43, 44], 1])


def _gap(lm):
  return lm[66, 1] - lm[62, 1]


# (AU, check(neutral, moved)) with image y pointing down.
_DIRECTIONS = [
    (1, lambda n, m: (n - m)[[21, 22], 1].min() > 3 and (n - m)[[21, 22], 1].min()
     > (n - m)[[17, 26], 1].max() + 1),
    (2, lambda n, m: (n - m)[[17, 26], 1].min() > 3 and (n - m)[[17, 26], 1].min()
     > (n - m)[[21, 22], 1].max() + 1),
    (4, lambda n, m: (m - n)[17:27, 1].min() > 1.5
     and m[22, 0] - m[21, 0] < n[22, 0] - n[21, 0] - 2),
    (5, lambda n, m: (n - m)[[37, 38, 43, 44], 1].min() > 1.5
     and _eye_open(m) > 1.35 * _eye_open(n)),
    (6, lambda n, m: (n - m)[[40, 41, 46, 47], 1].min() > 0.8),
    (7, lambda n, m: (n - m)[[40, 41, 46, 47], 1].min() > 0.8),
    (9, lambda n, m: (n - m)[31:36, 1].min() > 0.8),
    (10, lambda n, m: (n - m)[[50, 51, 52], 1].min() > 1.5),
    (12, lambda n, m: (n - m)[[48, 54], 1].min() > 3
     and m[54, 0] - m[48, 0] > n[54, 0] - n[48, 0] + 3),
    (14, lambda n, m: m[54, 0] - m[48, 0] < n[54, 0] - n[48, 0] - 1.5),
    (15, lambda n, m: (m - n)[[48, 54], 1].min() > 2.5),
    (17, lambda n, m: (n - m)[[8, 57], 1].min() > 1.2),
    (20, lambda n, m: m[54, 0] - m[48, 0] > n[54, 0] - n[48, 0] + 6),
    (23, lambda n, m: m[57, 1] - m[51, 1] < 0.8 * (n[57, 1] - n[51, 1])),
    (24, lambda n, m: m[57, 1] - m[51, 1] < 0.6 * (n[57, 1] - n[51, 1])),
    (25, lambda n, m: _gap(n) == pytest.approx(0, abs=1e-3) and _gap(m) > 2),
    (26, lambda n, m: _gap(m) > 8 and m[8, 1] > n[8, 1] + 8),
    (27, lambda n, m: _gap(m) > _gap(_lm({26: 1.0})) and m[8, 1] > n[8, 1] + 10),
    (43, lambda n, m: abs(_eye_open(m)) < 1e-3 and _eye_open(n) > 5),
]


def test_every_au_is_checked():
  assert {au for au, _ in _DIRECTIONS} == set(facs.AU_NAMES)


@pytest.mark.parametrize("au,check", _DIRECTIONS, ids=[f"AU{a}" for a, _ in _DIRECTIONS])
def test_au_moves_landmarks_the_right_way(au, check):
  assert check(_NEUTRAL, _lm({au: 1.0}))


def test_au_intensity_scales_the_movement():
  weak, strong = _lm({12: 0.3}), _lm({12: 1.0})
  assert _NEUTRAL[54, 1] > weak[54, 1] > strong[54, 1]
  assert np.array_equal(_lm({12: 0.0}), _NEUTRAL)


def test_bad_aus_are_rejected():
  with pytest.raises(ValueError, match="AU3 is not one of the FABA AUs"):
    _lm({3: 1.0})
  with pytest.raises(ValueError, match="AU12 intensity 1.5"):
    _lm({12: 1.5})


def test_pose_moves_landmarks_as_a_similarity_without_yaw():
  pose = faces.Pose(roll=0.3, scale=0.3, shift_x=0.05)
  moved = faces.face_landmarks({}, _ID, pose, size=128).astype(np.float64)
  base = faces.face_landmarks({}, _ID, faces.Pose(scale=0.3), size=128).astype(np.float64)
  centre = np.array([128 * 0.5, 128 * 0.44])
  c, s = np.cos(0.3), np.sin(0.3)
  expected = (base - centre) @ np.array([[c, s], [-s, c]]) + centre + (128 * 0.05, 0)
  np.testing.assert_allclose(moved, expected, atol=1e-3)
  half = faces.face_landmarks({}, _ID, faces.Pose(scale=0.3), size=64)
  np.testing.assert_allclose(half, base / 2, atol=1e-3)


def test_random_faces_keep_all_landmarks_inside_the_image():
  rng = np.random.default_rng(0)
  for i in range(300):
    aus = {27: 1.0, 2: 1.0} if i % 2 else {au: 1.0 for au in generate.random_aus(rng)}
    lm = faces.face_landmarks(aus, faces.sample_identity(rng), faces.sample_pose(rng), 96)
    assert lm.min() >= 0 and lm.max() <= 96, (i, aus)


# --- rendering -------------------------------------------------------------------------------
def _render(aus, scene=faces.Scene(), pose=_POSE, size=128):
  return faces.render_face(aus, _ID, pose, scene, size=size)


def test_render_shapes_determinism_and_landmarks():
  scene = faces.Scene(noise_sigma=5.0, noise_seed=3, light_strength=0.2)
  img, lm = _render({12: 1.0}, scene)
  assert img.shape == (128, 128, 3) and img.dtype == np.uint8
  assert lm.dtype == np.float32
  np.testing.assert_array_equal(lm, faces.face_landmarks({12: 1.0}, _ID, _POSE, 128))
  img2, _ = _render({12: 1.0}, scene)
  assert np.array_equal(img, img2)
  img3, _ = _render({12: 1.0}, faces.Scene(noise_sigma=5.0, noise_seed=4, light_strength=0.2))
  assert not np.array_equal(img, img3)
  small, lm_small = _render({12: 1.0}, scene, size=64)
  assert small.shape == (64, 64, 3)
  np.testing.assert_allclose(lm_small, lm / 2, atol=1e-3)


def test_face_differs_from_background_and_features_are_where_landmarks_say():
  bg = (30.0, 160.0, 40.0)
  img, lm = _render({26: 1.0}, faces.Scene(background=bg))
  assert np.abs(img[2, 2].astype(float) - bg).max() <= 1           # corner is background
  skin = img[int(lm[29, 1]), int(lm[29, 0] + 8)].astype(float)     # cheek beside the nose
  assert np.abs(skin - _ID.skin).max() < 12
  mouth = img[int((lm[62, 1] + lm[66, 1]) / 2), int(lm[62, 0])].astype(float)
  assert mouth.mean() < 100                                        # open mouth is dark inside
  open_img, lm_open = _render({})
  pupil = open_img[int(round((lm_open[37, 1] + lm_open[41, 1]) / 2)),
                   int(round((lm_open[36, 0] + lm_open[39, 0]) / 2))].astype(float)
  assert pupil.mean() < 60
  closed, _ = _render({43: 1.0})
  shut = closed[int(round((lm_open[37, 1] + lm_open[41, 1]) / 2)),
                int(round((lm_open[36, 0] + lm_open[39, 0]) / 2))].astype(float)
  assert np.abs(shut - _ID.skin).max() < 40                       # closed: lid skin, no pupil


def test_different_emotions_give_different_pixels_in_the_right_places():
  neutral, lm = _render({})
  box = lambda im, a, b: im[int(lm[a:b, 1].min()) - 4:int(lm[a:b, 1].max()) + 5,
                            int(lm[a:b, 0].min()) - 4:int(lm[a:b, 0].max()) + 5].astype(float)
  happy, _ = _render({6: 1.0, 12: 1.0})
  surprise, _ = _render({1: 1.0, 2: 1.0, 5: 1.0, 25: 1.0, 26: 1.0})
  assert np.abs(box(happy, 48, 68) - box(neutral, 48, 68)).mean() > 6        # mouth changes
  assert np.abs(box(surprise, 17, 27) - box(neutral, 17, 27)).mean() > 5     # brows move
  assert np.abs(box(surprise, 48, 68) - box(happy, 48, 68)).mean() > 10
  # Pixels far from the face (top corners) are untouched by expressions.
  assert np.array_equal(happy[:6, :6], neutral[:6, :6])


def test_random_faces_vary_identity_and_scene():
  a = faces.random_face(np.random.default_rng(1), {}, size=64)[0].astype(float)
  b = faces.random_face(np.random.default_rng(2), {}, size=64)[0].astype(float)
  assert np.abs(a - b).mean() > 10
  ids = [faces.sample_identity(np.random.default_rng(s)) for s in range(60)]
  assert len({i.hair_style for i in ids}) == len(faces.HAIR_STYLES)
  assert np.ptp([i.skin[0] for i in ids]) > 80


# --- descriptions ----------------------------------------------------------------------------
def test_emotion_texts_parse_to_their_class_and_avoid_negations():
  rng = np.random.default_rng(0)
  for emotion in facs.EMOTIONS:
    texts = set()
    for _ in range(300):
      aus = generate.prototype_aus(emotion, rng)
      text = descriptions.describe_emotion(emotion, aus, rng)
      texts.add(text.split(".")[0])
      assert parse_emotion(text) == emotion, text
      assert not any(n in text.lower() for n in _NEGATIONS), text
      assert not re.search(r"AU\d", text)
    assert len(texts) >= 10  # varied first sentences


def test_emotion_texts_cite_only_active_au_cues():
  rng = np.random.default_rng(1)
  for _ in range(200):
    text = descriptions.describe_emotion("Happiness", {6, 12}, rng)
    cues = [c for au, pair in descriptions.AU_CUES.items() for c in pair if c in text.lower()]
    assert cues and all(c in descriptions.AU_CUES[6] + descriptions.AU_CUES[12] for c in cues)


def test_au_texts_list_exactly_the_active_aus_in_order():
  rng = np.random.default_rng(0)
  layouts = set()
  for i in range(400):
    aus = sorted(generate.random_aus(rng))
    text = descriptions.describe_aus(aus, rng, emotion="Fear" if i % 3 == 0 else None)
    found = [int(n) for n in re.findall(r"AU(\d+)", text)]
    assert found == aus, text
    for au in aus:
      assert f"AU{au} ({facs.AU_NAMES[au]})" in text
    layouts.add(re.sub(r"AU\d+ \([a-z ]+\)", "X", text)[:25])
  assert len(layouts) >= 10


def test_description_errors():
  rng = np.random.default_rng(0)
  with pytest.raises(ValueError, match="at least one active AU"):
    descriptions.describe_aus([], rng)
  with pytest.raises(ValueError, match="unknown emotion 'Joy'"):
    descriptions.describe_emotion("Joy", [], rng)
  with pytest.raises(ValueError, match=r"unknown AUs \[3\]"):
    descriptions.describe_aus([3], rng)


# --- AU sampling -----------------------------------------------------------------------------
def test_au_samples_respect_facs_rules_and_vary_beyond_emotion():
  rng = np.random.default_rng(0)
  combos = [generate.random_aus(rng) for _ in range(2000)]
  for aus in combos:
    assert facs.is_compatible(aus) and facs.with_implied(aus) == aus
    assert aus & set(facs.EVAL_AUS)
  for au in facs.EVAL_AUS:
    freq = np.mean([au in a for a in combos])
    assert 0.1 < freq < 0.7, (au, freq)
  protos = [generate._perturbed_prototype("Happiness", rng) for _ in range(500)]
  assert len({frozenset(p) for p in protos}) > 5           # AUs vary within one emotion
  for emotion in facs.EMOTIONS:
    for _ in range(50):
      aus = generate.prototype_aus(emotion, rng)
      proto = facs.EMOTION_PROTOTYPES[emotion]
      assert set(proto.core) <= aus <= facs.with_implied(proto.all_aus())


# --- dataset writer --------------------------------------------------------------------------
def _files(root):
  out = {}
  for dirpath, _, names in os.walk(root):
    for name in names:
      path = os.path.join(dirpath, name)
      with open(path, "rb") as f:
        out[os.path.relpath(path, root)] = hashlib.sha256(f.read()).hexdigest()
  return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("syn"))
  info = generate.generate_dataset(root, num_train=8, num_test=7, seed=5, image_size=64)
  return root, info


def test_dataset_layout_and_schema(tiny):
  root, info = tiny
  assert info["prior_dim"] == 136 and info["image_size"] == 64 and info["seed"] == 5
  with open(os.path.join(root, "dataset_info.json")) as f:
    assert json.load(f) == info
  for task in ("emotion", "au"):
    for split, n in (("train", 8), ("test", 7)):
      with open(os.path.join(root, f"{task}_{split}.json")) as f:
        records = json.load(f)
      assert len(records) == n
      for r in records:
        keys = {"source", "id", "image", "landmark", "conversations"}
        assert set(r) == (keys | {"label", "gpt4"} if split == "test" else keys)
        name = r["id"].split("/", 1)[1]
        assert r["source"] == "Synthetic" and r["id"] == f"Synthetic/{name}"
        assert r["image"] == f"FABAInstruct/{split}/images/Synthetic/{name}.jpg"
        assert r["landmark"] == f"FABAInstruct/{split}/landmarks/Synthetic/{name}.npy"
        human, gpt = r["conversations"]
        assert human["from"] == "human" and gpt["from"] == "gpt"
        question, image_tag = human["value"].split("\n")
        assert image_tag == "<image>"
        if split == "train":
          assert question in instructions.INSTRUCTIONS[task]
        else:
          assert question == instructions.EVAL_PROMPTS[task] and r["gpt4"] == gpt["value"]
        img = Image.open(os.path.join(root, r["image"]))
        assert img.size == (64, 64) and img.mode == "RGB"
        prior = np.load(os.path.join(root, r["landmark"]))
        assert prior.shape == (136,) and prior.dtype == np.float32
        assert 0 <= prior.min() and prior.max() <= 1


def test_labels_match_texts_and_annotations(tiny):
  root, _ = tiny
  with open(os.path.join(root, "synthetic_annotations.json")) as f:
    notes = json.load(f)
  with open(os.path.join(root, "emotion_test.json")) as f:
    emotion_test = json.load(f)
  assert sorted(r["label"] for r in emotion_test) == sorted(facs.EMOTIONS)  # 7 = balanced
  for r in emotion_test:
    assert parse_emotion(r["gpt4"]) == r["label"] == notes[r["id"]]["emotion"]
  with open(os.path.join(root, "au_test.json")) as f:
    for r in json.load(f):
      aus = sorted(int(a) for a in notes[r["id"]]["aus"])
      assert r["label"] == ", ".join(str(a) for a in aus)
      assert [int(n) for n in re.findall(r"AU(\d+)", r["gpt4"])] == aus


def test_landmark_prior_matches_the_rendered_face(tiny):
  root, _ = tiny
  with open(os.path.join(root, "emotion_train.json")) as f:
    record = json.load(f)[0]
  with open(os.path.join(root, "synthetic_annotations.json")) as f:
    note = json.load(f)[record["id"]]
  rng = np.random.default_rng([5, 0, 0, 0])  # seed, task emotion, split train, index 0
  generate.prototype_aus(note["emotion"], rng)
  aus = {int(a): v for a, v in note["aus"].items()}
  [generate._intensity(rng) for _ in aus]
  image, lm = faces.random_face(rng, aus, size=64)
  prior = np.load(os.path.join(root, record["landmark"]))
  np.testing.assert_allclose(prior, (lm / 64).reshape(-1), atol=1e-6)
  stored = np.asarray(Image.open(os.path.join(root, record["image"])), np.float64)
  assert np.abs(stored - image).mean() < 3  # JPEG quality 95


def test_dataset_is_deterministic_and_splits_are_disjoint(tiny, tmp_path):
  root, _ = tiny
  again = str(tmp_path / "again")
  generate.generate_dataset(again, num_train=8, num_test=7, seed=5, image_size=64, num_workers=2)
  assert _files(root) == _files(again)
  other = str(tmp_path / "other")
  generate.generate_dataset(other, num_train=8, num_test=7, seed=6, image_size=64,
                            tasks=("emotion",))
  with open(os.path.join(root, "emotion_train.json"), "rb") as a, \
       open(os.path.join(other, "emotion_train.json"), "rb") as b:
    assert a.read() != b.read()
  hashes = _files(root)
  train = {h for p, h in hashes.items() if "/train/images/" in p}
  test = {h for p, h in hashes.items() if "/test/images/" in p}
  assert len(train) == 16 and len(test) == 14 and not train & test


def test_rerun_reuses_and_mismatch_needs_overwrite(tiny, tmp_path):
  root, info = tiny
  assert generate.generate_dataset(root, 8, 7, 5, image_size=64) == info
  with pytest.raises(FileExistsError, match="overwrite=True"):
    generate.generate_dataset(root, 8, 7, 6, image_size=64)
  path = str(tmp_path / "ow")
  generate.generate_dataset(path, 3, 2, 1, image_size=32, tasks=("au",))
  generate.generate_dataset(path, 2, 1, 1, image_size=32, tasks=("au",), overwrite=True)
  assert len(os.listdir(os.path.join(path, "FABAInstruct/train/images/Synthetic"))) == 2
  with pytest.raises(ValueError, match="tasks"):
    generate.generate_dataset(path, 2, 1, 1, tasks=("caption",))


def test_render_grid(tiny, tmp_path):
  root, _ = tiny
  out = generate.render_grid(str(tmp_path / "grid.png"), root, n=9)
  grid = np.asarray(Image.open(out))
  assert grid.shape == (3 * (128 + 30), 3 * 128, 3)
  assert grid.std() > 20
