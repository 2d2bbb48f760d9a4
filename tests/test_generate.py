"""Generation against `transformers` (greedy, and sampling with shared Gumbel noise), its compiled form (no cache
copy in the loop, few compilations), LoRA, and interventions that follow the decoded tokens."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from hf_models import jax_from_hf, make_hf_model, make_tokenizer

from safety_jax.model import generate as gen
from safety_jax.model.generate import SamplingConfig, encode_prompts, generate, generate_text, left_pad
from safety_jax.model.interventions import make_intervention
from safety_jax.model.llama import forward
from safety_jax.model.lora import LoraConfig, init_lora, merge_lora

CHAT_TEMPLATE = ("{{ bos_token }} {% for m in messages %}w10 {{ m['content'] }} w11 {% endfor %}"
                 "{% if add_generation_prompt %}w12{% endif %}")
CONVERSATIONS = [
    [{"role": "user", "content": "w5 w9 w13"}],
    [{"role": "user", "content": "w7"}],
    [{"role": "user", "content": "w20 w21 w22 w23 w24 w25 w26"}, {"role": "assistant", "content": "w30"},
     {"role": "user", "content": "w40 w41"}],
]


@pytest.fixture(scope="module")
def pair():
    model = make_hf_model("llama3", seed=3)
    config, params = jax_from_hf(model)
    tok = make_tokenizer(model.config.vocab_size)
    tok.chat_template = CHAT_TEMPLATE
    return model, config, params, tok


def _hf_generate(model, tokens, mask, n, processors=(), eos=None):
    with torch.no_grad():
        out = model.generate(input_ids=torch.as_tensor(tokens, dtype=torch.long),
                             attention_mask=torch.as_tensor(mask, dtype=torch.long), max_new_tokens=n,
                             do_sample=False, pad_token_id=0, eos_token_id=eos,
                             logits_processor=transformers.LogitsProcessorList(list(processors)))
    return out[:, tokens.shape[1]:].numpy()


def _trim(row, eos):
    row = list(row)
    for i, t in enumerate(row):
        if t in eos:
            return row[:i + 1]
    return row


def test_chat_prompts_tokenise_exactly_as_apply_chat_template(pair):
    _, _, _, tok = pair
    ids = encode_prompts(tok, CONVERSATIONS, chat=True)
    for conv, got in zip(CONVERSATIONS, ids):
        want = tok.apply_chat_template(conv, add_generation_prompt=True, tokenize=True, return_dict=False)
        assert got == list(want)
        assert got.count(tok.bos_token_id) == 1 and got[0] == tok.bos_token_id
    # a plain user string is the one-message conversation
    assert encode_prompts(tok, ["w7"], chat=True) == [ids[1]]


def test_greedy_chat_generation_equals_transformers(pair):
    model, config, params, tok = pair
    n = 12
    texts = generate_text(params, config, tok, CONVERSATIONS, chat=True, max_new_tokens=n, batch_size=2)
    ids = encode_prompts(tok, CONVERSATIONS, chat=True)
    tokens, mask = left_pad(ids, 0)
    ref = _hf_generate(model, tokens, mask, n, eos=[2])
    want = [tok.decode(_trim(r, {2}), skip_special_tokens=True) for r in ref]
    assert texts == want
    assert any(len(t.split()) >= 3 for t in want)  # the comparison covers real continuations


class GumbelNoise(transformers.LogitsProcessor):
    """Adds the Gumbel noise our sampler draws at each step, so transformers' argmax is the same sample."""

    def __init__(self, key, prompt_len):
        self.key, self.prompt_len = key, prompt_len

    def __call__(self, input_ids, scores):
        step = input_ids.shape[1] - self.prompt_len
        noise = jax.random.gumbel(jax.random.fold_in(self.key, step), tuple(scores.shape), jnp.float32)
        return scores + torch.from_numpy(np.array(noise))


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 0, 0.9), (1.3, 20, 0.8)])
def test_sampling_with_a_fixed_key_equals_transformers_warpers(pair, temperature, top_k, top_p):
    model, config, params, tok = pair
    ids = encode_prompts(tok, CONVERSATIONS, chat=True)
    tokens, mask = left_pad(ids, 0)
    key, n = jax.random.key(11), 16
    ours, lengths = generate(params, config, tokens, mask, rng=key, max_new_tokens=n, temperature=temperature,
                             top_k=top_k, top_p=top_p, eos_token_ids=(2,), pad_token_id=0)
    warpers = [transformers.TemperatureLogitsWarper(temperature)]
    if top_k:
        warpers.append(transformers.TopKLogitsWarper(top_k))
    if top_p < 1:
        warpers.append(transformers.TopPLogitsWarper(top_p))
    ref = _hf_generate(model, tokens, mask, n, [*warpers, GumbelNoise(key, tokens.shape[1])], eos=[2])
    for row, length, want in zip(np.asarray(ours), np.asarray(lengths), ref):
        assert list(row[:length]) == _trim(want, {2})
    greedy, _ = generate(params, config, tokens, mask, rng=key, max_new_tokens=n, eos_token_ids=(2,))
    assert not np.array_equal(np.asarray(greedy), np.asarray(ours))  # sampling did sample


