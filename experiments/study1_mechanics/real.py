"""Study 1 on real models (Jain et al. 2024, arXiv 2407.10264, §6): a base model and its chat model.

    python -m experiments.study1_mechanics.real --config real_llama3 --out runs/real_llama3 [key=value ...]

For each model: format every prompt set its own way (the base model: a plain text template; the chat model: its chat
template), sample an answer (temperature 0.6, top-p 0.9, seeded), and take two per-layer features — the MLP input at
the last prompt token, and the MLP input averaged over the generated tokens (one forward over prompt + answer, the
same activations the decoding steps saw). Then τ per layer on each pair of sets (safe vs unsafe verb:object prompts
with their base64 jailbreaks; Alpaca vs AdvBench), with each model's own class means, and ΔW = W_chat − W_base of the
MLP matrices against the base model's column space. Claims are decided against their baselines (the base model, the
plain unsafe prompts, a random direction); ``report.md``, ``metrics.json`` and PNG plots go to OUT.

Stages (``stages.Stages``, under ``OUT/<stage>/``, skipped when done with the same settings): ``generate_base``,
``features_base``, ``generate_chat``, ``features_chat``, ``delta_w``. A model is loaded only when one of its stages
runs; once its stages are done only the weights ΔW reads are kept, so the two models are never both whole in memory.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
import time
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import jax
import numpy as np
import yaml

from experiments.cli import run_study, study_parser
from experiments.study1_mechanics.claims import ALPHA, Claim, delta_w_module_test, p_text, undecided
from experiments.study1_mechanics.real_config import FEATURES, CheckpointSpec, RealStudyConfig, load_real_config
from safety_jax.analysis.activations import collect_activations
from safety_jax.analysis.clusters import class_means, cluster_accuracy, tau, tau_summary
from safety_jax.analysis.weights import delta_weight_analysis, module_matrix
from safety_jax.data.benchmarks import EvalExample, load_benchmark
from safety_jax.errors import ConfigError
from safety_jax.eval.stats import mean_greater
from safety_jax.model.config import LlamaConfig
from safety_jax.model.generate import encode_prompts, generate_tokens, left_pad, length_bucket, tokenizer_stop_ids
from safety_jax.model.io import load_model, load_tokenizer
from safety_jax.model.llama import Params
from safety_jax.model.sharding import use_activation_sharding
from safety_jax.parallel import activation_constraint, make_mesh, param_sharding_fn
from safety_jax.report import Report, fmt, line_panels
from safety_jax.stages import Stages

log = logging.getLogger("study1.real")

ROLES = ("base", "chat")
FEATURE_NAMES = {"last": "MLP input at the last prompt token", "generated": "MLP input averaged over the generated "
                 "tokens"}
FEATURES_FILE = "features.npz"
MIN_N = 10  # examples per set below which a claim is not decided


# ---------------------------------------------------------------------------------------------------- models
class Checkpoint:
    """One model folder, loaded on first use with the run's dtype and mesh shardings. ``activation_sharding``: the
    mesh's ``parallel.activation_constraint`` (or None), one object shared by both models so that the kernels taking
    it as a static argument compile once."""

    def __init__(self, role: str, spec: CheckpointSpec, dtype: str, mesh: Any, strategy: str,
                 activation_sharding: Any = None) -> None:
        self.role, self.spec, self.dtype, self.mesh, self.strategy = role, spec, dtype, mesh, strategy
        self.activation_sharding = activation_sharding
        self._model: tuple[LlamaConfig, Params] | None = None
        self._whole = False

    def load(self) -> tuple[LlamaConfig, Params]:
        """``(config, params)`` of the whole model (read again if only some weights were kept)."""
        if self._model is None or not self._whole:
            path = self.spec.path
            if not path or not os.path.isdir(path):
                raise FileNotFoundError(
                    f"{self.role}.path={path!r} is not a model folder: download it "
                    f"(huggingface-cli download {self.spec.hub_id or '<hub id>'} --local-dir {path or '<folder>'}) "
                    f"or set {self.role}.path=<folder>")
            shardings = param_sharding_fn(self.mesh, self.strategy) if self.mesh is not None else None
            log.info("loading %s model from %s (%s)", self.role, path, self.dtype)
            config, params = load_model(path, dtype=self.dtype, shardings=shardings)
            self._model, self._whole = (config.replace(compute_dtype=self.dtype), params), True
        return self._model

    def weights(self, modules: Sequence[str]) -> Params:
        """The layer weights of ``modules``' groups (``mlp``, ``attn``): what ΔW reads. A model loaded for this keeps
        only them."""
        if self._model is None:
            self.load()
            self.keep_only(modules)
        return _module_weights(self._model[1], modules)

    def keep_only(self, modules: Sequence[str]) -> None:
        """Drop every weight but ``modules``' (when loaded), freeing the rest of the model."""
        if self._model is not None:
            self._model, self._whole = (self._model[0], _module_weights(self._model[1], modules)), False

    def release(self) -> None:
        self._model, self._whole = None, False


