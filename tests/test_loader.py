"""Tests for the Grain loader: batch contents, padding, sharding, skips, and exact resumption."""

import io
import json

import numpy as np
import orbax.checkpoint as ocp
import pytest
import skimage.data
from PIL import Image

from emola_jax.data import images, loader, priors, shards
from emola_jax.data import tokenize as tok
from tests.fixtures_tokenizer import llama_tokenizer  # noqa: F401  (pytest fixture)

SLOTS, IMG, PAD, SIZE, PRIOR_DIM = 4, 600, 0, 32, 8
N = 11
LONG_ANSWER, LONG_QUESTION = 3, 7  # indices of the sample truncated / rejected


def _jpeg(i: int) -> bytes:
  crop = Image.fromarray(skimage.data.astronaut()).crop((i * 20, i * 5, i * 20 + 240, i * 5 + 200))
  buf = io.BytesIO()
  crop.resize((40 + i, 36 + 2 * i)).save(buf, format="JPEG")
  return buf.getvalue()


def _examples() -> list[dict]:
  out = []
  for i in range(N):
    question = "What is the emotion of this face?"
    answer = "The person looks happy." + " Very" * (i % 3)
    if i == LONG_ANSWER:
      answer = "The person looks happy and relaxed. " * 10
    if i == LONG_QUESTION:
      question = "Describe the face in detail, please. " * 10
    out.append({
        "id": f"ex-{i:02d}", "source": "test", "task": "emotion", "image_bytes": _jpeg(i),
        # The prior's first value is the example index: it identifies rows in a batch.
        "prior": np.arange(i, i + PRIOR_DIM, dtype=np.float32),
        "conversations": [{"from": "human", "value": f"{question}\n<image>"},
                          {"from": "gpt", "value": answer}],
        "label": "Happiness", "gpt4": "",
    })
  return out


EXAMPLES = _examples()


@pytest.fixture(scope="module")
def setup(llama_tokenizer):
  hf = llama_tokenizer.hf()
  conv_tok = tok.ConversationTokenizer(hf, num_image_slots=SLOTS, image_token_index=IMG)
  lengths = [len(conv_tok(ex["conversations"]).input_ids) for ex in EXAMPLES]
  normal = max(n for i, n in enumerate(lengths) if i not in (LONG_ANSWER, LONG_QUESTION))
  max_length = normal + 2
  assert lengths[LONG_ANSWER] > max_length
  # The long question pushes the first answer token past max_length.
  first_target = int(np.argmax(conv_tok(EXAMPLES[LONG_QUESTION]["conversations"]).loss_mask))
  assert first_target >= max_length
  return {"tokenizer": hf, "max_length": max_length, "lengths": lengths}


def _loader(setup, source=None, **kwargs):
  args = dict(tokenizer=setup["tokenizer"], num_image_slots=SLOTS, image_token_index=IMG,
              pad_id=PAD, image_size=SIZE,
              prior_provider=priors.make_prior_provider("npy", prior_dim=PRIOR_DIM),
              batch_size=3, max_length=setup["max_length"], shard_index=0, shard_count=1)
  args.update(kwargs)
  return loader.make_loader(EXAMPLES if source is None else source, **args)


def _take(it, n):
  out = [next(it) for _ in range(n)]
  return out


def _assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert sorted(x) == sorted(y)
    for key in x:
      assert x[key].dtype == y[key].dtype and x[key].shape == y[key].shape, key
      assert x[key].tobytes() == y[key].tobytes(), key


