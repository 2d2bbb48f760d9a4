"""The training run of the multi-process check, shared by the single-process reference and each worker process."""

from __future__ import annotations

import os

import jax
import numpy as np

from safety_jax.data.batches import BatchIterator
from safety_jax.model.config import get_preset
from safety_jax.model.hf import save_hf
from safety_jax.model.llama import init_params
from safety_jax.parallel import make_mesh
from safety_jax.train.losses import make_sft_loss
from safety_jax.train.optim import OptimConfig, build_optimizer
from safety_jax.train.trainer import TrainConfig, train

CONFIG = get_preset("tiny", hidden_size=64, num_attention_heads=8, num_key_value_heads=4, vocab_size=128)
STEPS = 5


def examples() -> list[dict[str, np.ndarray]]:
    """64 examples whose first token is their index, so a process's batch shows which examples it loaded."""
    rng = np.random.default_rng(0)
    out = []
    for i in range(64):
        tokens = rng.integers(3, CONFIG.vocab_size, 20).astype(np.int32)
        tokens[0] = 64 + i
        out.append({"tokens": tokens, "loss_mask": (np.arange(20) >= 8).astype(np.int32)})
    return out


class Recording(BatchIterator):
    """Records the example ids (first tokens) of every batch it yields."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.rows: list[list[int]] = []

    def __next__(self):
        batch = super().__next__()
        self.rows.append([int(t) - 64 for t in batch["tokens"][:, 0]])
        return batch


def run_training(process_index: int, process_count: int, out: str) -> list[list[int]]:
    """5 AdamW steps of SFT on an fsdp=8 mesh over all processes' devices; the model saved to ``out/model``."""
    params = init_params(CONFIG, jax.random.key(0))
    batches = Recording(examples(), 16, (32,), seed=0, process_index=process_index, process_count=process_count)
    ocfg = OptimConfig(lr=1e-3, weight_decay=0.1)
    state, _ = train(make_sft_loss(CONFIG), build_optimizer(ocfg, params), params, batches,
                     TrainConfig(steps=STEPS, log_every=1, progress=False, grad_accum=2), mesh=make_mesh("fsdp=8"),
                     model_config=CONFIG)
    save_hf(CONFIG, state.params, os.path.join(out, "model"), overwrite=True)
    return batches.rows
