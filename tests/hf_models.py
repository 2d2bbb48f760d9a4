"""Tiny random `transformers` Llama models built locally, as independent references for parity tests."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import transformers

from safety_jax.model.config import LlamaConfig
from safety_jax.model.hf import params_from_hf_state_dict

LLAMA2_STYLE = dict(vocab_size=320, hidden_size=64, intermediate_size=160, num_hidden_layers=3,
                    num_attention_heads=4, num_key_value_heads=4, rms_norm_eps=1e-5, rope_theta=10000.0,
                    max_position_embeddings=1024, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
                    pad_token_id=0)
LLAMA3_STYLE = dict(vocab_size=384, hidden_size=64, intermediate_size=192, num_hidden_layers=3,
                    num_attention_heads=8, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-5,
                    rope_theta=500000.0, max_position_embeddings=2048, tie_word_embeddings=True, bos_token_id=1,
                    eos_token_id=2, pad_token_id=0,
                    rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                      original_max_position_embeddings=64))
STYLES = {"llama2": LLAMA2_STYLE, "llama3": LLAMA3_STYLE}


def make_hf_model(style: str, seed: int = 0) -> transformers.LlamaForCausalLM:
    """A random fp32 LlamaForCausalLM (eager attention) with weights at a scale that gives peaked logits."""
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(**STYLES[style], attn_implementation="eager")
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(0.08 * torch.randn_like(p))
    return model


def jax_from_hf(model: transformers.LlamaForCausalLM) -> tuple[LlamaConfig, dict]:
    """Our config and params for an in-memory HF model (through the same key table as folder loading)."""
    config = LlamaConfig.from_hf_dict(model.config.to_dict())
    state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    return config, params_from_hf_state_dict(config, state)


def hf_forward(model, tokens: np.ndarray, mask: np.ndarray | None = None, positions: np.ndarray | None = None):
    with torch.no_grad():
        out = model(input_ids=torch.as_tensor(tokens, dtype=torch.long),
                    attention_mask=None if mask is None else torch.as_tensor(mask, dtype=torch.long),
                    position_ids=None if positions is None else torch.as_tensor(positions, dtype=torch.long),
                    output_hidden_states=True)
    return out.logits.numpy(), [h.numpy() for h in out.hidden_states]


def make_tokenizer(vocab_size: int, words: Sequence[str] = (), *,
                   chat_template: str | None = None) -> transformers.PreTrainedTokenizerFast:
    """A whitespace word-level tokenizer with <pad>=0, <s>=1 (added in front of every text), </s>=2, then ``words``
    (e.g. refusal strings, chat roles), then fillers ``w{id}`` up to ``vocab_size``; unknown words map to <pad>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2}
    for w in words:
        vocab.setdefault(w, len(vocab))
    for i in range(len(vocab), vocab_size):
        vocab.setdefault(f"w{i}", i)
    if len(vocab) > vocab_size:
        raise ValueError(f"{len(vocab)} tokens do not fit a vocabulary of {vocab_size}")
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok.decoder = decoders.WordPiece(prefix="##")
    out = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                               pad_token="<pad>", unk_token="<pad>")
    if chat_template:
        out.chat_template = chat_template
    return out
