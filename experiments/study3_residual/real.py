"""Study 3 on real models (Pan et al. 2025): the safety residual space of a chat model's safety-tuned versions.

    python -m experiments.study3_residual.real --config real_llama3 --out runs/study3_real [key=value ...]

Stages (``OUT/<stage>/``, skipped when done under the same settings): ``train_<name>`` for each tuned model given as
a training run (the library's trainer, e.g. SSFT / DPO on jailbreak-exposed data, from the base folder);
``states_<role>`` — the state after every block at the last prompt token of every prompt (chat template, prompts cut
to ``max_chars``), ``[L, N, D]`` saved as ``states.npy``; ``answers_<name>`` — each tuned model's greedy answers and
their refusal verdicts (substring judge). Then, per tuned model, the same residual-space analysis as the synthetic
study (shift, components, λ shares, effective rank, norms, refusal prediction per layer against random directions and
a logistic probe), its claims, ``report.md`` and ``metrics.json``.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
import time
from functools import partial
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import jax
import jax.numpy as jnp
import numpy as np
import yaml

from experiments.cli import run_study, study_parser
from experiments.study1_mechanics.real import Checkpoint, encode, last_token_features, load_tokenizer_for
from experiments.study3_residual import claims as claims_lib
from experiments.study3_residual import report as report_lib
from experiments.study3_residual.real_config import Study3RealConfig, load_real_config
from experiments.study3_residual.synthetic import dominant_intervention
from safety_jax.analysis import probes, residual
from safety_jax.analysis.activations import map_batches
from safety_jax.data.benchmarks import EvalExample, load_benchmark
from safety_jax.errors import ConfigError
from safety_jax.eval.judges import SubstringJudge
from safety_jax.model.config import LlamaConfig
from safety_jax.model.generate import generate_tokens, left_pad, length_bucket, tokenizer_stop_ids
from safety_jax.model.interventions import Intervention, make_intervention
from safety_jax.model.llama import Params, forward
from safety_jax.model.sharding import use_activation_sharding
from safety_jax.parallel import activation_constraint, make_mesh
from safety_jax.report import Report
from safety_jax.stages import Stages
from safety_jax.train import run as train_run
from safety_jax.train.losses import sequence_logps

log = logging.getLogger("study3.real")
STATES = "states.npy"


def load_prompts(cfg: Study3RealConfig) -> tuple[list[EvalExample], np.ndarray]:
    """Every harmful and benign set's examples (prompts cut to ``max_chars``) and their class labels [N]."""
    examples, labels = [], []
    for cls, names in ((1, cfg.harmful), (0, cfg.benign)):
        for name in names:
            s = cfg.sets[name]
            got = load_benchmark(s.spec, data_files=s.data_files, limit=s.limit)
            if not got:
                raise ConfigError(f"sets.{name}: {s.spec!r} gave no examples")
            examples += [dataclasses.replace(e, prompt=e.prompt[: cfg.max_chars]) for e in got]
            labels += [cls] * len(got)
    return examples, np.asarray(labels, np.int32)


def states_stage(cfg: Study3RealConfig, ckpt: Checkpoint, prompts: list[list[int]], folder: str) -> dict[str, Any]:
    config, params = ckpt.load()
    with use_activation_sharding(ckpt.activation_sharding):
        x = last_token_features(params, config, prompts, capture="resid_post", batch_size=cfg.batch_size)
    np.save(os.path.join(folder, STATES), x.astype(np.float32))
    return {"shape": list(x.shape)}


def answers_stage(cfg: Study3RealConfig, ckpt: Checkpoint, tokenizer: Any, prompts: list[list[int]]) -> dict:
    config, params = ckpt.load()
    new = generate_tokens(params, config, prompts, pad_token_id=int(tokenizer.pad_token_id),
                          batch_size=cfg.batch_size, max_new_tokens=cfg.max_new_tokens, temperature=0.0,
                          eos_token_ids=tokenizer_stop_ids(config, tokenizer),
                          activation_sharding=ckpt.activation_sharding)
    text = [tokenizer.decode(t, skip_special_tokens=True) for t in new]
    return {"text": text, "new_tokens": [list(map(int, t)) for t in new],
            "refused": SubstringJudge.named(cfg.judge).refused(text).astype(int).tolist()}