def _module_weights(params: Params, modules: Sequence[str]) -> Params:
    return {"layers": {g: params["layers"][g] for g in dict.fromkeys(m.split(".")[0] for m in modules)}}


def load_tokenizer_for(role: str, spec: CheckpointSpec) -> Any:
    folder = spec.tokenizer or spec.path
    if not folder or not os.path.isdir(folder):
        field = f"{role}.tokenizer" if spec.tokenizer else f"{role}.path"
        raise FileNotFoundError(f"{field}={folder!r} is not a model folder: download it (huggingface-cli download "
                                f"{spec.hub_id or '<hub id>'} --local-dir {folder or '<folder>'}) or set {field}")
    tokenizer = load_tokenizer(folder)
    if spec.prompt_format == "chat" and not getattr(tokenizer, "chat_template", None):
        raise ConfigError(f"{role}.prompt_format='chat' but the tokenizer in {folder} has no chat template: use "
                          f"{role}.prompt_format=plain or point {role}.tokenizer at a folder with one")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return tokenizer


def encode(tokenizer: Any, spec: CheckpointSpec, examples: Sequence[EvalExample]) -> list[list[int]]:
    """Token ids of each example as ``spec`` formats it: the chat template (after the system prompt, if any) or
    ``spec.template`` around the user's text, through the tokenizer (BOS once either way)."""
    if spec.prompt_format == "chat":
        system = [{"role": "system", "content": spec.system_prompt}] if spec.system_prompt else []
        return encode_prompts(tokenizer, [system + ex.chat_messages() for ex in examples], chat=True)
    texts = ["\n\n".join(m["content"] for m in ex.chat_messages() if m["role"] == "user") for ex in examples]
    return encode_prompts(tokenizer, [spec.template.format(prompt=t) for t in texts])


# ---------------------------------------------------------------------------------------------------- features
def window_features(params: Params, config: LlamaConfig, rows: Sequence[Sequence[int]], starts: Sequence[int],
                    counts: Sequence[int], *, capture: str, width: int, batch_size: int) -> np.ndarray:
    """Mean of ``capture`` over positions ``[start_i, start_i + count_i)`` of each token row: ``[L, N, F]`` float32.

    Rows are left-padded within power-of-two length buckets (one compile per bucket); ``width`` >= every count fixes
    the pooled window's shape. The pooling runs inside the jit, so only ``[L, batch, F]`` leaves the device."""
    if not rows:
        raise ValueError("window_features: no token rows")
    if any(c < 1 or c > width for c in counts):
        raise ValueError(f"window_features: counts must lie in [1, width={width}]")
    groups: dict[int, list[int]] = defaultdict(list)
    for i, row in enumerate(rows):
        groups[length_bucket(len(row), config.max_position_embeddings)].append(i)
    out = np.zeros(0, np.float32)
    for length, idx in sorted(groups.items()):
        tokens, mask = left_pad([rows[i] for i in idx], config.pad_token_id or 0, length)
        first = length - np.array([len(rows[i]) for i in idx]) + np.asarray(starts)[idx]   # [n] in padded rows
        offsets = np.arange(width)[None, :]
        valid = offsets < np.asarray(counts)[idx][:, None]                                   # [n, width]
        positions = np.where(valid, first[:, None] + offsets, length - 1)  # unused slots: a real token, weight 0
        weights = valid / valid.sum(axis=1, keepdims=True)
        feats = collect_activations(params, config, tokens, mask, capture=capture,
                                    capture_positions=positions.astype(np.int32),
                                    pool_weights=weights.astype(np.float32), batch_size=batch_size)[capture]
        if not out.size:
            out = np.zeros((feats.shape[0], len(rows), *feats.shape[2:]), np.float32)
        out[:, idx] = feats
    return out


