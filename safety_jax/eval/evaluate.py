"""Evaluate a model on a benchmark: generate → judge → table, with every answer cached as JSONL so a killed run resumes.

Usage::

    model = EvalModel.load("llama-2-7b-chat", dtype="bfloat16")
    judge = load_judge("GCG-29")
    table = evaluate(model, "advbench", judge, out_dir="runs/advbench", template="chat", max_new_tokens=256)
    print(table.markdown())

What lands in ``out_dir``:

- ``answers.jsonl``: one line per answer ``{id, prompt, category, answer, settings_hash, input_digest}``, appended
  and fsynced after every batch. A re-run with the same settings answers only the ids the file lacks; a torn last
  line (a kill mid-write) is dropped. The settings hash covers the model's identity (folder, file sizes and times,
  LoRA folder and scale, param dtype), template, sampling settings, seed, max_new_tokens and interventions; answers
  made under other settings are never mixed in: the run stops and names what differs (``settings.json`` records
  them).
- ``verdicts.jsonl``: the judge's result per example (``{id, category, **result}``), rewritten each run, so cached
  answers can be judged again by another judge.
- ``table.md`` / ``table.json``: per judge metric, the count k / n, rate and Wilson 95 % interval, over all examples
  and per category (an example in several categories counts in each); ``table.json`` also records the judge's
  ``describe()``, the dataset, the settings and the model.

Sampling is reproducible across a resume: examples go through in fixed batches of ``batch_size`` in dataset order,
and each batch's rng is ``fold_in(key(seed), digest(ids of the examples it generates))``, so a run killed after some
batches and resumed gives the answers an uninterrupted run gives.

On a multi-device mesh (``mesh=``) params and adapters are placed by the strategy's rules and ``generate_text`` runs
under the strategy's activation constraints, which split the batch (and KV cache) along the data axes; the batch
size should be divisible by those axes, or the batch stays replicated. One process only for now: a multi-host mesh
needs the prompts placed as global arrays, which ``generate_text`` does not do (files are written by process 0).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import jax
import numpy as np

from safety_jax.data.benchmarks import CATEGORY_SEP, EvalExample, load_benchmark
from safety_jax.data.text import alpaca_prompt
from safety_jax.errors import ConfigError, DataError
from safety_jax.eval.stats import wilson
from safety_jax.model.config import LlamaConfig
from safety_jax.model.interventions import Intervention
from safety_jax.model.llama import Params
from safety_jax.model.lora import LoraConfig
from safety_jax.report import markdown_table, to_jsonable

if TYPE_CHECKING:
    from jax.sharding import Mesh

    from safety_jax.eval.judges import Judge

TEMPLATES = ("chat", "alpaca", "none")
ANSWERS, VERDICTS, SETTINGS = "answers.jsonl", "verdicts.jsonl", "settings.json"
TABLE_MD, TABLE_JSON = "table.md", "table.json"
ALL = "all"


# ---------------------------------------------------------------------------------------------------- the model
@dataclasses.dataclass(frozen=True, eq=False)
class EvalModel:
    """A model to evaluate: config, params, tokenizer and optional LoRA adapters, with the identity its answers are
    cached under.

    name: the model folder (or any label for an in-memory model); lora_name: the adapter folder; fingerprint: a digest
    of the folders' file names, sizes and modification times (``""`` when unknown), so a folder retrained in place
    does not reuse answers of the old weights.
    """

    config: LlamaConfig
    params: Params
    tokenizer: Any
    name: str
    lora: Params | None = None
    lora_cfg: LoraConfig | None = None
    lora_scale: float = 1.0
    lora_name: str | None = None
    fingerprint: str = ""

    @classmethod
    def load(cls, folder: str | os.PathLike, *, dtype: str | None = None, lora: str | os.PathLike | None = None,
             shardings: Any = None) -> EvalModel:
        """Load a Hugging Face or orbax model folder with its tokenizer (``model.io``), and LoRA adapters from a
        ``save_lora`` folder (scale ``lora_cfg.scale``). ``shardings`` as for ``io.load_model``."""
        from safety_jax.model.io import load_model, load_tokenizer
        from safety_jax.model.lora import load_lora

        tokenizer = load_tokenizer(folder)
        config, params = load_model(folder, dtype=dtype, shardings=shardings)
        adapters, lora_cfg = load_lora(lora) if lora is not None else (None, None)
        return cls(config, params, tokenizer, _folder_name(folder), lora=adapters, lora_cfg=lora_cfg,
                   lora_scale=lora_cfg.scale if lora_cfg is not None else 1.0,
                   lora_name=None if lora is None else _folder_name(lora),
                   fingerprint=folder_fingerprint(folder, *([lora] if lora is not None else [])))

    def identity(self) -> dict[str, Any]:
        """What the answers depend on about the model (part of the settings hash)."""
        return {"model": self.name, "param_dtype": str(self.config.param_dtype), "lora": self.lora_name,
                "lora_scale": self.lora_scale if self.lora is not None else None, "fingerprint": self.fingerprint}


def _folder_name(folder: str | os.PathLike) -> str:
    text = os.fspath(folder)
    return text if "://" in text else os.path.abspath(text)


def folder_fingerprint(*folders: str | os.PathLike) -> str:
    """A short digest of every file's relative path, size and mtime under local ``folders`` (``""`` for URIs)."""
    h = hashlib.sha256()
    for folder in folders:
        text = os.fspath(folder)
        if "://" in text or not os.path.isdir(text):
            return ""
        for root, dirs, files in os.walk(text):
            dirs.sort()
            for f in sorted(files):
                st = os.stat(os.path.join(root, f))
                h.update(f"{os.path.relpath(os.path.join(root, f), text)}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


# ---------------------------------------------------------------------------------------------------- the table
@dataclasses.dataclass(frozen=True)
class EvalTable:
    """Per judge metric and group (``"all"``, then each category): ``k`` of ``n`` examples, ``rate`` and its Wilson
    95 % interval ``[ci_low, ci_high]``; plus what produced them."""

    rows: tuple[dict[str, Any], ...]
    judge: dict[str, Any]
    dataset: str
    settings: dict[str, Any]
    settings_hash: str
    n: int

    def row(self, metric: str, group: str = ALL) -> dict[str, Any]:
        """The row of ``metric`` in ``group``."""
        for r in self.rows:
            if r["metric"] == metric and r["group"] == group:
                return r
        raise KeyError(f"no row for metric {metric!r} in group {group!r}")

    def markdown(self) -> str:
        judge = self.judge.get("name") or self.judge.get("list") or "judge"
        head = (f"Evaluation of `{self.settings['model']['model']}` on `{self.dataset}` ({self.n} examples), judged "
                f"by {judge}; template {self.settings['template']}, temperature {self.settings['temperature']}, "
                f"max_new_tokens {self.settings['max_new_tokens']}, seed {self.settings['seed']}.\n\n")
        cells = [{"group": r["group"], "metric": r["metric"], "k / n": f"{r['k']} / {r['n']}", "rate": r["rate"],
                  "95 % CI": "–" if r["n"] == 0 else f"[{r['ci_low']:.3f}, {r['ci_high']:.3f}]"} for r in self.rows]
        return head + markdown_table(cells)

    def to_json(self) -> dict[str, Any]:
        return to_jsonable({"dataset": self.dataset, "n": self.n, "judge": self.judge, "settings": self.settings,
                            "settings_hash": self.settings_hash, "rows": list(self.rows)})

    def write(self, out_dir: str | os.PathLike) -> tuple[str, str]:
        """``table.md`` and ``table.json`` in ``out_dir``, each written atomically; returns their paths."""
        md, js = os.path.join(out_dir, TABLE_MD), os.path.join(out_dir, TABLE_JSON)
        write_atomic(md, self.markdown())
        write_atomic(js, json.dumps(self.to_json(), indent=1) + "\n")
        return md, js


def categories_of(example: EvalExample) -> list[str]:
    """The categories an example counts in: a string names them joined by ``benchmarks.CATEGORY_SEP`` (as
    BeaverTails' flagged harm categories); a list / tuple / set lists them; a dict of flags names those that are
    true; None is none."""
    cat = example.category
    if cat is None or cat == "":
        return []
    if isinstance(cat, str):
        return [c for c in cat.split(CATEGORY_SEP) if c]
    if isinstance(cat, Mapping):
        return [str(k) for k, v in cat.items() if v]
    return [str(c) for c in cat]


def tabulate(examples: Sequence[EvalExample], results: Sequence[Mapping[str, Any]],
             metrics: Sequence[str]) -> list[dict[str, Any]]:
    """Rows of counts, rates and Wilson intervals per metric, over all examples and per category (first-seen
    order). A metric whose value is None in a result (the judge could not decide) leaves that example out of its n."""
    groups: dict[str, list[int]] = {ALL: list(range(len(examples)))}
    for i, ex in enumerate(examples):
        for c in categories_of(ex):
            groups.setdefault(c, []).append(i)
    rows = []
    for group, idx in groups.items():
        for m in metrics:
            values = [results[i].get(m) for i in idx]
            if any(v is not None and not isinstance(v, bool | np.bool_) for v in values):
                raise DataError(f"judge metric {m!r} must be a bool per example; got {values[:3]}…")
            decided = [bool(v) for v in values if v is not None]
            k, n = sum(decided), len(decided)
            lo, hi = wilson(k, n)
            rows.append({"group": group, "metric": m, "k": k, "n": n, "rate": k / n if n else math.nan,
                         "ci_low": lo, "ci_high": hi})
    return rows


# ---------------------------------------------------------------------------------------------------- settings
def settings_for(model: EvalModel, *, template: str, max_new_tokens: int, temperature: float, top_p: float,
                 top_k: int, seed: int, interventions: Sequence[Intervention]) -> dict[str, Any]:
    """Everything an answer depends on besides the prompt (hashed by :func:`settings_hash`)."""
    return {"model": model.identity(), "template": template, "max_new_tokens": int(max_new_tokens),
            "temperature": float(temperature), "top_p": float(top_p), "top_k": int(top_k), "seed": int(seed),
            "interventions": interventions_digest(interventions)}


def settings_hash(settings: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(to_jsonable(settings), sort_keys=True).encode()).hexdigest()[:16]


def interventions_digest(interventions: Sequence[Intervention]) -> str | None:
    """A digest of the interventions' kinds, sites and arrays (None when there are none)."""
    if not interventions:
        return None
    h = hashlib.sha256()
    for iv in interventions:
        h.update(f"{iv.kind}:{iv.site}".encode())
        for a in (iv.direction, iv.coeff, iv.layers, iv.positions):
            arr = np.asarray(a if a is not None else np.zeros(0), np.float64)
            h.update(f"{arr.shape}".encode() + arr.tobytes())
    return h.hexdigest()[:16]


def _settings_diff(old: Mapping[str, Any], new: Mapping[str, Any], prefix: str = "") -> list[str]:
    out = []
    for key in sorted({*old, *new}):
        a, b = old.get(key), new.get(key)
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            out += _settings_diff(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} → {b!r}")
    return out


# ---------------------------------------------------------------------------------------------------- prompts
def model_input(example: EvalExample, template: str) -> str | list[dict[str, str]]:
    """What the model is given for ``example``: chat messages (``chat``), the Alpaca prompt with the example's
    ``input`` (``alpaca``), or the raw prompt (``none``; an ``input`` follows it after a blank line)."""
    if template == "chat":
        return example.chat_messages()
    if template == "alpaca":
        return alpaca_prompt(example.prompt, example.input or "")
    return f"{example.prompt}\n\n{example.input}" if example.input else example.prompt


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:12]


