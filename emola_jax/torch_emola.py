"""EmoLA in PyTorch: `transformers`' LLaVA plus the landmark prior token, for exported checkpoints.

`EmolaForConditionalGeneration.from_pretrained(dir)` loads a directory written by
`emola-convert --to=hf`: the LLaVA weights through `transformers`, and the prior projector
(Linear(prior_dim -> hidden), GELU, Linear(hidden -> hidden)) from `prior_projector.safetensors`
beside them; `config.json`'s `emola` entry says where the prior token goes. As in the JAX model,
each image occupies `num_patches + 1` placeholder ids (`config.image_token_id`) in `input_ids`,
filled by [visual tokens, prior token] ("after", the paper's model) or [prior token, visual
tokens] ("before"). Without an `emola` entry the model is plain LLaVA. Placeholder ids outside
the vocabulary (e.g. 32000 with a 32000-token vocabulary) are allowed.

Requires torch (`pip install emola-jax[torch]`).
"""

from __future__ import annotations

import os

import torch
import transformers
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import conversion_mapping

PRIOR_PROJECTOR_FILE = "prior_projector.safetensors"  # = hf_load.PRIOR_PROJECTOR_FILE + suffix
PRIOR_PREFIX = "prior_projector."
PRIOR_POSITIONS = ("after", "before", "none")


class PriorProjector(nn.Module):
  """[batch, prior_dim] -> [batch, hidden]: Linear, GELU (exact erf form), Linear."""

  def __init__(self, prior_dim: int, hidden_size: int):
    super().__init__()
    self.linear_1 = nn.Linear(prior_dim, hidden_size)
    self.act = nn.GELU()
    self.linear_2 = nn.Linear(hidden_size, hidden_size)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.linear_2(self.act(self.linear_1(x)))