def test_several_eos_ids_stop_generation(pair):
    _, config, params, _ = pair
    prompt = np.array([[1, 5, 9, 13]])
    free, _ = generate(params, config, prompt, max_new_tokens=8, eos_token_ids=())
    free = np.asarray(free)[0]
    stops = (int(free[2]), int(free[4]))
    out, lengths = generate(params, config, prompt, max_new_tokens=8, eos_token_ids=stops, pad_token_id=0)
    first = min(i for i, t in enumerate(free) if t in stops)
    assert int(lengths[0]) == first + 1
    assert list(np.asarray(out)[0, :first + 1]) == list(free[:first + 1])
    assert (np.asarray(out)[0, first + 1:] == 0).all()


def _computations(hlo: str) -> list[tuple[str, list[str]]]:
    comps, name, lines = [], None, []
    for line in hlo.splitlines():
        if line and not line.startswith(" ") and line.rstrip().endswith("{"):
            name, lines = line.split()[0 if not line.startswith("ENTRY") else 1].lstrip("%"), []
        elif line.startswith("}") and name is not None:
            comps.append((name, lines))
            name = None
        elif name is not None:
            lines.append(line)
    return comps


def test_decode_loop_holds_no_copy_of_the_cache(pair):
    _, config, params, _ = pair
    b, p, new = 4, 16, 16
    settings = SamplingConfig(max_new_tokens=new, temperature=0.7, eos_token_ids=(2,)).traced()
    hlo = gen._generate.lower(params, jnp.ones((b, p), jnp.int32), jnp.ones((b, p), jnp.int32), jax.random.key(0),
                              settings, (), None, config=config, new_bucket=new, lora_scale=1.0,
                              activation_sharding=None).compile().as_text()
    shape = (f"[{config.num_hidden_layers},{b},{p + new},{config.num_key_value_heads},{config.head_dim}]")
    comps = _computations(hlo)
    bodies = set(re.findall(r"body=%?([\w.\-]+)", hlo))
    assert bodies, "expected while loops (decode steps and the layer scan)"
    assert any(shape in line for _, lines in comps for line in lines), "cache shape not found in the HLO"
    copies = [(name, line.strip()[:120]) for name, lines in comps for line in lines
              if shape in line and re.search(r"\bcopy(-start)?\(", line)]
    in_loops = [c for c in copies if c[0] in bodies or not c[0].startswith("main")]
    assert not in_loops, in_loops
    assert len(copies) <= 2  # at most the zero-initialisation of k and v, once per call


def test_three_calls_with_other_lengths_and_temperatures_compile_once(pair):
    _, config, params, tok = pair
    before = gen._generate._cache_size()
    for prompt_len, temperature, n in ((5, 0.0, 10), (9, 0.7, 12), (12, 1.0, 16)):
        prompt = np.arange(3, 3 + prompt_len)[None].repeat(2, 0)
        generate(params, config, prompt, max_new_tokens=n, temperature=temperature, top_p=0.9,
                 rng=jax.random.key(prompt_len))
    assert gen._generate._cache_size() - before <= 2


def test_generation_with_lora_equals_the_merged_model(pair):
    _, config, params, tok = pair
    lora_cfg = LoraConfig(rank=4, alpha=8.0, targets=("attn.q", "attn.v", "mlp.down"))
    lora = init_lora(config, lora_cfg, jax.random.key(5))
    lora = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(6), x.shape), lora)
    merged = merge_lora(params, lora, lora_cfg)
    ids = encode_prompts(tok, CONVERSATIONS, chat=True)
    tokens, mask = left_pad(ids, 0)
    kw = dict(max_new_tokens=12, eos_token_ids=(), rng=jax.random.key(2), temperature=0.8)
    with_lora, _ = generate(params, config, tokens, mask, lora=lora, lora_scale=lora_cfg.scale, **kw)
    from_merged, _ = generate(merged, config, tokens, mask, **kw)
    plain, _ = generate(params, config, tokens, mask, **kw)
    assert np.array_equal(np.asarray(with_lora), np.asarray(from_merged))
    assert not np.array_equal(np.asarray(with_lora), np.asarray(plain))