def batch_key(seed: int, ids: Sequence[str]) -> jax.Array:
    """The rng of a generation batch: ``fold_in(key(seed), 32-bit digest of its ids)``."""
    digest = int.from_bytes(hashlib.sha256("\n".join(ids).encode()).digest()[:4], "little")
    return jax.random.fold_in(jax.random.key(seed), digest)


# ---------------------------------------------------------------------------------------------------- files
def write_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` beside ``path`` and rename it in (readers never see a half-written file)."""
    tmp = f"{os.fspath(path)}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_answers(path: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """The cached answers ``{id: line}`` of an ``answers.jsonl``. Text after the last newline is a line torn by a
    kill mid-write: it is cut off the file (its answers are generated again) so appends continue on a clean line.
    A complete line that is not an answer record is an error."""
    if not os.path.exists(path):
        return {}
    with open(path, "rb") as f:
        data = f.read()
    *complete, torn = data.split(b"\n")
    out: dict[str, dict[str, Any]] = {}
    for i, raw in enumerate(complete):
        if not raw.strip():
            continue
        try:
            row = json.loads(raw)
        except ValueError:
            row = None
        if not isinstance(row, dict) or "id" not in row or "answer" not in row:
            raise DataError(f"{path}: line {i + 1} is not an answer record; delete the file to generate every "
                            "answer again")
        out[str(row["id"])] = row
    if torn and jax.process_index() == 0:
        with open(path, "r+b") as f:
            f.truncate(len(data) - len(torn))
    return out


def _append(path: str | os.PathLike, rows: Sequence[Mapping[str, Any]]) -> None:
    if jax.process_index() != 0:
        return
    with open(path, "a") as f:
        f.write("".join(json.dumps(to_jsonable(r), ensure_ascii=False) + "\n" for r in rows))
        f.flush()
        os.fsync(f.fileno())


def _check_cache(out_dir: str, settings: Mapping[str, Any], digest: str,
                 cached: Mapping[str, Mapping[str, Any]]) -> None:
    """Stop when ``out_dir`` holds answers made under other settings, naming what differs."""
    path = os.path.join(out_dir, SETTINGS)
    old = None
    if os.path.exists(path):
        with open(path) as f:
            old = json.load(f)
    other = sorted({str(r.get("settings_hash")) for r in cached.values()} - {digest})
    if (old is not None and old.get("settings_hash") != digest and cached) or other:
        diff = _settings_diff(old.get("settings", {}), to_jsonable(settings)) if old else []
        what = "; ".join(diff) if diff else f"settings hash {', '.join(other)} → {digest}"
        raise ConfigError(f"{out_dir}/{ANSWERS} holds answers generated with other settings ({what}); use another "
                          f"output folder, or delete {ANSWERS} there to regenerate them")


# ---------------------------------------------------------------------------------------------------- evaluate
def evaluate(model: EvalModel, dataset: str | Sequence[EvalExample], judge: Judge, *, out_dir: str | os.PathLike,
             template: str = "chat", batch_size: int = 32, max_new_tokens: int = 256, temperature: float = 0.0,
             top_p: float = 1.0, top_k: int = 0, seed: int = 0, interventions: Sequence[Intervention] = (),
             progress: bool = True, data_files: Sequence[str] | None = None, limit: int | None = None,
             dataset_name: str | None = None, mesh: Mesh | None = None, strategy: str = "auto") -> EvalTable:
    """Answer every example of ``dataset`` (a ``load_benchmark`` spec, loaded with ``data_files`` and ``limit``, or
    a list of ``EvalExample``, recorded as ``dataset_name``), judge the answers and table the judge's metrics; see the
    module docstring for the files written to ``out_dir`` and how a re-run reuses them.

    template: ``chat`` (the tokenizer's chat template over ``example.chat_messages()``), ``alpaca`` or ``none``;
    sampling as ``generate.generate_text`` (``temperature=0``: greedy); ``mesh``/``strategy``: see the module
    docstring.
    """
    from safety_jax.model.generate import generate_text

    if template not in TEMPLATES:
        raise ConfigError(f"template {template!r} is unknown; choose one of {', '.join(TEMPLATES)}")
    if batch_size < 1:
        raise ConfigError(f"batch_size must be at least 1, got {batch_size}")
    if template == "chat" and getattr(model.tokenizer, "chat_template", None) is None:
        raise ConfigError(f"template 'chat' needs a tokenizer with a chat_template; {model.name}'s has none: use "
                          "template 'alpaca' or 'none'")
    if isinstance(dataset, str):
        spec, examples = dataset, list(load_benchmark(dataset, data_files=data_files, limit=limit))
    else:
        spec, examples = dataset_name or "(examples)", list(dataset)[:limit]
    if not examples:
        raise DataError(f"dataset {spec} has no examples to evaluate")
    ids = [str(e.id) for e in examples]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise DataError(f"dataset {spec}: example id {dup!r} occurs more than once; answers are cached by id")

    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    settings = settings_for(model, template=template, max_new_tokens=max_new_tokens, temperature=temperature,
                            top_p=top_p, top_k=top_k, seed=seed, interventions=interventions)
    digest = settings_hash(settings)
    answers_path = os.path.join(out_dir, ANSWERS)
    cached = read_answers(answers_path)
    _check_cache(out_dir, settings, digest, cached)
    if jax.process_index() == 0:
        write_atomic(os.path.join(out_dir, SETTINGS),
                     json.dumps(to_jsonable({"settings_hash": digest, "settings": settings}), indent=1) + "\n")

    inputs = [model_input(e, template) for e in examples]
    input_digests = [_digest(x) for x in inputs]
    for e, d in zip(examples, input_digests):
        row = cached.get(str(e.id))
        if row is not None and row.get("input_digest") != d:
            raise DataError(f"{answers_path}: example {e.id!r} was answered for another prompt; its id names a "
                            "different example now (another dataset?): use another output folder")

    params, lora = _place(model, mesh, strategy)
    sharding = None
    if mesh is not None:
        from safety_jax.parallel import activation_constraint

        sharding = activation_constraint(mesh, strategy)
    chunks = [range(i, min(i + batch_size, len(examples))) for i in range(0, len(examples), batch_size)]
    todo = [c for c in ([i for i in chunk if ids[i] not in cached] for chunk in chunks) if c]
    missing = sum(len(c) for c in todo)
    bar = _progress(len(todo), progress, f"generate ({missing} of {len(examples)} to answer)")
    for chunk in todo:
        texts = generate_text(params, model.config, model.tokenizer, [inputs[i] for i in chunk],
                              chat=template == "chat", batch_size=batch_size,
                              rng=batch_key(seed, [ids[i] for i in chunk]), progress=False,
                              interventions=tuple(interventions), lora=lora, lora_scale=model.lora_scale,
                              activation_sharding=sharding, max_new_tokens=max_new_tokens, temperature=temperature,
                              top_p=top_p, top_k=top_k)
        rows = [{"id": ids[i], "prompt": examples[i].prompt, "category": examples[i].category, "answer": t,
                 "settings_hash": digest, "input_digest": input_digests[i]} for i, t in zip(chunk, texts)]
        _append(answers_path, rows)
        cached.update({r["id"]: r for r in rows})
        bar.update(1)
    bar.close()

    answers = [cached[i]["answer"] for i in ids]
    results = list(judge(examples, answers))
    if len(results) != len(examples):
        raise DataError(f"judge {getattr(judge, 'name', judge)!r} returned {len(results)} results for "
                        f"{len(examples)} answers")
    if jax.process_index() == 0:
        write_atomic(os.path.join(out_dir, VERDICTS), "".join(
            json.dumps(to_jsonable({"id": i, "category": e.category, **r}), ensure_ascii=False) + "\n"
            for i, e, r in zip(ids, examples, results)))
    table = EvalTable(rows=tuple(tabulate(examples, results, tuple(judge.metrics))), judge=dict(judge.describe()),
                      dataset=spec, settings=to_jsonable(settings), settings_hash=digest, n=len(examples))
    if jax.process_index() == 0:
        table.write(out_dir)
    return table


def _place(model: EvalModel, mesh: Mesh | None, strategy: str) -> tuple[Params, Params | None]:
    """Params and adapters on ``mesh`` under ``strategy``'s rules (unchanged without a mesh)."""
    if mesh is None:
        return model.params, model.lora
    from safety_jax.parallel import shard_params, tree_shardings_for

    params = shard_params(model.params, model.config, mesh, strategy)
    lora = model.lora
    if lora is not None:
        lora = jax.device_put(lora, tree_shardings_for(lora, model.config, mesh, strategy))
    return params, lora


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(total: int, enabled: bool, desc: str) -> Any:
    if not enabled or total == 0:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="batch")


__all__ = ["EvalModel", "EvalTable", "TEMPLATES", "batch_key", "categories_of", "evaluate", "folder_fingerprint",
           "model_input", "read_answers", "settings_for", "settings_hash", "tabulate", "write_atomic"]