@partial(jax.jit, static_argnames=("config",))
def _answer_nll(params: Params, tokens: jax.Array, mask: jax.Array, loss_mask: jax.Array,
                interventions: tuple[Intervention, ...], *, config: LlamaConfig) -> tuple[jax.Array, jax.Array]:
    hidden = forward(params, tokens, config, attention_mask=mask, interventions=interventions, return_hidden=True)
    s = sequence_logps(params, hidden, tokens, loss_mask, config)
    return -s.logps, s.counts


def intervention_stage(cfg: Study3RealConfig, ckpt: Checkpoint, tokenizer: Any, prompts: list[list[int]],
                       harmful: np.ndarray, pair: dict[str, Any], answers: dict[str, Any]) -> list[dict[str, Any]]:
    """Refusal of the first ``n`` harmful and benign prompts and the perplexity of the model's own α = 0 answers to
    the benign ones, with the dominant component subtracted after every block (the synthetic study's sweep)."""
    config, params = ckpt.load()
    iv = cfg.intervention
    dirs, scale = np.asarray(pair["directions"]), np.asarray(pair["sigma"])
    judge = SubstringJudge.named(cfg.judge)
    idx = {k: np.flatnonzero(harmful == v)[: iv.n] for k, v in (("harmful", 1), ("benign", 0))}
    seqs = [prompts[i] + answers["new_tokens"][i] for i in idx["benign"]]
    tokens, mask = left_pad(seqs, int(tokenizer.pad_token_id), length_bucket(max(map(len, seqs)),
                                                                             config.max_position_embeddings))
    answer_len = np.asarray([len(answers["new_tokens"][i]) for i in idx["benign"]])
    loss_mask = (np.arange(tokens.shape[1])[None, :] >= tokens.shape[1] - answer_len[:, None]).astype(np.int32)
    rows = []
    for alpha in iv.alphas:
        ivs = dominant_intervention(dirs, scale, alpha, iv.mode) if alpha else ()
        row: dict[str, Any] = {"alpha": alpha}
        for name, rows_idx in idx.items():
            new = generate_tokens(params, config, [prompts[i] for i in rows_idx],
                                  pad_token_id=int(tokenizer.pad_token_id), batch_size=cfg.batch_size,
                                  max_new_tokens=cfg.max_new_tokens, temperature=0.0, interventions=ivs,
                                  eos_token_ids=tokenizer_stop_ids(config, tokenizer),
                                  activation_sharding=ckpt.activation_sharding)
            text = [tokenizer.decode(t, skip_special_tokens=True) for t in new]
            row[f"{name}_refused_k"], row[f"{name}_n"] = int(judge.refused(text).sum()), len(text)
        kind, coeff = ("add", -alpha * scale) if iv.mode == "add" else ("project_out", 1.0)
        every = (make_intervention(kind, jnp.asarray(dirs), dirs.shape[0], site="resid_post", coeff=coeff),
                 ) if alpha else ()
        nll, count = map_batches(lambda t, m, lm: _answer_nll(params, t, m, lm, every, config=config),
                                 tokens, mask, loss_mask, batch_size=cfg.batch_size)
        row["benign_ppl"] = float(np.exp(nll.sum() / max(count.sum(), 1)))
        rows.append(row)
    return rows


