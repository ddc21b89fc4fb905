"""emola-convert: checkpoints between Hugging Face, the reference EmoLA release and emola-jax.

  # A transformers LLaVA directory -> a native checkpoint (Orbax params + config.json + tokenizer/)
  emola-convert --from=hf --input=llava-1.5-7b-hf --output=ckpt/llava
  # A native checkpoint -> a transformers directory (+ prior_projector.safetensors for EmoLA)
  emola-convert --from=native --to=hf --input=ckpt/emola --output=emola-hf --max_shard_size=5GB
  # The reference EmoLA release (LoRA folder) over its base LLaVA-1.5 -> a native checkpoint
  emola-convert --from=reference --input=emola-release --base=llava-v1.5-7b \\
      --vision=clip-vit-large-patch14-336 --output=ckpt/emola [--merge_lora]

The output directory must not exist (or be empty); it is written under a temporary name and
renamed at the end, so a failed conversion leaves nothing behind.
"""

from __future__ import annotations

import sys

from absl import app
from absl import flags

_FROM = flags.DEFINE_enum("from", "native", ["hf", "native", "reference"],
                          "Input format: a transformers LLaVA directory, a native emola-jax "
                          "checkpoint, or the reference EmoLA release (with --base).")
_TO = flags.DEFINE_enum("to", "native", ["native", "hf"],
                        "Output format: a native emola-jax checkpoint or a transformers LLaVA "
                        "directory.")
_INPUT = flags.DEFINE_string("input", None, "Input directory.")
_OUTPUT = flags.DEFINE_string("output", None, "Output directory (must not exist, or be empty).")
_BASE = flags.DEFINE_string("base", None, "--from=reference: the base LLaVA-1.5 directory in the "
                            "original layout (e.g. llava-v1.5-7b).")
_VISION = flags.DEFINE_string("vision", None, "--from=reference: a CLIP directory for the vision "
                              "tower (config, and weights when the base has none); default: the "
                              "base's mm_vision_tower if it is a local directory.")
_MERGE_LORA = flags.DEFINE_bool("merge_lora", False, "--from=reference: merge the LoRA adapter "
                                "into the base weights instead of keeping it as trainable LoRA "
                                "parameters. (--to=hf always merges.)")
_PRIOR_POSITION = flags.DEFINE_enum("prior_position", "after", ["after", "before", "none"],
                                    "--from=reference: where the prior token goes ('none' "
                                    "imports a release without a prior projector).")
_MAX_SHARD_SIZE = flags.DEFINE_string("max_shard_size", "5GB", "--to=hf: largest weight file "
                                      "before the weights are split into shards with an index.")
_DTYPE = flags.DEFINE_enum("dtype", None, ["float32", "bfloat16", "float16"],
                           "Parameter dtype of the output (default: float32 for native "
                           "checkpoints, the checkpoint's own for --to=hf).")

flags.mark_flags_as_required(["input", "output"])


def convert(source: str, target: str, input_dir: str, output_dir: str, *,
            base: str | None = None, vision: str | None = None, merge_lora: bool = False,
            prior_position: str = "after", max_shard_size: str = "5GB",
            dtype: str | None = None) -> None:
  """Runs one conversion; raises CheckpointError (bad input) or ValueError (bad options)."""
  # Imported here so that --help answers without loading JAX.
  # pylint: disable-next=import-outside-toplevel
  from emola_jax.conversion import hf_load, native, reference_release, to_hf

  to_hf.parse_size(max_shard_size)  # a bad size fails before any work
  if source == target:
    raise ValueError(f"--from={source} and --to={target}: nothing to convert")
  if (base or vision or merge_lora) and source != "reference":
    raise ValueError("--base, --vision and --merge_lora apply to --from=reference only")
  if source == "hf":
    hf_load.hf_to_native(input_dir, output_dir, **({"param_dtype": dtype} if dtype else {}))
  elif source == "native":
    to_hf.native_to_hf(input_dir, output_dir, max_shard_size=max_shard_size, dtype=dtype)
  else:
    if not base:
      raise ValueError("--from=reference needs --base (the base LLaVA-1.5 directory)")
    kwargs = dict(vision_dir=vision, merge_lora=merge_lora, prior_position=prior_position)
    if target == "native":
      reference_release.reference_to_native(input_dir, base, output_dir,
                                            param_dtype=dtype or "float32", **kwargs)
    else:
      model, _ = reference_release.import_reference(input_dir, base, **kwargs)
      with native.atomic_dir(output_dir) as tmp:
        to_hf.export_model(model, tmp, tokenizer_dir=base, max_shard_size=max_shard_size,
                           dtype=dtype)


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}; pass everything as --flags")
  # pylint: disable-next=import-outside-toplevel
  from emola_jax.conversion.safetensors_io import CheckpointError

  try:
    convert(_FROM.value, _TO.value, _INPUT.value, _OUTPUT.value, base=_BASE.value,
            vision=_VISION.value, merge_lora=_MERGE_LORA.value,
            prior_position=_PRIOR_POSITION.value, max_shard_size=_MAX_SHARD_SIZE.value,
            dtype=_DTYPE.value)
  except ValueError as error:  # CheckpointError included
    kind = "bad input" if isinstance(error, CheckpointError) else "usage"
    sys.exit(f"emola-convert: {kind}: {error}")
  print(f"emola-convert: wrote {_OUTPUT.value}")


def run() -> None:
  app.run(main)


if __name__ == "__main__":
  run()
