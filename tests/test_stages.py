"""safety_jax.stages: a stage runs once per fingerprint of its dependencies, and its records are written atomically."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from safety_jax.stages import Stages, fingerprint, write_atomic


def _counting():
    calls = []

    def fn():
        calls.append(1)
        return {"value": len(calls), "array": np.arange(3)}
    return calls, fn


def test_stage_runs_once_for_the_same_dependencies_and_again_when_they_change(tmp_path):
    calls, fn = _counting()
    st = Stages(str(tmp_path))
    assert st.json("eval", {"lr": 1e-3}, fn) == {"value": 1, "array": [0, 1, 2]}
    assert st.ran == ["eval"] and st.skipped == []
    again = Stages(str(tmp_path))  # a later invocation on the same folder
    assert again.json("eval", {"lr": 1e-3}, fn)["value"] == 1
    assert again.skipped == ["eval"] and again.ran == [] and len(calls) == 1
    assert again.is_done("eval", {"lr": 1e-3}) and not again.is_done("eval", {"lr": 2e-3})
    changed = Stages(str(tmp_path))
    assert changed.json("eval", {"lr": 2e-3}, fn)["value"] == 2
    assert changed.ran == ["eval"] and len(calls) == 2


def test_key_order_does_not_change_the_fingerprint():
    assert fingerprint({"a": 1, "b": [1, 2]}) == fingerprint({"b": [1, 2], "a": 1})
    assert fingerprint({"a": 1}) != fingerprint({"a": 2})


def test_recomputing_a_changed_stage_wipes_its_old_outputs(tmp_path):
    st = Stages(str(tmp_path))

    def write(name):
        def compute(folder):
            with open(os.path.join(folder, name), "w") as f:
                f.write(name)
        return compute
    folder = st.run("train", {"steps": 1}, write("old.txt"))
    st.run("train", {"steps": 2}, write("new.txt"))
    assert sorted(os.listdir(folder)) == ["DONE", "STARTED", "new.txt"]


def test_interrupted_stage_keeps_its_folder_for_the_same_fingerprint_only(tmp_path):
    st = Stages(str(tmp_path))

    def crash(folder):
        with open(os.path.join(folder, "checkpoint"), "w") as f:
            f.write("step 3")
        raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        st.run("train", {"steps": 5}, crash)
    assert not os.path.exists(tmp_path / "train" / "DONE")
    seen = []
    st.run("train", {"steps": 5}, lambda folder: seen.append(os.path.exists(os.path.join(folder, "checkpoint"))))
    assert seen == [True]  # same settings: the trainer finds its checkpoint and resumes
    with pytest.raises(KeyboardInterrupt):
        st.run("other", {"steps": 5}, crash)
    st.run("other", {"steps": 6}, lambda folder: seen.append(os.path.exists(os.path.join(folder, "checkpoint"))))
    assert seen == [True, False]  # other settings: the stale checkpoint is wiped


def test_records_are_written_atomically(tmp_path, monkeypatch):
    path = tmp_path / "result.json"
    write_atomic(str(path), json.dumps({"old": 1}))

    def broken_replace(src, dst):
        raise OSError("disk full")
    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError):
        write_atomic(str(path), json.dumps({"new": 2}))
    assert json.loads(path.read_text()) == {"old": 1}  # the old file, whole
    assert os.listdir(tmp_path) == ["result.json"]  # no temporary left behind


def test_a_failing_json_stage_is_not_marked_done(tmp_path):
    st = Stages(str(tmp_path))

    def fail():
        raise ValueError("boom")
    with pytest.raises(ValueError):
        st.json("eval", {}, fail)
    assert not os.path.exists(tmp_path / "eval" / "DONE")
    assert not os.path.exists(tmp_path / "eval" / "result.json")