def analyse(cfg: Study3RealConfig, x: np.ndarray, y: np.ndarray, refused: np.ndarray, before: str, after: str
            ) -> dict[str, Any]:
    """The synthetic study's per-pair analysis on real states (same kernels, same fields)."""
    shift = residual.representation_shift(jnp.asarray(x), jnp.asarray(y), cfg.shift.variant)
    comp = residual.shift_components(shift)
    n_layers, n, d = y.shape
    pred = residual.refusal_prediction(y, comp.directions, refused, top=cfg.shift.top)
    rand = residual.random_directions(jax.random.key(cfg.seed), n_layers, cfg.shift.n_random, d)
    rand_acc = residual.refusal_prediction(y, rand, refused, top=cfg.shift.n_random)["per_component"]
    k = min(cfg.shift.top, comp.directions.shape[1], cfg.shift.n_random)
    out: dict[str, Any] = {
        "before": before, "after": after, "n": int(n), "refusal_rate": float(refused.mean()),
        "share": np.asarray(comp.share), "effective_rank": residual.effective_rank(comp.share, cfg.shift.thresholds),
        "thresholds": cfg.shift.thresholds, "norms": residual.activation_norms(x, y, shift),
        "dominant_acc": pred["dominant"], "best_acc": pred["best"], "best_index": pred["best_index"],
        "dominant_acc_before": residual.refusal_prediction(x, comp.directions, refused, top=1)["dominant"],
        "random_acc_mean": rand_acc.mean(-1), "random_acc_q95": np.quantile(rand_acc, 0.95, axis=-1),
        "random_best_of_n": rand_acc[:, :k].max(-1), "best_of": k,
        "directions": np.asarray(comp.directions[:, 0]), "sigma": np.asarray(comp.singular_values[:, 0]) / np.sqrt(n),
        "noise_top_share": float(residual.shift_components(
            jax.random.normal(jax.random.key(cfg.seed + 1), (1, n, d))).share[0, 0]),
    }
    train_idx, test_idx = np.arange(n) % 2 == 0, np.arange(n) % 2 == 1
    if 0 < refused[train_idx].sum() < train_idx.sum() and 0 < refused[test_idx].sum() < test_idx.sum():
        p = cfg.probe
        probe = probes.fit_probes(y[:, train_idx], refused[train_idx], l2=p.l2, steps=p.steps, lr=p.lr)
        out["probe_acc"] = np.asarray(probes.probe_accuracy(probe, y[:, test_idx], refused[test_idx]))
        out["probe_cosine"] = residual.cosine(probes.probe_direction(probe), comp.directions[:, 0])
    return out


def run(cfg: Study3RealConfig, out: str) -> dict[str, Any]:
    """Every stage into ``out``; returns the metrics written to ``OUT/metrics.json``."""
    t0 = time.perf_counter()
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "config.yaml"), "w") as f:
        yaml.safe_dump(cfg.to_dict(), f, sort_keys=False)
    examples, harmful = load_prompts(cfg)
    mesh = make_mesh(cfg.mesh) if cfg.mesh else None
    constraint = activation_constraint(mesh, cfg.strategy) if mesh is not None else None
    st, c = Stages(out), cfg.to_dict()
    data_key = {"sets": {s: c["sets"][s] for s in [*cfg.harmful, *cfg.benign]}, "max_chars": cfg.max_chars,
                "dtype": cfg.dtype}
    tokenizer = load_tokenizer_for("base", cfg.base)
    prompts = encode(tokenizer, cfg.base, examples)
    specs = {"base": cfg.base}
    keys = {"base": c["base"]}
    for name, t in cfg.tuned.items():
        if t.train is not None:
            folder = os.path.join(out, f"train_{name}")
            keys[name] = {"base": c["base"], "train": t.train}
            st.run(f"train_{name}", keys[name], lambda d, n=name: train_run.run(cfg.run_config(n, d)))
            specs[name] = dataclasses.replace(cfg.base, path=os.path.join(folder, "model"),
                                              tokenizer=cfg.base.tokenizer or cfg.base.path)
        else:
            keys[name], specs[name] = {"path": t.path}, dataclasses.replace(cfg.base, path=t.path)
    states, refused, answers = {}, {}, {}
    for role, spec in specs.items():
        ckpt = Checkpoint(role, spec, cfg.dtype, mesh, cfg.strategy, constraint)
        folder = os.path.join(out, f"states_{role}")
        st.json(f"states_{role}", {**data_key, "model": keys[role]},
                lambda ck=ckpt, d=folder: states_stage(cfg, ck, prompts, d))
        states[role] = np.load(os.path.join(folder, STATES))
        if role != "base":
            ans = st.json(f"answers_{role}", {**data_key, "model": keys[role], "judge": cfg.judge,
                                              "max_new_tokens": cfg.max_new_tokens},
                          lambda ck=ckpt: answers_stage(cfg, ck, tokenizer, prompts))
            refused[role], answers[role] = np.asarray(ans["refused"], bool), ans
        ckpt.release()
    pairs = {f"base->{name}": analyse(cfg, states["base"], states[name], refused[name], "base", name)
             for name in cfg.tuned}
    sweeps = {}
    if cfg.intervention.alphas:
        for name in cfg.tuned:
            ckpt = Checkpoint(name, specs[name], cfg.dtype, mesh, cfg.strategy, constraint)
            key = {**data_key, "models": [keys["base"], keys[name]], "judge": cfg.judge,
                   "max_new_tokens": cfg.max_new_tokens, "shift": c["shift"], "intervention": c["intervention"]}
            sweeps[name] = st.json(f"intervention_{name}", key, lambda ck=ckpt, n=name: intervention_stage(
                cfg, ck, tokenizer, prompts, harmful, pairs[f"base->{n}"], answers[n]))
            ckpt.release()
    metrics: dict[str, Any] = {"pairs": {k: {f: v for f, v in r.items() if f != "directions"}
                                         for k, r in pairs.items()},
                               "intervention": sweeps, "min_n": cfg.min_n, "n_harmful": int(harmful.sum()),
                               "n_benign": int((1 - harmful).sum()),
                               "refusal_by_class": {name: {"harmful": float(r[harmful == 1].mean()),
                                                           "benign": float(r[harmful == 0].mean())}
                                                    for name, r in refused.items()}}
    decided = [claims_lib.claim_low_rank(metrics), claims_lib.claim_predicts(metrics)]
    metrics["claims"] = [dataclasses.asdict(cl) | {"verdict": cl.verdict} for cl in decided]
    metrics["timing"] = {**st.timing, "total_this_invocation": time.perf_counter() - t0}
    metrics["ran_stages"], metrics["skipped_stages"] = st.ran, st.skipped
    write_report(out, cfg, metrics)
    return metrics


