"""Import of the reference EmoLA release (LoRA folder over an original-layout LLaVA-1.5 base).

The test writes a tiny release the way the reference training leaves it: the base in the original
LLaVA layout (written here from a tiny `transformers` model's weights), a PEFT adapter made by the
`peft` library on the tiny LLaMA, `non_lora_trainables.bin` with a retrained projector and
`landmark_feature_projector.bin`. The reference logits come from PyTorch: `peft`'s own
`merge_and_unload` for the LoRA, in `EmolaForConditionalGeneration`.
"""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
import transformers

from emola_jax.cli import convert
from emola_jax.conversion import native, reference_release
from emola_jax.torch_emola import EmolaForConditionalGeneration
from tests import hf_tiny

TOL = 1e-4
PRIOR_DIM = 12
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
IMAGE_TOKEN = hf_tiny.TEXT["vocab_size"]  # outside the vocabulary, like LLaVA's placeholder


def _original_layout(llava) -> dict[str, torch.Tensor]:
  """The tiny LLaVA's weights under the original LLaVA release's key names."""
  out = {}
  for key, value in llava.state_dict().items():
    value = value.detach().clone()
    if key.startswith("model.vision_tower."):
      name = key[len("model.vision_tower."):]
      out["model.vision_tower.vision_tower.vision_model." + name] = value
    elif key.startswith("model.multi_modal_projector."):
      name = key[len("model.multi_modal_projector."):]
      out["model.mm_projector." + name.replace("linear_1", "0").replace("linear_2", "2")] = value
    elif key.startswith("model.language_model."):
      out["model." + key[len("model.language_model."):]] = value
    else:
      assert key == "lm_head.weight", key
      out[key] = value
  return out


def _random_like(shape, gen, scale=0.3):
  return torch.randn(shape, generator=gen) * scale / max(1, shape[-1]) ** 0.5


def write_release(root, *, adapter_safetensors=True, landmark_prefix=""):
  """Writes base/, clip/ (config only) and release/ under `root`; returns the torch reference."""
  gen = torch.Generator().manual_seed(7)
  llava = hf_tiny.llava(seed=5)
  base_dir, clip_dir, release_dir = root / "base", root / "clip", root / "release"
  for d in (base_dir, clip_dir, release_dir):
    d.mkdir()
  hf_tiny.clip_config().save_pretrained(clip_dir)
  # Base in the original layout, two .bin shards with an index, a flat LLaMA config + mm_* fields.
  state = _original_layout(llava)
  keys = sorted(state)
  shards = {"pytorch_model-00001-of-00002.bin": keys[::2],
            "pytorch_model-00002-of-00002.bin": keys[1::2]}
  for name, shard_keys in shards.items():
    torch.save({k: state[k] for k in shard_keys}, base_dir / name)
  (base_dir / "pytorch_model.bin.index.json").write_text(json.dumps(
      {"metadata": {}, "weight_map": {k: n for n, ks in shards.items() for k in ks}}))
  config = hf_tiny.llama_config().to_dict()
  config.update(architectures=["LlavaLlamaForCausalLM"], model_type="llava",
                mm_vision_tower=str(clip_dir), mm_hidden_size=hf_tiny.VISION["hidden_size"],
                mm_projector_type="mlp2x_gelu", mm_vision_select_layer=-2,
                mm_vision_select_feature="patch", mm_use_im_start_end=False,
                mm_use_im_patch_token=False, image_aspect_ratio="pad")
  (base_dir / "config.json").write_text(json.dumps(config))
  (base_dir / "tokenizer_config.json").write_text('{"model_max_length": 2048}')
  # PEFT LoRA on the tiny LLaMA (the decoder of the base), B randomised so it is not a no-op.
  llama = transformers.LlamaForCausalLM(hf_tiny.llama_config())
  llama.load_state_dict({k: v for k, v in state.items() if not k.startswith(
      ("model.vision_tower.", "model.mm_projector."))})
  peft_model = peft.get_peft_model(llama, peft.LoraConfig(
      r=8, lora_alpha=16, lora_dropout=0.05, target_modules=LORA_TARGETS))
  with torch.no_grad():
    for name, p in peft_model.named_parameters():
      if "lora_" in name:
        p.copy_(_random_like(p.shape, gen, 1.0))
  peft_model.save_pretrained(release_dir, safe_serialization=adapter_safetensors)
  merged = peft_model.merge_and_unload()
  # The retrained projector and the prior projector.
  projector = {f"{i}.{leaf}": _random_like(state[f"model.mm_projector.{i}.{leaf}"].shape, gen)
               for i in (0, 2) for leaf in ("weight", "bias")}
  torch.save({f"base_model.model.model.mm_projector.{k}": v for k, v in projector.items()},
             release_dir / "non_lora_trainables.bin")
  hidden = hf_tiny.TEXT["hidden_size"]
  landmark = torch.nn.Sequential(torch.nn.Linear(PRIOR_DIM, hidden), torch.nn.GELU(),
                                 torch.nn.Linear(hidden, hidden))
  torch.save({landmark_prefix + k: v for k, v in landmark.state_dict().items()},
             release_dir / "landmark_feature_projector.bin")
  # The reference: EmolaForConditionalGeneration holding the merged weights.
  ref_config = transformers.LlavaConfig(
      vision_config=hf_tiny.clip_config(), text_config=hf_tiny.llama_config(),
      image_token_index=IMAGE_TOKEN, vision_feature_layer=-2)
  ref_config.emola = {"prior_position": "after", "prior_dim": PRIOR_DIM}
  ref = EmolaForConditionalGeneration(ref_config).eval()
  with torch.no_grad():
    ref.model.vision_tower.load_state_dict(llava.model.vision_tower.state_dict())
    ref.model.multi_modal_projector.load_state_dict(
        {k.replace("0.", "linear_1.").replace("2.", "linear_2."): v for k, v in projector.items()})
    ref.model.language_model.load_state_dict(merged.model.state_dict())
    ref.lm_head.load_state_dict(merged.lm_head.state_dict())
    ref.prior_projector.load_state_dict(
        {k.replace("0.", "linear_1.").replace("2.", "linear_2."): v
         for k, v in landmark.state_dict().items()})
  base_lm = {k[len("model."):]: v for k, v in state.items() if k.startswith("model.") and not
             k.startswith(("model.vision_tower.", "model.mm_projector."))}
  return base_dir, release_dir, ref, base_lm


