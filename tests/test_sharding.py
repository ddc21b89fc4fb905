"""Sharded training on 8 simulated CPU devices: same losses as one device, real shardings."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests import train_fixtures

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
  return train_fixtures.make_dataset(tmp_path_factory.mktemp("shard_data"), num_train=48)


@pytest.fixture(scope="module")
def result(dataset):
  proc = subprocess.run([sys.executable, "-m", "tests.sharding_worker", dataset["data"],
                         dataset["tokenizer"], "5"], capture_output=True, text=True, cwd=REPO,
                        timeout=900)
  assert proc.returncode == 0, proc.stderr[-4000:]
  line = next(l for l in proc.stdout.splitlines() if l.startswith("RESULT "))
  return json.loads(line[len("RESULT "):])


@pytest.mark.parametrize("mesh", ["data8", "fsdp8", "fsdp4_tp2", "dp2_fsdp2_tp2"])
def test_losses_equal_single_device(result, mesh):
  ref = np.asarray(result["single"]["losses"])
  got = np.asarray(result[mesh]["losses"])
  assert len(got) == 5
  np.testing.assert_allclose(got, ref, rtol=1e-5)
  assert ref[-1] < ref[0]


def test_parameters_are_sharded_as_the_rules_say(result):
  fsdp = result["fsdp8"]["specs"]
  # Stacked decoder kernel [layers, embed, heads]: layers unsharded, embed over fsdp.
  assert fsdp["language_model.blocks.q_proj.kernel"] == [None, "fsdp", None]
  assert fsdp["language_model.embed_tokens"] == [None, "fsdp"]
  # ZeRO-3: what the rules leave off fsdp is split over it along a free dimension.
  assert fsdp["language_model.blocks.input_norm.scale"] == [None, "fsdp"]
  assert fsdp["language_model.blocks.q_proj.lora_b"] == [None, None, "fsdp"]  # [L, rank 4, heads]
  tp = result["fsdp4_tp2"]["specs"]
  assert tp["language_model.blocks.q_proj.kernel"] == [None, "fsdp", "tensor"]
  assert tp["language_model.blocks.o_proj.kernel"] == [None, "tensor", "fsdp"]
  assert tp["language_model.blocks.down_proj.kernel"] == [None, "tensor", "fsdp"]
  assert tp["language_model.lm_head"] == ["fsdp", "tensor"]
  assert tp["language_model.blocks.q_proj.lora_b"] == [None, "fsdp", "tensor"]
  assert tp["vision_tower.blocks.fc1.kernel"] == [None, "fsdp", "tensor"]
  assert tp["prior_projector.linear_1.kernel"] == ["fsdp", "tensor"]  # [prior 12, mlp]
  # Pure data parallelism keeps every weight whole on every device.
  assert all(all(a is None for a in spec) for spec in result["data8"]["specs"].values())
  # LoRA B [layers, rank, heads]: its Adam moments are sharded like it.
  assert "P(None, 'fsdp', 'tensor')" in result["fsdp4_tp2"]["opt_specs"]
  assert "P()" not in result["fsdp4_tp2"]["opt_specs"]