def write_report(out: str, cfg: Study3RealConfig, metrics: dict[str, Any]) -> None:
    rep = Report(out, f"Study 3 — the safety residual space ({cfg.name})")
    rep.text(f"Base `{cfg.base.path}`; tuned: {', '.join(cfg.tuned)}; {metrics['n_harmful']} harmful and "
             f"{metrics['n_benign']} benign prompts; refusal judged by {cfg.judge}. " + (cfg.notes or ""))
    rep.section("Claims")
    for cl in metrics["claims"]:
        label = "_Not decided:_" if cl["holds"] is None else "_Reading:_"
        rep.text(f"**{cl['statement']} — {cl['verdict']}.** {cl['evidence']} {label} {cl['reading']}")
    rep.section("Refusal rates", "; ".join(f"{k}: harmful {v['harmful']:.2f}, benign {v['benign']:.2f}"
                                           for k, v in metrics["refusal_by_class"].items()))
    rep.section("Per layer")
    for name, r in metrics["pairs"].items():
        rep.table(report_lib.layer_rows(r), caption=f"{name} (N = {r['n']}, refusal rate {r['refusal_rate']:.2f})")
    for name, rows in metrics["intervention"].items():
        rep.table([{"α": r["alpha"], "harmful refused": r["harmful_refused_k"] / r["harmful_n"],
                    "benign refused": r["benign_refused_k"] / r["benign_n"], "benign ppl": r["benign_ppl"]}
                   for r in rows], caption=f"intervention on {name} ({cfg.intervention.mode})")
    rep.plot("accuracy_per_layer", report_lib.accuracy_figure(metrics["pairs"]))
    rep.plot("effective_rank", report_lib.rank_figure(metrics["pairs"]))
    rep.plot("spectra", report_lib.spectra_figure(metrics["pairs"]))
    rep.plot("activation_norms", report_lib.norms_figure(metrics["pairs"]))
    rep.metrics.update(metrics)
    rep.write()


def main(argv: list[str] | None = None) -> None:
    args = study_parser(__doc__, default="real_llama3", configs="real_llama3", example="batch_size=16"
                        ).parse_args(argv)
    run_study(args, load_real_config, run)


if __name__ == "__main__":
    main()