def last_token_features(params: Params, config: LlamaConfig, prompts: Sequence[Sequence[int]], *, capture: str,
                        batch_size: int) -> np.ndarray:
    """``capture`` at each prompt's last token: ``[L, N, F]``."""
    return window_features(params, config, prompts, [len(p) - 1 for p in prompts], [1] * len(prompts),
                           capture=capture, width=1, batch_size=batch_size)


def generated_features(params: Params, config: LlamaConfig, prompts: Sequence[Sequence[int]],
                       answers: Sequence[Sequence[int]], *, capture: str, width: int, batch_size: int) -> np.ndarray:
    """``capture`` averaged over each answer's tokens (EOS included), from one forward over prompt + answer: ``[L, N,
    F]``. Causal attention makes each position's activation the one it had when decoding reached it."""
    rows = [list(p) + list(a) for p, a in zip(prompts, answers)]
    return window_features(params, config, rows, [len(p) for p in prompts], [len(a) for a in answers],
                           capture=capture, width=width, batch_size=batch_size)


# ---------------------------------------------------------------------------------------------------- stages
def load_sets(cfg: RealStudyConfig) -> dict[str, list[EvalExample]]:
    out = {}
    for name in cfg.used_sets():
        s = cfg.sets[name]
        out[name] = load_benchmark(s.spec, data_files=s.data_files, limit=s.limit)
        if not out[name]:
            raise ConfigError(f"sets.{name}: {s.spec!r} gave no examples")
    return out


def generate_stage(cfg: RealStudyConfig, ckpt: Checkpoint, tokenizer: Any,
                   examples: Mapping[str, Sequence[EvalExample]]) -> dict[str, Any]:
    """Every set's prompt tokens and sampled answer tokens (set ``i`` samples with key ``fold_in(key(seed), i)``)."""
    config, params = ckpt.load()
    g, stop = cfg.generation, tokenizer_stop_ids(config, tokenizer)
    out: dict[str, Any] = {"stop_ids": list(stop)}
    for i, name in enumerate(cfg.used_sets()):
        prompts = encode(tokenizer, ckpt.spec, examples[name])
        new = generate_tokens(params, config, prompts, pad_token_id=int(tokenizer.pad_token_id),
                              batch_size=cfg.batch_size, rng=jax.random.fold_in(jax.random.key(cfg.seed), i),
                              progress=True, activation_sharding=ckpt.activation_sharding,
                              max_new_tokens=g.max_new_tokens, temperature=g.temperature, top_p=g.top_p,
                              eos_token_ids=stop)
        out[name] = {"ids": [e.id for e in examples[name]], "prompt_tokens": prompts, "new_tokens": new,
                     "text": [tokenizer.decode(t, skip_special_tokens=True) for t in new]}
    return out


