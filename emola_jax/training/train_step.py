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
  rng: jax.Array


def token_loss_sum(logits: jax.Array, input_ids: jax.Array,
                   loss_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(sum of next-token NLL over supervised targets, number of supervised targets).

  `loss_mask[b, t]` marks `input_ids[b, t]` as a target, predicted from position t - 1.
  """
  targets = jnp.clip(input_ids[:, 1:], 0, logits.shape[-1] - 1)
  mask = loss_mask[:, 1:].astype(jnp.float32)
  logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
  return jnp.sum(nll * mask), jnp.sum(mask)


def _loss_sum(params, frozen, split: SplitModel, batch, rng):
  model = split.merge(params, frozen)
  logits = model(batch["input_ids"], batch["pixel_values"], batch["attention_mask"],
                 batch.get("prior"), dropout_rng=rng)
  return token_loss_sum(logits, batch["input_ids"], batch["loss_mask"])


def make_train_step(split: SplitModel, tx: optax.GradientTransformation, micro_batches: int = 1,
                    dropout: bool = True):
  """train_step(state, frozen, batch) -> (state, metrics); batch leading dim = global batch."""

  def train_step(state: TrainState, frozen: dict[str, jax.Array], batch: dict[str, jax.Array]):
    rng, step_rng = jax.random.split(state.rng)
    grad_fn = jax.value_and_grad(_loss_sum, has_aux=True)
    micro = jax.tree.map(
        lambda x: x.reshape(micro_batches, x.shape[0] // micro_batches, *x.shape[1:]), batch)

    def accumulate(carry, xs):
      grads, loss_sum, count = carry
      mb, key = xs
      (mb_loss, mb_count), mb_grads = grad_fn(state.params, frozen, split, mb,
                                              key if dropout else None)
      grads = jax.tree.map(jnp.add, grads, mb_grads)
      return (grads, loss_sum + mb_loss, count + mb_count), None

    zeros = jax.tree.map(jnp.zeros_like, state.params)
    keys = jax.random.split(step_rng, micro_batches)
    (grads, loss_sum, count), _ = jax.lax.scan(
        accumulate, (zeros, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32)), (micro, keys))
    denom = jnp.maximum(count, 1.0)
    grads = jax.tree.map(lambda g: g / denom, grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {"loss": loss_sum / denom, "supervised_tokens": count,
               "grad_norm": optax.tree.norm(grads)}
    return TrainState(state.step + 1, params, opt_state, rng), metrics

  return train_step


def make_eval_step(split: SplitModel):
  """eval_step(params, frozen, batch) -> (loss sum, supervised count), deterministic."""

  def eval_step(params, frozen, batch):
    return _loss_sum(params, frozen, split, batch, None)

  return eval_step