def _inputs(seed=0):
  rng = np.random.default_rng(seed)
  slots = (hf_tiny.VISION["image_size"] // hf_tiny.VISION["patch_size"]) ** 2 + 1
  ids = np.asarray([[1, 5, 9] + [IMAGE_TOKEN] * slots + [20, 30, 40, 50],
                    [1, 7] + [IMAGE_TOKEN] * slots + [21, 31, 41, 51, 61]], np.int64)
  pixels = rng.normal(size=(2, 3, 28, 28)).astype(np.float32)
  prior = rng.normal(size=(2, PRIOR_DIM)).astype(np.float32)
  return ids, pixels, prior


def _torch_logits(model, ids, pixels, prior):
  with torch.no_grad():
    return model(input_ids=torch.from_numpy(ids), pixel_values=torch.from_numpy(pixels),
                 prior_features=torch.from_numpy(prior)).logits.numpy()


@pytest.mark.parametrize("merge,adapter_safetensors,landmark_prefix", [
    (True, True, ""),  # the nn.Sequential's own state dict
    (False, False, "base_model.model.model.landmark_feature_projector."),  # PEFT-wrapped names
])
def test_reference_import_matches_merged_pytorch(tmp_path, merge, adapter_safetensors,
                                                 landmark_prefix):
  base_dir, release_dir, ref, base_lm = write_release(
      tmp_path, adapter_safetensors=adapter_safetensors, landmark_prefix=landmark_prefix)
  out = tmp_path / "native"
  config = reference_release.reference_to_native(str(release_dir), str(base_dir), str(out),
                                                 merge_lora=merge)
  model, loaded = native.load_native(str(out))
  assert loaded == config
  assert config.image_token_index == IMAGE_TOKEN and config.prior_dim == PRIOR_DIM
  if merge:
    assert config.lora.rank == 0
  else:  # kept as trainable LoRA with the adapter's settings
    assert (config.lora.rank, config.lora.alpha, config.lora.dropout) == (8, 16.0, 0.05)
    assert config.lora.targets == tuple(LORA_TARGETS)
    assert float(jnp.abs(model.language_model.blocks.q_proj.lora_b[...]).max()) > 0
  assert (out / "tokenizer" / "tokenizer_config.json").exists()
  ids, pixels, prior = _inputs()
  expected = _torch_logits(ref, ids, pixels, prior)
  ours = model(jnp.asarray(ids), jnp.asarray(pixels), prior_features=jnp.asarray(prior))
  assert hf_tiny.rel_err(ours, expected) <= TOL
  # The comparison is sensitive to the adapter: without it the reference moves far beyond TOL.
  ref.model.language_model.load_state_dict(base_lm)
  assert hf_tiny.rel_err(_torch_logits(ref, ids, pixels, prior), expected) > 100 * TOL


def test_reference_to_hf_runs_in_pytorch(tmp_path):
  """--from=reference --to=hf: the LoRA kept at import is merged on export; PyTorch agrees."""
  base_dir, release_dir, ref, _ = write_release(tmp_path)
  out = tmp_path / "hf"
  convert.convert("reference", "hf", str(release_dir), str(out), base=str(base_dir))
  model = EmolaForConditionalGeneration.from_pretrained(out).eval()
  assert (out / "tokenizer_config.json").exists()
  ids, pixels, prior = _inputs(seed=1)
  assert hf_tiny.rel_err(_torch_logits(model, ids, pixels, prior),
                         _torch_logits(ref, ids, pixels, prior)) <= TOL