def features_stage(cfg: RealStudyConfig, ckpt: Checkpoint, generated: Mapping[str, Any], folder: str) -> dict:
    """Both feature kinds of every set, saved as ``<folder>/features.npz`` (``"<kind>/<set>": [L, N, F]``)."""
    config, params = ckpt.load()
    arrays = {}
    with use_activation_sharding(ckpt.activation_sharding):  # split the batch over the mesh while the kernels trace
        for name in cfg.used_sets():
            prompts, answers = generated[name]["prompt_tokens"], generated[name]["new_tokens"]
            arrays[f"last/{name}"] = last_token_features(params, config, prompts, capture=cfg.capture,
                                                         batch_size=cfg.batch_size)
            arrays[f"generated/{name}"] = generated_features(params, config, prompts, answers, capture=cfg.capture,
                                                             width=cfg.generation.max_new_tokens,
                                                             batch_size=cfg.batch_size)
    np.savez(os.path.join(folder, FEATURES_FILE), **arrays)
    return {"shapes": {k: list(v.shape) for k, v in arrays.items()}}


def delta_w_stage(cfg: RealStudyConfig, base: Params, chat: Params) -> dict[str, Any]:
    """ΔW = W_chat − W_base per module and layer against the base weight's column space, with the random-direction
    baseline ``sqrt(1 − rank / out)`` (what the claims compare with)."""
    reps = delta_weight_analysis(base, chat, modules=cfg.modules, top_k=cfg.top_k, energy=cfg.energy,
                                 layer_batch=cfg.layer_batch)
    out = {}
    for module, r in reps.items():
        rows = int(jax.eval_shape(lambda p, m=module: module_matrix(p, m), base).shape[1])  # output dimension
        with np.errstate(all="ignore"):
            mean = np.nanmean(r.sin_theta, axis=1)
        out[module] = {"sin_theta_mean": mean, "sin_theta_top1": r.sin_theta[:, 0], "sin_theta": r.sin_theta,
                       "random_baseline": np.sqrt(np.clip(1 - r.pre_energy_rank / rows, 0, 1)),
                       "pre_energy_rank": r.pre_energy_rank, "out_dim": rows, "relative_norm": r.relative_norm,
                       "delta_effective_rank": r.delta_effective_rank,
                       "delta_singular_values": r.delta_singular_values[:, : cfg.top_k]}
    return out


# ---------------------------------------------------------------------------------------------------- τ
def tau_metrics(cfg: RealStudyConfig, feats: Mapping[str, Mapping[str, np.ndarray]]) -> dict[str, Any]:
    """``tau[kind][pair][role][set] = {mean, std: [L], n, values: [L, N]}`` with the pair's class means of that
    model and feature kind; ``separation[kind][pair][role] = [L]`` (mean τ(safe) − mean τ(unsafe));
    ``cluster_accuracy[kind][pair][role] = [L]`` (nearest class mean)."""
    out: dict[str, Any] = {"tau": {}, "separation": {}, "cluster_accuracy": {}}
    for kind in FEATURES:
        for key in out:
            out[key][kind] = {}
        for pname, pair in cfg.pairs.items():
            for key in out:
                out[key][kind][pname] = {}
            for role in ROLES:
                f = {s: feats[role][f"{kind}/{s}"] for s in pair.sets()}
                mu_s, mu_u = class_means(f[pair.safe], f[pair.unsafe])
                taus = {s: np.asarray(tau(x, mu_s, mu_u)) for s, x in f.items()}
                out["tau"][kind][pname][role] = {
                    s: {**{k: np.asarray(v) for k, v in tau_summary(t).items()}, "n": t.shape[1], "values": t}
                    for s, t in taus.items()}
                out["separation"][kind][pname][role] = taus[pair.safe].mean(axis=1) - taus[pair.unsafe].mean(axis=1)
                out["cluster_accuracy"][kind][pname][role] = np.asarray(
                    cluster_accuracy(f[pair.safe], f[pair.unsafe], mu_s, mu_u))
    return out


# ---------------------------------------------------------------------------------------------------- claims
def _mean_se(s: Mapping[str, Any]) -> tuple[float, float]:
    """A set's τ averaged over layers, and its standard error: the mean over layers of std / sqrt(n) (as if the
    layers were perfectly correlated: conservative, as in ``claims``)."""
    return float(np.mean(s["mean"])), float(np.mean(np.asarray(s["std"]) / np.sqrt(s["n"])))