def test_batch_contents_shapes_and_counters(setup):
  it = _loader(setup, shuffle=False, drop_remainder=False)
  batches = list(it)
  L = setup["max_length"]
  rows = []
  for batch in batches:
    assert set(batch) == {"input_ids", "attention_mask", "loss_mask", "pixel_values", "prior"}
    b = batch["input_ids"].shape[0]
    assert batch["input_ids"].shape == (b, L) and batch["input_ids"].dtype == np.int32
    assert batch["attention_mask"].shape == (b, L) and batch["attention_mask"].dtype == np.int32
    assert batch["loss_mask"].shape == (b, L) and batch["loss_mask"].dtype == np.float32
    assert batch["pixel_values"].shape == (b, 3, SIZE, SIZE)
    assert batch["pixel_values"].dtype == np.float32
    assert batch["prior"].shape == (b, PRIOR_DIM) and batch["prior"].dtype == np.float32
    for r in range(b):
      rows.append({k: v[r] for k, v in batch.items()})
  kept = [i for i in range(N) if i != LONG_QUESTION]
  assert [int(row["prior"][0]) for row in rows] == kept  # source order, the rejected one skipped
  reference = tok.ConversationTokenizer(setup["tokenizer"], num_image_slots=SLOTS,
                                        image_token_index=IMG, max_length=L)
  for i, row in zip(kept, rows):
    ex = EXAMPLES[i]
    expected = reference(ex["conversations"])
    n = len(expected.input_ids)
    assert n == min(setup["lengths"][i], L)
    # Right padding with the pad id; attention on real tokens; targets only on real tokens.
    np.testing.assert_array_equal(row["input_ids"][:n], expected.input_ids)
    assert (row["input_ids"][n:] == PAD).all()
    np.testing.assert_array_equal(row["attention_mask"], (np.arange(L) < n).astype(np.int32))
    np.testing.assert_array_equal(row["loss_mask"][:n], expected.loss_mask.astype(np.float32))
    assert (row["loss_mask"][n:] == 0).all() and row["loss_mask"].sum() > 0
    assert (row["input_ids"] == IMG).sum() == SLOTS
    np.testing.assert_array_equal(
        row["pixel_values"],
        images.preprocess_image(images.decode_image(ex["image_bytes"]), SIZE, "pad"))
    np.testing.assert_array_equal(row["prior"], ex["prior"])
  assert it.stats == loader.LoaderStats(examples=N - 1, batches=len(batches), truncated=1,
                                        image_does_not_fit=0, no_target_left=1, no_face=0)
  assert len(batches) == 4 and it.stats.skipped == 1


def test_drop_remainder_and_length_buckets(setup):
  L = setup["max_length"]
  short = min(setup["lengths"])
  buckets = (short, short + 1, L - 1)
  batches = list(_loader(setup, shuffle=False, batch_size=2, length_buckets=buckets))
  assert len(batches) == (N - 1) // 2  # 10 kept samples, no remainder dropped here
  for batch in batches:
    longest = batch["attention_mask"].sum(axis=1).max()
    expected = min([b for b in buckets if b >= longest], default=L)
    assert batch["input_ids"].shape[1] == expected
  batches = list(_loader(setup, shuffle=False, batch_size=3, drop_remainder=True))
  assert len(batches) == 3  # 10 kept samples: the last one is dropped
  with pytest.raises(ValueError, match="length_buckets"):
    _loader(setup, length_buckets=(L + 1,))


def test_process_shards_are_disjoint_and_cover_the_data(setup):
  seen = []
  for index in range(3):
    it = _loader(setup, shard_index=index, shard_count=3, batch_size=2, drop_remainder=False,
                 seed=5)
    seen.append([int(v) for batch in it for v in batch["prior"][:, 0]])
  for a in range(3):
    for b in range(a + 1, 3):
      assert not set(seen[a]) & set(seen[b])
  assert sorted(v for s in seen for v in s) == [i for i in range(N) if i != LONG_QUESTION]
  with pytest.raises(ValueError, match="shard_index"):
    _loader(setup, shard_index=3, shard_count=3)


def test_shuffle_is_seeded_and_reshuffles_each_epoch(setup):
  def order(seed):
    it = _loader(setup, seed=seed, batch_size=1, num_epochs=2, max_length=500)
    return [int(b["prior"][0, 0]) for b in it]
  first = order(1)
  assert first == order(1) and first != order(2)
  assert sorted(first[:N]) == list(range(N)) and first[:N] != first[N:]


