"""The one jitted train step shared by every stage (pre-training, instruction tuning, LoRA).

Loss: token cross-entropy summed over supervised target tokens and divided by their count over
the whole global batch (all micro-batches of a gradient-accumulation step together), so the
loss, and thus training, does not depend on how the batch is split over devices or micro-batches.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax

from emola_jax.training.param_groups import SplitModel

BATCH_KEYS = ("input_ids", "attention_mask", "loss_mask", "pixel_values", "prior")


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TrainState:
  step: jax.Array
  params: dict[str, jax.Array]  # trained parameters only
  opt_state: Any
  rng: jax.Array  # raw key data of the `rng_impl` the train step was made with


def token_loss_sum(logits: jax.Array, input_ids: jax.Array,
                   loss_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(sum of next-token NLL over supervised targets, number of supervised targets).

  `loss_mask[b, t]` marks `input_ids[b, t]` as a target, predicted from position t - 1.
  """
  return _nll_sum(logits[:, :-1], input_ids[:, 1:], loss_mask[:, 1:]), jnp.sum(
      loss_mask[:, 1:].astype(jnp.float32))


def _nll_sum(logits: jax.Array, targets: jax.Array, weights: jax.Array) -> jax.Array:
  logits = logits.astype(jnp.float32)
  targets = jnp.clip(targets, 0, logits.shape[-1] - 1)
  # The target's logit picked by comparison, not gathered: the gradient of a gather is a scatter
  # into a zeroed [B, T, V] buffer, that of the comparison one fused elementwise pass.
  is_target = jnp.arange(logits.shape[-1]) == targets[..., None]
  nll = jax.nn.logsumexp(logits, axis=-1) - jnp.sum(jnp.where(is_target, logits, 0.0), axis=-1)
  return jnp.sum(nll * weights.astype(jnp.float32))


def logit_positions(seq_len: int, image_slots: int) -> int:
  """Positions per row whose logits `target_logits_only` computes: the most that can precede a
  target (targets are text tokens after the first), T - 1 - image slots, at least 1."""
  return max(seq_len - 1 - image_slots, 1)


def target_positions(loss_mask: jax.Array, num: int) -> tuple[jax.Array, jax.Array]:
  """The first `num` positions t of each row whose next token is a target, in order.

  Returns ([B, num] int32 positions, [B, num] bool: whether each one is such a position; rows
  with fewer targets are filled with misses).
  """
  predicts = loss_mask[:, 1:] > 0
  order = jnp.argsort(jnp.logical_not(predicts).astype(jnp.int8), axis=1, stable=True)
  order = order[:, :num].astype(jnp.int32)
  return order, jnp.take_along_axis(predicts, order, axis=1)


def _loss_sum(params, frozen, split: SplitModel, batch, rng, target_logits_only: bool):
  """(NLL sum, (supervised targets, targets left unscored)) of one (micro-)batch.

  With `target_logits_only` the LM head runs only where a next token is scored: at most
  T - 1 - image slots positions per row (targets are text tokens after the first), which is
  about half the sequence for LLaVA-style rows. The count stays exact; a row with more targets
  than that (possible only without its image slots) leaves some unscored, which the trainer
  reports as an error.
  """
  model = split.merge(params, frozen)
  ids, loss_mask = batch["input_ids"], batch["loss_mask"]
  count = jnp.sum(loss_mask[:, 1:].astype(jnp.float32))
  if target_logits_only:
    slots = model.config.num_image_slots if batch.get("pixel_values") is not None else 0
    at, weights = target_positions(loss_mask, logit_positions(ids.shape[1], slots))
    targets = jnp.take_along_axis(ids, at + 1, axis=1)
  else:
    at, targets, weights = None, ids[:, 1:], loss_mask[:, 1:]
  logits = model(ids, batch.get("pixel_values"), batch["attention_mask"], batch.get("prior"),
                 dropout_rng=rng, logits_at=at)
  if at is None:
    logits = logits[:, :-1]
  scored = jnp.sum((weights > 0).astype(jnp.float32))
  return _nll_sum(logits, targets, weights), (count, count - scored)


def make_train_step(split: SplitModel, tx: optax.GradientTransformation, micro_batches: int = 1,
                    dropout: bool = True, target_logits_only: bool = True,
                    rng_impl: str = "threefry2x32"):
  """train_step(state, frozen, batch) -> (state, metrics); batch leading dim = global batch.

  metrics: loss, supervised_tokens, grad_norm and unscored_targets (0 unless a row held more
  targets than `target_logits_only` computes logits for; see `_loss_sum`).
  `rng_impl`: the PRNG behind LoRA dropout (`state.rng` holds its raw key data).
  """

  def train_step(state: TrainState, frozen: dict[str, jax.Array], batch: dict[str, jax.Array]):
    rng, step_rng = jax.random.split(jax.random.wrap_key_data(state.rng, impl=rng_impl))
    grad_fn = jax.value_and_grad(_loss_sum, has_aux=True)
    micro = jax.tree.map(
        lambda x: x.reshape(micro_batches, x.shape[0] // micro_batches, *x.shape[1:]), batch)

    def accumulate(carry, xs):
      grads, loss_sum, count, unscored = carry
      mb, key = xs
      (mb_loss, (mb_count, mb_unscored)), mb_grads = grad_fn(
          state.params, frozen, split, mb, key if dropout else None, target_logits_only)
      grads = jax.tree.map(jnp.add, grads, mb_grads)
      return (grads, loss_sum + mb_loss, count + mb_count, unscored + mb_unscored), None

    zeros = jax.tree.map(jnp.zeros_like, state.params)
    keys = jax.random.split(step_rng, micro_batches)
    scalar = jnp.zeros((), jnp.float32)
    (grads, loss_sum, count, unscored), _ = jax.lax.scan(
        accumulate, (zeros, scalar, scalar, scalar), (micro, keys))
    denom = jnp.maximum(count, 1.0)
    grads = jax.tree.map(lambda g: g / denom, grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {"loss": loss_sum / denom, "supervised_tokens": count,
               "grad_norm": optax.tree.norm(grads), "unscored_targets": unscored}
    return TrainState(state.step + 1, params, opt_state, jax.random.key_data(rng)), metrics

  return train_step


def make_eval_step(split: SplitModel, target_logits_only: bool = True):
  """eval_step(params, frozen, batch) -> (loss sum, (supervised count, unscored targets)),
  deterministic."""

  def eval_step(params, frozen, batch):
    return _loss_sum(params, frozen, split, batch, None, target_logits_only)

  return eval_step