def _separation_se(t: Mapping[str, Any], safe: str, unsafe: str) -> tuple[float, float]:
    s, u = t[safe], t[unsafe]
    se = np.sqrt(np.asarray(s["std"]) ** 2 / s["n"] + np.asarray(u["std"]) ** 2 / u["n"])
    return float(np.mean(np.asarray(s["mean"]) - np.asarray(u["mean"]))), float(np.mean(se))


def claim_separation_grows(metrics: Mapping[str, Any], cfg: RealStudyConfig, pname: str, kind: str) -> Claim:
    """Safety tuning separates the pair more: the chat model's separation exceeds the base model's (one-sided z)."""
    pair = cfg.pairs[pname]
    key = f"separation_grows/{pname}/{kind}"
    statement = f"Separation of {pair.safe} and {pair.unsafe} grows from the base to the chat model ({kind} feature)"
    t = metrics["tau"][kind][pname]
    n = min(t[r][s]["n"] for r in ROLES for s in (pair.safe, pair.unsafe))
    (b, se_b), (c, se_c) = (_separation_se(t[r], pair.safe, pair.unsafe) for r in ROLES)
    acc = {r: float(np.mean(metrics["cluster_accuracy"][kind][pname][r])) for r in ROLES}
    figures = {"base/separation": b, "chat/separation": c}
    ev = (f"Separation (mean over layers of mean τ({pair.safe}) − mean τ({pair.unsafe}), ± standard error): base "
          f"{b:.3g} ± {se_b:.2g}, chat {c:.3g} ± {se_c:.2g}; nearest-mean accuracy base {acc['base']:.2f}, chat "
          f"{acc['chat']:.2f}; n ≥ {n} per set.")
    if n < MIN_N:
        return undecided(key, statement, f"fewer than {MIN_N} examples in a set (n = {n})", ev)
    z, p = mean_greater(c, se_c, b, se_b)
    figures["z"] = z
    holds = bool(p < ALPHA)
    reading = ("the chat model pulls the two sets' activations further apart than the base model does, as the "
               "paper reports." if holds else
               "the chat model's clusters are not further apart beyond the uncertainty. τ is a distance in activation "
               "units and fine-tuning can rescale the MLP input (its norm weight): compare the nearest-mean "
               "accuracies, which do not depend on the scale.")
    return Claim(key, statement, holds, ev + f" Test: one-sided z = {z:.2f}, {p_text(p)} at {ALPHA}.", reading, figures)


def claim_jailbreak(metrics: Mapping[str, Any], cfg: RealStudyConfig, pname: str, jb: str, kind: str) -> Claim:
    """In the chat model the jailbreak's mean τ exceeds the plain unsafe prompts' (one-sided z): closer to safe."""
    pair = cfg.pairs[pname]
    key = f"jailbreak_toward_safe/{pname}/{jb}/{kind}"
    statement = (f"{jb} sits closer to the safe cluster than {pair.unsafe} in the chat model ({kind} feature)")
    t = metrics["tau"][kind][pname]
    rows = []
    for role in ROLES:
        cells = [f"{s} {_mean_se(t[role][s])[0]:.3g}" for s in [pair.safe, pair.unsafe, jb, *pair.controls]]
        rows.append(f"{role}: " + ", ".join(cells))
    ev = "Mean τ over layers (positive: nearer the safe mean; controls are not decided on): " + "; ".join(rows) + "."
    n = min(t["chat"][s]["n"] for s in (pair.unsafe, jb))
    if n < MIN_N:
        return undecided(key, statement, f"fewer than {MIN_N} examples in a set (n = {n})", ev)
    (j, se_j), (u, se_u) = _mean_se(t["chat"][jb]), _mean_se(t["chat"][pair.unsafe])
    z, p = mean_greater(j, se_j, u, se_u)
    holds = bool(p < ALPHA)
    reading = ("the jailbreak's activations lie nearer the safe prompts' than the plain unsafe prompts' do, the "
               "paper's account of why jailbreaks work; the controls show how far the encoding alone moves a prompt."
               if holds else "the jailbreak does not move toward the safe cluster beyond the uncertainty of τ.")
    return Claim(key, statement, holds, ev + f" Chat: {jb} {j:.3g} ± {se_j:.2g} vs {pair.unsafe} {u:.3g} ± "
                 f"{se_u:.2g}, one-sided z = {z:.2f}, {p_text(p)} at {ALPHA}.", reading, {"z": z, "jailbreak": j,
                                                                                        "unsafe": u})


