"""Fixed-shape batches: padding, masks, positions, length buckets, micro-batches and the resumable iterator."""

from __future__ import annotations

import json

import numpy as np
import pytest

from safety_jax.data.batches import BatchIterator, default_buckets, left_pad_prompts, pad_batch, pick_bucket


def make_examples(lengths, seed=0, prompt_len=2):
    """SFT examples with distinct tokens (example i's tokens start at 1000 * (i + 1)) and a prompt of prompt_len."""
    rng = np.random.default_rng(seed)
    out = []
    for i, n in enumerate(lengths):
        tokens = 1000 * (i + 1) + np.arange(n, dtype=np.int32)
        mask = (np.arange(n) >= min(prompt_len, n - 1)).astype(np.int32)
        out.append({"tokens": tokens, "loss_mask": mask, "ref_logp": float(rng.normal()), "text": f"ex{i}"})
    return out


def test_default_buckets_are_powers_of_two_up_to_max_length():
    assert default_buckets(512) == (64, 128, 256, 512)
    assert default_buckets(300) == (64, 128, 256, 300)
    assert default_buckets(40) == (40,)
    assert pick_bucket(65, (64, 128, 256)) == 128 and pick_bucket(64, (256, 64, 128)) == 64
    with pytest.raises(ValueError, match="longer than the largest bucket 256"):
        pick_bucket(257, (64, 128, 256))


def test_right_padded_batch_masks_and_positions():
    ex = [{"tokens": np.array([5, 6, 7]), "loss_mask": np.array([0, 1, 1])}, {"tokens": np.array([8]),
                                                                              "loss_mask": np.array([1])}]
    b = pad_batch(ex, 4, pad_id=0)
    np.testing.assert_array_equal(b["tokens"], [[5, 6, 7, 0], [8, 0, 0, 0]])
    np.testing.assert_array_equal(b["loss_mask"], [[0, 1, 1, 0], [1, 0, 0, 0]])
    np.testing.assert_array_equal(b["attention_mask"], [[1, 1, 1, 0], [1, 0, 0, 0]])
    np.testing.assert_array_equal(b["positions"], [[0, 1, 2, 0], [0, 0, 0, 0]])
    assert all(v.dtype == np.int32 for v in b.values())


def test_left_pad_prompts_for_generation():
    tokens, mask = left_pad_prompts([[5, 6, 7], [8]], pad_id=9)
    np.testing.assert_array_equal(tokens, [[5, 6, 7], [9, 9, 8]])
    np.testing.assert_array_equal(mask, [[1, 1, 1], [0, 0, 1]])
    tokens, mask = left_pad_prompts([[5, 6, 7], [8]], pad_id=9, buckets=(4, 8))
    assert tokens.shape == (2, 4) and tokens.dtype == np.int32
    b = pad_batch([{"tokens": [5, 6, 7]}, {"tokens": [8]}], 4, padding_side="left")
    np.testing.assert_array_equal(b["positions"], [[0, 0, 1, 2], [0, 0, 0, 0]])


def test_batch_length_is_the_smallest_bucket_holding_the_longest_sequence():
    examples = make_examples([10, 70, 20, 30, 130, 5])
    it = BatchIterator(examples, batch_size=2, buckets=(64, 128, 256), shuffle=False)
    shapes = [next(it)["tokens"].shape for _ in range(3)]
    assert shapes == [(2, 128), (2, 64), (2, 256)]


def test_preference_batch_has_both_groups_at_one_length():
    pairs = [{"chosen_tokens": np.arange(3), "chosen_loss_mask": np.array([0, 1, 1]),
              "rejected_tokens": np.arange(70), "rejected_loss_mask": np.ones(70, np.int32)}]
    b = next(BatchIterator(pairs, batch_size=1, buckets=(64, 128)))
    assert sorted(b) == sorted([f"{g}_{f}" for g in ("chosen", "rejected")
                                for f in ("tokens", "loss_mask", "attention_mask", "positions")] + ["example_mask"])
    assert b["chosen_tokens"].shape == b["rejected_tokens"].shape == (1, 128)
    assert b["chosen_attention_mask"].sum() == 3 and b["rejected_loss_mask"].sum() == 70


def test_scalar_fields_are_stacked_and_text_is_not_batched():
    examples = make_examples([4, 5, 6])
    b = pad_batch(examples, 8, batch_size=4)
    np.testing.assert_allclose(b["ref_logp"], [e["ref_logp"] for e in examples] + [0.0], rtol=1e-6)
    assert b["ref_logp"].dtype == np.float32 and "text" not in b
    np.testing.assert_array_equal(b["example_mask"], [1, 1, 1, 0])
    assert b["attention_mask"][3].sum() == 0 and b["loss_mask"][3].sum() == 0


def test_every_epoch_visits_every_example_once_in_a_new_order():
    examples = make_examples(range(3, 13))
    it = BatchIterator(examples, batch_size=4, seed=1, drop_last=False, num_epochs=2)
    assert it.steps_per_epoch == 3
    batches = list(it)
    assert len(batches) == 6 and all(b["tokens"].shape == (4, 12) for b in batches)  # one default bucket: 12
    epochs = []
    for e in range(2):
        firsts = np.concatenate([b["tokens"][b["example_mask"] == 1, 0] for b in batches[3 * e:3 * e + 3]])
        assert sorted(firsts) == [1000 * (i + 1) for i in range(10)]
        epochs.append(firsts)
    assert not np.array_equal(epochs[0], epochs[1])


def test_state_restore_gives_identical_remaining_batches():
    examples = make_examples(np.random.default_rng(0).integers(3, 150, size=23))
    kw = dict(batch_size=4, buckets=(64, 128, 256), seed=7, shuffle=True, drop_last=True)
    first = BatchIterator(examples, **kw)
    for _ in range(7):  # past the end of epoch 0 (5 steps per epoch)
        next(first)
    state = json.loads(json.dumps(first.state()))
    assert state["epoch"] == 1 and state["position"] == 2 and state["seed"] == 7
    expected = [next(first) for _ in range(9)]
    resumed = BatchIterator(examples, **{**kw, "seed": 0})  # the state's seed wins
    resumed.restore(state)
    for want, got in zip(expected, (next(resumed) for _ in range(9)), strict=True):
        assert want.keys() == got.keys()
        for k in want:
            np.testing.assert_array_equal(want[k], got[k])
    with pytest.raises(ValueError, match="batch_size=4"):
        BatchIterator(examples, **{**kw, "batch_size": 2}).restore(state)


def test_micro_batches_share_the_step_bucket():
    examples = make_examples([10, 10, 10, 100, 10, 10, 10, 10])
    it = BatchIterator(examples, batch_size=4, buckets=(64, 128), shuffle=False, accum_steps=2)
    b = next(it)
    assert b["tokens"].shape == (2, 2, 128) and b["example_mask"].shape == (2, 2)
    assert b["loss_mask"].shape == b["positions"].shape == (2, 2, 128)
    assert next(it)["tokens"].shape == (2, 2, 64)


def test_iterator_rejects_examples_longer_than_the_largest_bucket():
    with pytest.raises(ValueError, match="example 1 has 300 tokens, more than the largest bucket 256"):
        BatchIterator(make_examples([10, 300]), batch_size=1, buckets=(64, 256))