class EmolaForConditionalGeneration(transformers.LlavaForConditionalGeneration):
  """`LlavaForConditionalGeneration` with EmoLA's prior token; `forward(..., prior_features=)`."""

  # The prior projector is stored in its own file, read by `from_pretrained` below.
  _keys_to_ignore_on_load_missing = [r"^prior_projector\."]

  def __init__(self, config: transformers.LlavaConfig):
    super().__init__(config)
    emola = getattr(config, "emola", None) or {}
    self.prior_position = emola.get("prior_position", "none")
    if self.prior_position not in PRIOR_POSITIONS:
      raise ValueError(f"config.emola.prior_position={self.prior_position!r} is not one of "
                       f"{PRIOR_POSITIONS}")
    self.prior_projector = (
        PriorProjector(int(emola.get("prior_dim", 212)), config.text_config.hidden_size)
        if self.prior_position != "none" else None)

  @classmethod
  def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
    """Loads the LLaVA weights, then the prior projector from `prior_projector.safetensors`."""
    loaded = super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
    model = loaded[0] if isinstance(loaded, tuple) else loaded
    if model.prior_projector is not None:
      path = transformers.utils.cached_file(
          pretrained_model_name_or_path, PRIOR_PROJECTOR_FILE,
          _raise_exceptions_for_missing_entries=False,
          **{k: kwargs[k] for k in ("cache_dir", "local_files_only", "revision", "token")
             if k in kwargs})
      if path is None:
        raise OSError(f"{pretrained_model_name_or_path}: config.json has a prior token "
                      f"({model.prior_position!r}) but {PRIOR_PROJECTOR_FILE} is missing; "
                      "re-export the checkpoint with emola-convert --to=hf")
      model.load_prior_projector(path)
    return loaded

  def load_prior_projector(self, path: str) -> None:
    """Reads the prior projector weights (keys `prior_projector.linear_{1,2}.{weight,bias}`)."""
    tensors = load_file(path)
    unknown = [k for k in tensors if not k.startswith(PRIOR_PREFIX)]
    if unknown:
      raise ValueError(f"{path}: unexpected tensor(s) {unknown}")
    weight = self.prior_projector.linear_1.weight
    state = {k[len(PRIOR_PREFIX):]: v.to(weight.dtype) for k, v in tensors.items()}
    try:
      self.prior_projector.load_state_dict(state, strict=True)
    except RuntimeError as e:
      raise ValueError(f"{path}: does not fit this model's prior projector: {e}") from None

  def save_pretrained(self, save_directory, *args, **kwargs):
    """Writes the LLaVA directory and, for a prior token, `prior_projector.safetensors`."""
    state = kwargs.pop("state_dict", None)
    state = self.state_dict() if state is None else state
    main = {k: v for k, v in state.items() if not k.startswith(PRIOR_PREFIX)}
    super().save_pretrained(save_directory, *args, state_dict=main, **kwargs)
    if self.prior_projector is not None:
      prior = {k: v.detach().contiguous().cpu() for k, v in state.items()
               if k.startswith(PRIOR_PREFIX)}
      save_file(prior, os.path.join(save_directory, PRIOR_PROJECTOR_FILE),
                metadata={"format": "pt", "prior_position": self.prior_position,
                          "prior_dim": str(self.prior_projector.linear_1.in_features)})

  def image_slot_embeddings(self, pixel_values: torch.Tensor,
                            prior_features: torch.Tensor | None) -> torch.Tensor:
    """[images, slots, hidden]: the projected patch features, with the prior token if any."""
    features = self.get_image_features(
        pixel_values=pixel_values, vision_feature_layer=self.config.vision_feature_layer,
        vision_feature_select_strategy=self.config.vision_feature_select_strategy,
        return_dict=True).pooler_output
    visual = torch.stack(list(features))
    if self.prior_projector is None:
      return visual
    if prior_features is None:
      raise ValueError(f"this model has a prior token (prior_position={self.prior_position!r}): "
                       f"pass prior_features [batch, {self.prior_projector.linear_1.in_features}]")
    prior = self.prior_projector(prior_features.to(visual.dtype))[:, None, :]
    parts = [visual, prior] if self.prior_position == "after" else [prior, visual]
    return torch.cat(parts, dim=1)

  def forward(self, input_ids: torch.LongTensor | None = None,
              pixel_values: torch.Tensor | None = None,
              attention_mask: torch.Tensor | None = None,
              prior_features: torch.Tensor | None = None,
              inputs_embeds: torch.Tensor | None = None, **kwargs):
    """As `LlavaForConditionalGeneration.forward`; `prior_features` [batch, prior_dim].

    With `pixel_values`, the image slots of `input_ids` are filled here (the prior token included)
    and the language model runs on the embeddings; without, e.g. in later generation steps, the
    call is LLaVA's own (`prior_features` then has no use and is ignored).
    """
    if pixel_values is None:
      return super().forward(input_ids=input_ids, attention_mask=attention_mask,
                             inputs_embeds=inputs_embeds, **kwargs)
    if input_ids is None:
      raise ValueError("pass input_ids with pixel_values: the image slots are found from the ids")
    slots = input_ids == self.config.image_token_id
    # The placeholder id may lie outside the vocabulary; its embedding is replaced anyway.
    embeds = self.get_input_embeddings()(input_ids.masked_fill(slots, 0))
    image = self.image_slot_embeddings(pixel_values, prior_features)
    if int(slots.sum()) != image.shape[0] * image.shape[1]:
      prior = int(self.prior_projector is not None)
      raise ValueError(f"input_ids hold {int(slots.sum())} image placeholders (id "
                       f"{self.config.image_token_id}); {image.shape[0]} image(s) need "
                       f"{image.shape[1]} each ({image.shape[1] - prior} visual + {prior} prior)")
    embeds = embeds.masked_scatter(slots[..., None].expand_as(embeds), image.to(embeds.dtype))
    return super().forward(input_ids=None, attention_mask=attention_mask, inputs_embeds=embeds,
                           **kwargs)


# `transformers` renames checkpoint keys (e.g. `language_model.lm_head` -> `lm_head`) by a table
# keyed by class name, and skips classes defined outside the library unless registered.
if "EmolaForConditionalGeneration" not in conversion_mapping.USER_REGISTERED_MAPPINGS:
  conversion_mapping.register_checkpoint_conversion_mapping(
      "EmolaForConditionalGeneration",
      conversion_mapping.get_checkpoint_conversion_mapping("llava"), overwrite=True)