def claim_delta_w(metrics: Mapping[str, Any], module: str) -> Claim:
    """ΔW's top directions lie outside the base weight's column space more than a random direction, in most layers
    (``claims.delta_w_module_test``: a sign test per layer over the top-k directions)."""
    key = f"delta_w_outside/{module}"
    statement = (f"ΔW = W_chat − W_base of {module} writes outside the base weight's column space more than a random "
                 "direction does")
    r = delta_w_module_test(metrics["delta_w"][module])
    ok = r["excess"] > 0 and r["significant"] > r["layers"] / 2
    holds = True if ok else None if not r["layers"] or (r["excess"] > 0 and not r["testable"]) else False
    ev = (f"sin θ of ΔW's top {metrics['top_k']} directions, mean over layers {r['sin']:.3f} vs a random direction's "
          f"sqrt(1 − rank/out) {r['random']:.3f} ({r['excess']:+.3f}); {r['significant']}/{r['layers']} layers above "
          f"random (one-sided exact sign test at {ALPHA}).")
    reading = ("the update writes into output directions the base weight uses less than chance, in most layers."
               if holds else "too few finite directions per layer to test the excess." if holds is None else
               "the update does not favour the directions the base weight leaves unused beyond a random direction.")
    return Claim(key, statement, holds, ev, reading, {"excess": r["excess"], "sin_theta": r["sin"]})


def assess_claims(metrics: Mapping[str, Any], cfg: RealStudyConfig) -> list[Claim]:
    out = [claim_separation_grows(metrics, cfg, p, k) for p in cfg.pairs for k in FEATURES]
    out += [claim_jailbreak(metrics, cfg, p, jb, k) for p, pair in cfg.pairs.items() for jb in pair.jailbreaks
            for k in FEATURES]
    return out + [claim_delta_w(metrics, m) for m in cfg.modules]


