"""The train step: loss definition, frozen sets, parameter groups, schedule, accumulation."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from emola_jax.model import presets
from emola_jax.model.emola import EmolaModel
from emola_jax.training import optimizer, param_groups, train_step


def _batch(config, batch=4, seed=0, text=10):
  rng = np.random.default_rng(seed)
  slots = config.num_image_slots
  ids = np.concatenate([np.ones((batch, 1), np.int32),
                        np.full((batch, slots), config.image_token_index, np.int32),
                        rng.integers(3, 200, size=(batch, text)).astype(np.int32)], axis=1)
  loss_mask = np.zeros_like(ids, np.float32)
  loss_mask[:, -text // 2:] = 1
  size = config.vision.image_size
  return {"input_ids": ids, "attention_mask": np.ones_like(ids),
          "loss_mask": loss_mask,
          "pixel_values": rng.normal(size=(batch, 3, size, size)).astype(np.float32),
          "prior": rng.normal(size=(batch, config.prior_dim)).astype(np.float32)}


def test_token_loss_matches_hand_computation():
  logits = jnp.asarray(np.random.default_rng(0).normal(size=(1, 4, 5)), jnp.float32)
  ids = jnp.asarray([[0, 3, 1, 4]])
  mask = jnp.asarray([[0, 1, 0, 1]])
  total, count = train_step.token_loss_sum(logits, ids, mask)
  lp = np.asarray(jax.nn.log_softmax(logits, -1))
  # Target 3 at t=1 is predicted from t=0; target 4 at t=3 from t=2.
  assert float(count) == 2
  np.testing.assert_allclose(float(total), -(lp[0, 0, 3] + lp[0, 2, 4]), rtol=1e-6)


def test_target_positions_lists_predicting_positions_in_order():
  mask = jnp.asarray([[0, 1, 0, 1, 1], [0, 0, 0, 0, 1], [0, 0, 0, 0, 0]])
  at, hit = train_step.target_positions(mask, 3)
  # Row 0: targets at 1, 3, 4 are predicted from 0, 2, 3.
  np.testing.assert_array_equal(np.asarray(at)[0], [0, 2, 3])
  np.testing.assert_array_equal(np.asarray(hit), [[1, 1, 1], [1, 0, 0], [0, 0, 0]])
  assert int(np.asarray(at)[1, 0]) == 3


@pytest.mark.parametrize("micro", [1, 2])
def test_target_logits_only_gives_the_same_loss_and_gradients(micro):
  config = presets.get("tiny").replace(**{"lora.rank": 4, "lora.alpha": 8.0})
  model = EmolaModel(config, rngs=nnx.Rngs(0))
  split = param_groups.SplitModel.from_model(model, param_groups.parse_trainable("emola"))
  tx = optax.sgd(1.0)
  batch = _batch(config, text=12)
  batch["loss_mask"][1, -4:] = 0  # rows with different target counts
  batch["loss_mask"][2, 3 + config.num_image_slots] = 1  # a target early in the text
  out = {}
  for only in (True, False):
    state = train_step.TrainState(jnp.zeros((), jnp.int32), split.trainable,
                                  tx.init(split.trainable), jax.random.key_data(jax.random.key(0)))
    step = jax.jit(train_step.make_train_step(split, tx, micro_batches=micro, dropout=False,
                                              target_logits_only=only))
    out[only] = step(state, split.frozen, batch)
  (s1, m1), (s2, m2) = out[True], out[False]
  np.testing.assert_allclose(float(m1["loss"]), float(m2["loss"]), rtol=1e-6)
  assert float(m1["supervised_tokens"]) == float(m2["supervised_tokens"])
  assert float(m1["unscored_targets"]) == float(m2["unscored_targets"]) == 0
  for k in s1.params:
    np.testing.assert_allclose(np.asarray(s1.params[k]), np.asarray(s2.params[k]),
                               rtol=1e-5, atol=1e-7, err_msg=k)


def test_targets_beyond_the_logit_positions_are_counted_not_lost():
  """A row without image slots but with images in the batch can hold more targets than the
  T - 1 - slots positions given logits; they are counted as unscored (the trainer raises)."""
  config = presets.get("tiny").replace(**{"lora.rank": 4, "lora.alpha": 8.0})
  model = EmolaModel(config, rngs=nnx.Rngs(0))
  split = param_groups.SplitModel.from_model(model, param_groups.parse_trainable("emola"))
  batch = _batch(config, batch=2, text=6)
  batch["loss_mask"][0, 1:] = 1  # every position a target: T - 1 of them
  loss, (count, unscored) = train_step.make_eval_step(split)(split.trainable, split.frozen,
                                                             batch)
  total = batch["loss_mask"][:, 1:].sum()
  assert float(count) == total and float(unscored) == config.num_image_slots
  loss_all, (_, unscored_all) = train_step.make_eval_step(split, False)(
      split.trainable, split.frozen, batch)
  assert float(unscored_all) == 0 and float(loss_all) > float(loss)


def test_schedule_is_warmup_then_cosine():
  schedule = optimizer.warmup_cosine(1e-4, total_steps=100, warmup_steps=3)
  assert float(schedule(0)) == 0.0
  np.testing.assert_allclose(float(schedule(2)), 1e-4 * 2 / 3, rtol=1e-6)
  np.testing.assert_allclose(float(schedule(3)), 1e-4, rtol=1e-6)
  for step in (10, 50, 99):
    progress = (step - 3) / 97
    np.testing.assert_allclose(float(schedule(step)), 1e-4 * 0.5 * (1 + math.cos(math.pi * progress)),
                               rtol=1e-5, atol=1e-11)
  assert optimizer.warmup_steps_for(1000, 0.03) == 30


def test_trainable_presets_and_errors():
  assert param_groups.parse_trainable("emola") == ("lora", "projector", "prior_projector")
  assert param_groups.parse_trainable("lora, llm") == ("lora", "llm")
  with pytest.raises(ValueError, match="train.trainable"):
    param_groups.parse_trainable("decoder")
  model = EmolaModel(presets.get("tiny"), rngs=nnx.Rngs(0))  # no LoRA
  with pytest.raises(ValueError, match="lora.rank"):
    param_groups.SplitModel.from_model(model, ("lora",))


def _setup(trainable="emola", micro=1, lora_rank=4, lr=1e-2, group_lrs=None, steps=20):
  config = presets.get("tiny").replace(**{"lora.rank": lora_rank, "lora.alpha": 8.0})
  model = EmolaModel(config, rngs=nnx.Rngs(0))
  split = param_groups.SplitModel.from_model(model, param_groups.parse_trainable(trainable))
  tx, schedules = optimizer.make_optimizer(
      split.trainable, lr=lr, group_lrs=group_lrs or {}, total_steps=steps, warmup_ratio=0.1,
      weight_decay=0.0, max_grad_norm=1.0, b1=0.9, b2=0.999, eps=1e-8)
  state = train_step.TrainState(jnp.zeros((), jnp.int32), split.trainable,
                                tx.init(split.trainable), jax.random.key_data(jax.random.key(0)))
  step = jax.jit(train_step.make_train_step(split, tx, micro_batches=micro))
  return config, split, state, step, schedules


def test_loss_falls_and_frozen_weights_are_bitwise_unchanged():
  config, split, state, step, _ = _setup(lr=3e-2, steps=30)
  batch = _batch(config)
  frozen_before = {k: np.asarray(v) for k, v in split.frozen.items()}
  losses = []
  for _ in range(30):
    state, metrics = step(state, split.frozen, batch)
    losses.append(float(metrics["loss"]))
  # LoRA on a random tiny decoder with frozen embeddings learns slowly, but steadily.
  assert losses[-1] < 0.95 * losses[0] and all(b <= a for a, b in zip(losses, losses[1:]))
  for k, v in split.frozen.items():
    np.testing.assert_array_equal(np.asarray(v), frozen_before[k])
  groups = param_groups.counts_by_group(split.trainable)
  assert set(groups) == {"lora", "projector", "prior_projector"}
  # Frozen parameters have no optimizer state: Adam moments exist for trained ones only.
  moments = [x for x in jax.tree.leaves(state.opt_state) if getattr(x, "ndim", 0) > 0]
  assert sum(x.size for x in moments) == 2 * param_groups.count(split.trainable)


def test_full_training_memorises_a_batch():
  config, split, state, step, _ = _setup(trainable="all", lr=3e-2, steps=30)
  batch = _batch(config)
  first = None
  for _ in range(30):
    state, metrics = step(state, split.frozen, batch)
    first = float(metrics["loss"]) if first is None else first
  assert float(metrics["loss"]) < 0.1 * first


def test_group_learning_rate_follows_its_own_schedule():
  """The visual projector moves at 2e-5 x schedule while the other groups move at 1e-4 x it."""
  config, split, state, step, schedules = _setup(group_lrs={"projector": 2e-5}, lr=1e-4)
  assert set(schedules) == {"default", "projector"}
  for s in (1, 5, 19):
    np.testing.assert_allclose(float(schedules["projector"](s)),
                               2e-5 / 1e-4 * float(schedules["default"](s)), rtol=1e-6)
  batch = _batch(config)
  state, _ = step(state, split.frozen, batch)  # lr(0) = 0: nothing moves
  before = dict(state.params)
  state, _ = step(state, split.frozen, batch)
  # Adam's first effective update has magnitude ~lr per coordinate (m/sqrt(v) ~ +-1).
  proj = np.abs(np.asarray(state.params["projector.linear_1.kernel"])
                - np.asarray(before["projector.linear_1.kernel"])).max()
  lora = np.abs(np.asarray(state.params["prior_projector.linear_1.kernel"])
                - np.asarray(before["prior_projector.linear_1.kernel"])).max()
  np.testing.assert_allclose(proj, float(schedules["projector"](1)), rtol=0.05)
  np.testing.assert_allclose(lora, float(schedules["default"](1)), rtol=0.05)


def test_gradient_accumulation_equals_one_big_batch():
  config, split, state1, step1, _ = _setup(micro=1)
  _, _, state2, step2, _ = _setup(micro=2)
  batch = _batch(config, batch=4)
  batch["loss_mask"][0, -3:] = 0  # uneven token counts across micro-batches
  for _ in range(3):
    state1, m1 = step1(state1, split.frozen, batch)
    state2, m2 = step2(state2, split.frozen, batch)
    np.testing.assert_allclose(float(m1["loss"]), float(m2["loss"]), rtol=1e-5)
    np.testing.assert_allclose(float(m1["grad_norm"]), float(m2["grad_norm"]), rtol=1e-4)
    assert float(m1["supervised_tokens"]) == float(m2["supervised_tokens"]) == 4 * 5 - 3


@pytest.mark.parametrize("impl,masks", [("threefry2x32", "bernoulli"), ("rbg", "bernoulli"),
                                        ("unsafe_rbg", "bernoulli"), ("threefry2x32", "hash")])
def test_dropout_prng_implementations(impl, masks):
  """Each `train.rng_impl` (and mask generator) draws LoRA dropout masks from its key, carried
  as raw key data."""
  config = presets.get("tiny").replace(**{"lora.rank": 4, "lora.alpha": 8.0,
                                          "lora.dropout": 0.5, "lora.dropout_masks": masks})
  split = param_groups.SplitModel.from_model(EmolaModel(config, rngs=nnx.Rngs(0)),
                                             param_groups.parse_trainable("emola"))
  tx = optax.adam(1e-2)
  step = jax.jit(train_step.make_train_step(split, tx, rng_impl=impl))
  batch = _batch(config)

  def second_loss(seed):  # B = 0 at first: dropout changes the loss from the second step on
    key = jax.random.key_data(jax.random.key(seed, impl=impl))
    state = train_step.TrainState(jnp.zeros((), jnp.int32), split.trainable,
                                  tx.init(split.trainable), key)
    state, _ = step(state, split.frozen, batch)
    assert state.rng.shape == key.shape and not np.array_equal(state.rng, key)
    return float(step(state, split.frozen, batch)[1]["loss"])

  assert second_loss(0) == second_loss(0)
  assert second_loss(0) != second_loss(1)


def test_unknown_rng_impl_is_refused():
  from emola_jax.training import experiment, trainer  # pylint: disable=import-outside-toplevel
  config = experiment.base_config("tiny")
  config.train.rng_impl = "philox"
  with pytest.raises(ValueError, match="train.rng_impl='philox'"):
    trainer.setup(config, steps=1)
