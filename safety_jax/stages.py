"""Run-once stages keyed by config fingerprints, shared by every study that writes into one output folder.

    st = Stages("runs/demo")
    pre = st.model("pretrain", pre_key, mcfg, world, lambda folder: pretrain(...))
    scores = st.json("evaluate", {"models": keys}, lambda: evaluate(...))

A stage ``name`` lives in ``OUT/<name>/``. ``DONE`` there records the stage's wall time and the fingerprint (a hash
of the JSON of ``depends_on``): a stage done under the same fingerprint is skipped and its saved outputs loaded; one
done (or interrupted) under another fingerprint is wiped and recomputed. An interrupted stage with the same
fingerprint keeps its folder, so a trainer inside it resumes from its checkpoints. Two studies that call the same
stage with the same dependencies share its outputs: the second finds it done.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from typing import Any

from safety_jax.data.synthetic import World, build_tokenizer
from safety_jax.model.config import LlamaConfig
from safety_jax.model.hf import load_hf, save_hf
from safety_jax.model.llama import Params
from safety_jax.report import to_jsonable

log = logging.getLogger("safety_jax.stages")


def fingerprint(depends_on: Any) -> str:
    """The 16-hex-digit hash a stage is keyed by: sha256 of the sorted JSON of ``depends_on``."""
    return hashlib.sha256(json.dumps(to_jsonable(depends_on), sort_keys=True).encode()).hexdigest()[:16]


def write_atomic(path: str, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same folder and ``os.replace``, so a reader (or a
    later run after a crash) sees the old file or the whole new one, never a partial write."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", prefix=f".{os.path.basename(path)}.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


class Stages:
    """Run-once stages under one output folder (see the module docstring). ``timing`` holds each stage's seconds
    (recorded ones for skipped stages); ``skipped`` the names of stages found done in this invocation; ``ran`` the
    names of the stages computed in it."""

    def __init__(self, out: str) -> None:
        self.out = out
        self.timing: dict[str, float] = {}
        self.skipped: list[str] = []
        self.ran: list[str] = []

    def is_done(self, name: str, depends_on: Any) -> bool:
        """Whether stage ``name`` is done under ``depends_on``'s fingerprint (it would be skipped)."""
        done = os.path.join(self.out, name, "DONE")
        if not os.path.exists(done):
            return False
        with open(done) as f:
            return json.load(f).get("fingerprint") == fingerprint(depends_on)

    def run(self, name: str, depends_on: Any, compute: Callable[[str], None]) -> str:
        """Run ``compute(folder)`` unless stage ``name`` is done under ``depends_on``; returns ``OUT/<name>``."""
        folder = os.path.join(self.out, name)
        done, started = os.path.join(folder, "DONE"), os.path.join(folder, "STARTED")
        key = fingerprint(depends_on)
        if os.path.exists(done):
            with open(done) as f:
                record = json.load(f)
            if record.get("fingerprint") == key:
                self.timing[name] = record["seconds"]
                self.skipped.append(name)
                log.info("stage %s: done before, skipped", name)
                return folder
        if os.path.exists(done) or (os.path.exists(started) and _read(started) != key):
            log.info("stage %s: its config changed, recomputing", name)
            shutil.rmtree(folder)
        os.makedirs(folder, exist_ok=True)
        write_atomic(started, key)
        t0 = time.perf_counter()
        compute(folder)
        self.timing[name] = time.perf_counter() - t0
        write_atomic(done, json.dumps({"seconds": self.timing[name], "fingerprint": key}))
        self.ran.append(name)
        log.info("stage %s: %.1f s", name, self.timing[name])
        return folder

    _run = run  # the name study 1's runners used

    def model(self, name: str, depends_on: Any, config: LlamaConfig, world: World | None,
              fn: Callable[[str], Params], *, tokenizer: Any = None) -> Params:
        """A stage whose output is a model, saved as a Hugging Face folder ``OUT/<name>/model`` (with the synthetic
        world's tokenizer, or ``tokenizer``); returns the params loaded back from it."""
        def compute(d: str) -> None:
            tok = tokenizer if tokenizer is not None or world is None else build_tokenizer(world)
            save_hf(config, fn(d), os.path.join(d, "model"), tokenizer=tok, overwrite=True)
        folder = self.run(name, depends_on, compute)
        return load_hf(os.path.join(folder, "model"))[1]

    def json(self, name: str, depends_on: Any, fn: Callable[[], Any]) -> Any:
        """A stage whose output is JSON-like, saved as ``OUT/<name>/result.json``."""
        def compute(d: str) -> None:
            write_atomic(os.path.join(d, "result.json"), json.dumps(to_jsonable(fn())))
        with open(os.path.join(self.run(name, depends_on, compute), "result.json")) as f:
            return json.load(f)


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()