# ---------------------------------------------------------------------------------------------------- report
def write_report(out: str, cfg: RealStudyConfig, metrics: dict[str, Any], claims: Sequence[Claim]) -> None:
    rep = Report(out, f"Study 1 on real models — {cfg.name}")
    rep.metrics = metrics
    g = cfg.generation
    lines = [f"- Config `{cfg.name}`. {cfg.notes}".rstrip(),
             f"- dtype {cfg.dtype}, " + (f"mesh `{cfg.mesh}` ({cfg.strategy})" if cfg.mesh else "one device") +
             f", batch {cfg.batch_size}; features: "
             f"`{cfg.capture}` per layer at the last prompt token, and averaged over the tokens of an answer sampled "
             f"at temperature {g.temperature}, top-p {g.top_p}, up to {g.max_new_tokens} new tokens "
             f"(seed {cfg.seed}). τ = ‖f − μ_unsafe‖ − ‖f − μ_safe‖ with each model's own class means of the pair.",
             "- Sets: " + "; ".join(f"`{s}` = `{cfg.sets[s].spec}` (n = {metrics['sets'][s]['n']})"
                                    for s in cfg.used_sets()) + "."]
    for role in ROLES:
        m = metrics["models"][role]
        how = ("its chat template" + (" after the system prompt" if m["system_prompt"] else "")
               if m["prompt_format"] == "chat" else f"the template `{m['template']!r}`")
        lines.append(f"- {role}: `{m['path']}` (hub `{m['hub_id'] or '–'}`), {m['num_layers']} layers; prompts "
                     f"through {how}, BOS {m['bos_in_first_prompt']}× — e.g. `{m['example_prompt']!r}`; mean answer "
                     f"{m['mean_new_tokens']:.1f} tokens, {m['stopped']:.0%} ending on a stop token.")
    rep.section("What ran", "\n".join(lines))
    rep.section("Claims", "\n\n".join(c.line() for c in claims))
    rows, sep_rows, sep_panels, tau_panels = [], [], {}, {}
    for kind in FEATURES:
        for pname in cfg.pairs:
            sep = metrics["separation"][kind][pname]
            layers = np.arange(len(sep["base"]))
            sep_panels[f"{pname} · {kind}"] = {r: (layers, sep[r]) for r in ROLES}
            for role in ROLES:
                t = metrics["tau"][kind][pname][role]
                tau_panels[f"{pname} · {kind} · {role}"] = {s: (layers, t[s]["mean"], t[s]["std"]) for s in t}
                rows += [{"feature": kind, "pair": pname, "model": role, "set": s, "n": t[s]["n"],
                          "τ": float(np.mean(t[s]["mean"])), "std": float(np.mean(t[s]["std"]))} for s in t]
                acc = metrics["cluster_accuracy"][kind][pname][role]
                sep_rows.append({"feature": kind, "pair": pname, "model": role,
                                 "separation": float(np.mean(sep[role])), "nearest-mean accuracy": float(np.mean(acc))})
    rep.section("τ per set", "Mean over layers of each set's mean τ and std; per-layer values are in `metrics.json` "
                "(`tau`) and the figures.")
    rep.table(rows)
    rep.table(sep_rows, caption="Separation (mean τ(safe) − mean τ(unsafe)) and nearest-class-mean accuracy, mean "
              "over layers:")
    rep.plot("tau_per_layer", line_panels(tau_panels, xlabel="layer", ylabel="τ (mean ± std)", ncols=2, hline=0.0),
             caption="τ per layer and set (positive: nearer the pair's safe mean)")
    rep.plot("separation_per_layer", line_panels(sep_panels, xlabel="layer", ylabel="mean τ(safe) − mean τ(unsafe)",
                                                 ncols=2), caption="separation per layer, base vs chat")
    dw = metrics["delta_w"]
    rep.section("ΔW = W_chat − W_base", f"sin θ of ΔW's top {cfg.top_k} left singular vectors outside the base "
                f"weight's {cfg.energy:.0%}-energy column space, per layer; random = a random direction's "
                "sqrt(1 − rank/out).")
    rep.table([{"module": m, "layer": i, "sin θ (mean)": d["sin_theta_mean"][i],
                "sin θ (top 1)": d["sin_theta_top1"][i], "random": d["random_baseline"][i],
                "rank (base)": d["pre_energy_rank"][i],
                "‖ΔW‖/‖W‖": d["relative_norm"][i]} for m, d in dw.items() for i in range(len(d["sin_theta_mean"]))],
              digits=4)
    rep.plot("delta_w_sin_theta", line_panels(
        {m: {"mean": (np.arange(len(d["sin_theta_mean"])), d["sin_theta_mean"]),
             "top 1": (np.arange(len(d["sin_theta_mean"])), d["sin_theta_top1"]),
             "random direction": (np.arange(len(d["sin_theta_mean"])), d["random_baseline"])} for m, d in dw.items()},
        xlabel="layer", ylabel="sin θ"), caption="ΔW's top directions outside the base column space")
    rep.plot("delta_w_relative_norm", line_panels(
        {"‖ΔW‖_F / ‖W_base‖_F": {m: (np.arange(len(d["relative_norm"])), d["relative_norm"]) for m, d in dw.items()}},
        xlabel="layer", ylabel="relative norm"), caption="size of the update per layer")
    rep.section("Timing", ", ".join(f"{k} {fmt(v, 1)} s" for k, v in metrics["timing"].items()) +
                (f"; skipped (done before): {', '.join(metrics['skipped_stages'])}" if metrics["skipped_stages"]
                 else ""))
    rep.write()


