"""The synthetic evaluation's teacher-forced accuracies against numpy on an independent `transformers` model."""

from __future__ import annotations

import numpy as np
from hf_models import hf_forward, jax_from_hf, make_hf_model

from safety_jax.data.synthetic import build_world, get_world_config
from safety_jax.data.synthetic_sets import safety_batch
from safety_jax.eval.synthetic_world import evaluate_sets


def _accuracy(logits: np.ndarray, tokens: np.ndarray, region: np.ndarray) -> float:
    hits = logits[:, :-1].argmax(-1) == tokens[:, 1:]
    return float(hits[region[:, 1:]].mean())


def test_instruct_and_null_accuracy_match_numpy_on_their_own_target_positions():
    world = build_world(get_world_config("quick"))
    sets = {kind: safety_batch(world, kind, 6, seed, second_segment_refusal=0.5)
            for seed, kind in enumerate(("safe", "unsafe", "jb_composition"))}
    model = make_hf_model("llama2")
    config, params = jax_from_hf(model)
    got = evaluate_sets(params, config, sets, batch_size=8, generation=False)
    for name, b in sets.items():
        t = np.arange(b.tokens.shape[1])[None, :]
        start, n = b.gt_pos[:, None] + 1, b.text_len[:, None]
        output = (t >= start) & (t < start + 2 * n + 1)  # seg1 *^ seg2
        # the refusal's targets: its null segment and *^ (the second segment where the first half is safe)
        second = b.is_unsafe[:, None] & np.array([[not world.unsafe[g, int(br != 0)][ops[: len(ops) // 2]].any()]
                                                   for g, br, ops in zip(b.grammar, b.branch, b.ops)])
        null_part = np.where(second, (t >= start + n) & (t < start + 2 * n + 1), (t >= start) & (t < start + n + 1))
        want_instruct = _accuracy(hf_forward(model, b.transform)[0], b.transform, output)
        want_null = _accuracy(hf_forward(model, b.refusal)[0], b.refusal, null_part)
        np.testing.assert_allclose(got[name]["instruct_acc"], want_instruct, rtol=1e-6)
        np.testing.assert_allclose(got[name]["null_acc"], want_null, rtol=1e-6)