@pytest.mark.parametrize("where", ["last_prompt", "generated", "prompt"])
def test_position_restricted_intervention_follows_the_decoded_tokens(pair, where):
    _, config, params, tok = pair
    ids = encode_prompts(tok, CONVERSATIONS, chat=True)
    tokens, mask = left_pad(ids, 0)
    b, p = tokens.shape
    n = 10
    direction = 3.0 * jax.random.normal(jax.random.key(8), (config.hidden_size,))
    iv = make_intervention("add", direction, config.num_hidden_layers, site="resid_pre", coeff=1.0, layers=[1],
                           positions=where)
    out, _ = generate(params, config, tokens, mask, interventions=[iv], max_new_tokens=n, eos_token_ids=())
    plain, _ = generate(params, config, tokens, mask, max_new_tokens=n, eos_token_ids=())
    out = np.asarray(out)
    assert not np.array_equal(out, np.asarray(plain))
    full = np.concatenate([tokens, out], axis=1)
    full_mask = np.concatenate([mask, np.ones_like(out)], axis=1)
    where_mask = np.zeros(full.shape, np.float32)
    if where == "last_prompt":
        where_mask[:, p - 1] = 1
    elif where == "generated":
        where_mask[:, p:] = 1
    else:
        where_mask[:, :p] = mask
    iv_full = make_intervention("add", direction, config.num_hidden_layers, site="resid_pre", coeff=1.0,
                                layers=[1], positions=where_mask)
    logits = np.asarray(forward(params, jnp.asarray(full), config, attention_mask=jnp.asarray(full_mask),
                                interventions=[iv_full]))
    assert np.array_equal(logits[:, p - 1:-1].argmax(-1), out)


def test_token_selectors_are_refused_in_a_full_forward(pair):
    _, config, params, _ = pair
    iv = make_intervention("add", np.ones(config.hidden_size), config.num_hidden_layers, positions="last_prompt")
    with pytest.raises(ValueError, match="positions mask"):
        forward(params, jnp.ones((1, 4), jnp.int32), config, interventions=[iv])
    with pytest.raises(ValueError, match="choose a"):
        make_intervention("add", np.ones(config.hidden_size), config.num_hidden_layers, positions="last")


def test_generate_text_batches_in_input_order_and_is_seeded(pair):
    _, config, params, tok = pair
    prompts = [f"w{5 + i} w{9 + 2 * i}" + " w3" * (i % 4) for i in range(7)]
    one_by_one = [generate_text(params, config, tok, [p], max_new_tokens=6)[0] for p in prompts]
    batched = generate_text(params, config, tok, prompts, max_new_tokens=6, batch_size=3, progress=True)
    assert batched == one_by_one
    key = jax.random.key(4)
    a = generate_text(params, config, tok, prompts, max_new_tokens=6, temperature=1.0, batch_size=3, rng=key)
    b = generate_text(params, config, tok, prompts, max_new_tokens=6, temperature=1.0, batch_size=3, rng=key)
    assert a == b


def test_generation_on_a_mesh_shards_the_cache_and_matches_one_device(pair):
    from safety_jax import parallel

    _, config, params, _ = pair
    if jax.device_count() < 8:
        pytest.skip("needs 8 (simulated) devices")
    mesh = parallel.make_mesh("data=2,fsdp=2,tensor=2")
    sharded = parallel.shard_params(params, config, mesh)
    rng = np.random.default_rng(0)
    tokens = rng.integers(3, config.vocab_size, (8, 7)).astype(np.int32)
    kw = dict(max_new_tokens=8, eos_token_ids=(), rng=jax.random.key(1), temperature=0.9)
    want, _ = generate(params, config, tokens, **kw)
    constraint = parallel.activation_constraint(mesh, "auto")
    assert parallel.activation_constraint(mesh, "auto") is constraint  # one static argument, one compilation
    got, _ = generate(sharded, config, tokens, activation_sharding=constraint, **kw)
    assert np.array_equal(np.asarray(got), np.asarray(want))
    settings = SamplingConfig(max_new_tokens=16, eos_token_ids=(2,)).traced()
    hlo = gen._generate.lower(sharded, jnp.asarray(np.pad(tokens, ((0, 0), (9, 0)))), jnp.ones((8, 16), jnp.int32),
                              jax.random.key(0), settings, (), None, config=config, new_bucket=16, lora_scale=1.0,
                              activation_sharding=constraint).compile().as_text()
    # per device: batch 8 over data x fsdp (4), KV heads 2 over tensor (2)
    per_device = f"[{config.num_hidden_layers},2,32,1,{config.head_dim}]"
    assert per_device in hlo