# ---------------------------------------------------------------------------------------------------- main
def model_info(spec: CheckpointSpec, tokenizer: Any, generated: Mapping[str, Any], sets: Sequence[str],
               num_layers: int, max_new_tokens: int) -> dict[str, Any]:
    """What the report says about one model's prompts and answers."""
    first = generated[sets[0]]["prompt_tokens"][0]
    answers = [a for s in sets for a in generated[s]["new_tokens"]]
    stop = set(generated["stop_ids"])
    return {**dataclasses.asdict(spec), "num_layers": num_layers, "example_prompt": tokenizer.decode(first),
            "bos_in_first_prompt": int(sum(t == tokenizer.bos_token_id for t in first)),
            "mean_new_tokens": float(np.mean([len(a) for a in answers])),
            "stopped": float(np.mean([bool(a) and a[-1] in stop for a in answers])),
            "max_new_tokens": max_new_tokens}


def run(cfg: RealStudyConfig, out: str) -> dict[str, Any]:
    """Every stage into ``out``; returns the metrics written to ``metrics.json``."""
    t_start = time.perf_counter()
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "config.yaml"), "w") as f:  # the resolved config
        yaml.safe_dump(cfg.to_dict(), f, sort_keys=False)
    examples = load_sets(cfg)
    mesh = make_mesh(cfg.mesh) if cfg.mesh else None
    st, c, sets = Stages(out), cfg.to_dict(), cfg.used_sets()
    data_key = {"seed": cfg.seed, "dtype": cfg.dtype, "sets": {s: c["sets"][s] for s in sets},
                "generation": c["generation"]}
    constraint = activation_constraint(mesh, cfg.strategy) if mesh is not None else None
    ckpts = {r: Checkpoint(r, getattr(cfg, r), cfg.dtype, mesh, cfg.strategy, constraint) for r in ROLES}
    feats, info, model_keys = {}, {}, {}
    for role, ckpt in ckpts.items():
        tokenizer = load_tokenizer_for(role, ckpt.spec)
        model_keys[role] = {**data_key, "model": c[role]}
        gen = st.json(f"generate_{role}", model_keys[role], lambda: generate_stage(cfg, ckpt, tokenizer, examples))
        folder = os.path.join(out, f"features_{role}")
        st.json(f"features_{role}", {**model_keys[role], "capture": cfg.capture},
                lambda: features_stage(cfg, ckpt, gen, folder))
        with np.load(os.path.join(folder, FEATURES_FILE)) as z:
            feats[role] = {k: z[k] for k in z.files}
        num_layers = next(iter(feats[role].values())).shape[0]
        info[role] = model_info(ckpt.spec, tokenizer, gen, sets, num_layers, cfg.generation.max_new_tokens)
        ckpt.keep_only(cfg.modules)
    dw_key = {"base": c["base"]["path"], "chat": c["chat"]["path"], "dtype": cfg.dtype,
              **{k: c[k] for k in ("modules", "top_k", "energy")}}
    delta_w = st.json("delta_w", dw_key, lambda: delta_w_stage(cfg, ckpts["base"].weights(cfg.modules),
                                                               ckpts["chat"].weights(cfg.modules)))
    for ckpt in ckpts.values():
        ckpt.release()
    metrics: dict[str, Any] = {"models": info, "top_k": cfg.top_k, "delta_w": delta_w,
                               "sets": {s: {"spec": cfg.sets[s].spec, "n": len(examples[s])} for s in sets},
                               **tau_metrics(cfg, feats)}
    claims = assess_claims(metrics, cfg)
    metrics["claims"] = [{**dataclasses.asdict(cl), "verdict": cl.verdict} for cl in claims]
    metrics["timing"] = {**st.timing, "total_this_invocation": time.perf_counter() - t_start}
    metrics["skipped_stages"] = st.skipped
    write_report(out, cfg, metrics, claims)
    return metrics


def main(argv: list[str] | None = None) -> None:
    args = study_parser(__doc__, default="real_llama3", configs="real_llama2 | real_llama3",
                        example="batch_size=16 base.path=/data/m").parse_args(argv)
    run_study(args, load_real_config, run)


if __name__ == "__main__":
    main()
