"""Tests of the FABA-Instruct instruction templates and the FABA-Bench evaluation prompts."""

import numpy as np
import pytest

from emola_jax.data import instructions

# Examples printed in the supplementary material, Fig. 2 (a) and (b).
_FIG2_EMOTION = (
    "What is the emotion of this face?",
    "Tell me about the emotion on this face",
    "Label the emotion of this face?",
    "How does the emotion on this face make you feel?",
    "What is your interpretation of the emotions displayed by this person?",
)
_FIG2_AU = (
    "What is the action units of this face?",
    "List all the action units of this face.",
    "Please enumerate the action units observed in this particular face?",
    "What specific facial movements correspond to action units of this image?",
    "Provide a detailed breakdown of the action units visible in this face.",
)


@pytest.mark.parametrize("templates", [instructions.EMOTION_INSTRUCTIONS,
                                       instructions.AU_INSTRUCTIONS])
def test_one_hundred_unique_templates(templates):
  assert len(templates) == 100
  assert len(set(templates)) == 100
  assert all(t == t.strip() and t and "<image>" not in t and "\n" not in t for t in templates)


def test_supplementary_examples_are_included_verbatim():
  for text in _FIG2_EMOTION:
    assert text in instructions.EMOTION_INSTRUCTIONS
  for text in _FIG2_AU:
    assert text in instructions.AU_INSTRUCTIONS


def test_eval_prompts_are_the_faba_bench_ones():
  assert instructions.EVAL_PROMPTS == {
      "emotion": "What emotions are conveyed by this face?",
      "au": "What AUs are conveyed by this face?",
  }
  assert instructions.EVAL_PROMPTS["emotion"] in instructions.EMOTION_INSTRUCTIONS
  assert instructions.EVAL_PROMPTS["au"] in instructions.AU_INSTRUCTIONS


def test_task_wording_matches_task():
  words = ("emotion", "feel", "mood", "expression")
  assert all(any(w in t.lower() for w in words) for t in instructions.EMOTION_INSTRUCTIONS)
  assert all("action unit" in t.lower() or "AU" in t or "Facial Action Coding" in t
             for t in instructions.AU_INSTRUCTIONS)


def test_sampling_is_deterministic_by_seed_and_covers_templates():
  def draw(task, seed, n=50):
    rng = np.random.default_rng(seed)
    return [instructions.sample_instruction(task, rng) for _ in range(n)]

  assert draw("emotion", 7) == draw("emotion", 7)
  assert draw("au", 3) == draw("au", 3)
  assert draw("au", 1) != draw("au", 2)
  # Uniform over the templates: index drawn with rng.integers(100).
  rng = np.random.default_rng(5)
  expected = [instructions.AU_INSTRUCTIONS[int(rng.integers(100))] for _ in range(50)]
  assert draw("au", 5) == expected
  rng = np.random.default_rng(0)
  seen = {instructions.sample_instruction("emotion", rng) for _ in range(3000)}
  assert seen == set(instructions.EMOTION_INSTRUCTIONS)


def test_unknown_task_is_an_error_naming_the_choices():
  with pytest.raises(ValueError, match="unknown task 'caption'.*'au', 'emotion'"):
    instructions.sample_instruction("caption", np.random.default_rng(0))