@pytest.mark.parametrize("worker_count", [0, 1])
def test_resume_from_saved_state_is_exact(setup, worker_count):
  k, m = 2, 3
  ref_it = _loader(setup, seed=3, batch_size=2, num_epochs=None)
  reference = _take(ref_it, k + m)
  reference_stats = ref_it.stats

  first = _loader(setup, seed=3, batch_size=2, num_epochs=None, worker_count=worker_count)
  head = _take(first, k)
  state = json.loads(json.dumps(first.get_state()))  # as Orbax stores it
  first.close()

  resumed = _loader(setup, seed=3, batch_size=2, num_epochs=None, worker_count=worker_count)
  resumed.set_state(state)
  tail = _take(resumed, m)
  resumed.close()
  _assert_batches_equal(head + tail, reference)
  assert resumed.stats == reference_stats


def test_orbax_checkpoint_helper(setup, tmp_path):
  it = _loader(setup, seed=4, batch_size=2, num_epochs=None)
  _take(it, 2)
  expected = _take(_loader(setup, seed=4, batch_size=2, num_epochs=None), 4)[2:]
  with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
    manager.save(7, args=ocp.args.Composite(data=loader.checkpoint_args(it)))
    manager.wait_until_finished()
  fresh = _loader(setup, seed=4, batch_size=2, num_epochs=None)
  with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
    restored = manager.restore(7, args=ocp.args.Composite(
        data=loader.checkpoint_args(fresh, restore=True)))
  assert restored["data"] is fresh
  _assert_batches_equal(_take(fresh, 2), expected)
  assert fresh.stats.batches == 4  # 2 restored + 2 taken


def test_reads_real_shards(setup, tmp_path, llama_tokenizer):
  shards.write_shards(EXAMPLES, tmp_path, "train", num_shards=3)
  source = shards.open_split(tmp_path, "train")
  # The tokenizer given as a folder, as the training CLI passes it.
  from_shards = list(_loader(setup, source=source, seed=9, drop_remainder=False,
                             tokenizer=str(llama_tokenizer.hf_dir)))
  from_list = list(_loader(setup, seed=9, drop_remainder=False))
  _assert_batches_equal(from_shards, from_list)


def test_bad_samples_raise_or_are_counted(setup):
  missing = [dict(EXAMPLES[0], id="no-prior", prior=np.zeros((0,), np.float32))]
  with pytest.raises(priors.MissingPriorError, match="no-prior"):
    next(_loader(setup, source=missing, batch_size=1))
  grey, face = io.BytesIO(), io.BytesIO()
  Image.new("RGB", (48, 48), (128, 128, 128)).save(grey, format="PNG")
  Image.fromarray(skimage.data.astronaut()).save(face, format="JPEG")
  mixed = [dict(EXAMPLES[0], id="grey", image_bytes=grey.getvalue()),
           dict(EXAMPLES[1], id="astronaut", image_bytes=face.getvalue())]
  dlib = priors.make_prior_provider("dlib", upsample=0)
  with pytest.raises(priors.NoFaceError, match="grey"):
    next(_loader(setup, source=mixed, batch_size=1, shuffle=False, prior_provider=dlib))
  it = _loader(setup, source=mixed, batch_size=1, shuffle=False, prior_provider=dlib,
               skip_no_face=True)
  batch = next(it)
  assert batch["prior"].shape == (1, 136)
  assert it.stats.no_face == 1 and it.stats.examples == 1
  broken = [dict(EXAMPLES[0], id="broken", image_bytes=b"\xff\xd8 truncated")]
  with pytest.raises(images.ImageDecodeError, match="broken"):
    next(_loader(setup, source=broken, batch_size=1))


def test_a_stream_whose_every_sample_is_rejected_fails_instead_of_hanging(setup):
  """With num_epochs=None a too-small max_length used to spin forever; now it is an error."""
  it = _loader(setup, max_length=SLOTS + 2, num_epochs=None)
  with pytest.raises(ValueError, match="rejected.*Raise max_length"):
    next(it)
