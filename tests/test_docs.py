"""The docs' tables and commands of record are rendered from their result files (tools/report.py): a test per rule."""
import glob
import json
import os
import shlex

import pytest

import report

ROOT = report.ROOT


@pytest.mark.parametrize("doc", report.DOCS)
def test_every_rendered_region_matches_its_file(doc):
    with open(os.path.join(ROOT, doc)) as fh:
        text = fh.read()
    assert report.render(doc) == text, f"{doc} is stale: run python tools/report.py"


def test_every_results_folder_shows_the_stored_commands_of_its_files():
    for folder in sorted(glob.glob(os.path.join(ROOT, "results", "*/"))):
        stored = [f for f in glob.glob(folder + "*.json") if report.stored_command(f)]
        if stored:
            with open(folder + "README.md") as fh:
                assert "<!-- commands -->" in fh.read(), f"{folder}README.md has no commands of record"


def test_every_stored_ablate_command_reruns_as_written():
    """A command of record is copied into a shell: --flags '--x 1' must keep its quotes, an empty value its ''."""
    import ablate
    cmds = []
    for f in glob.glob(os.path.join(ROOT, "results", "**", "*.json"), recursive=True):
        stored = report.stored_command(f) or []  # a string, or a summary's list of its runs' commands
        cmds += [c for c in ([stored] if isinstance(stored, str) else stored) if c.split()[1].endswith("ablate.py")]
    assert len(cmds) > 40
    for c in cmds:
        ablate.parse_args(shlex.split(c)[2:])  # argparse exits (a test failure) on '--flags --pose_len 128'
    with pytest.raises(SystemExit):
        ablate.parse_args("--flags --pose_len 128 --seeds 1".split())


def test_every_marker_names_a_known_table_and_every_table_is_shown():
    shown = set()
    for doc in report.DOCS:
        with open(os.path.join(ROOT, doc)) as fh:
            shown |= {m[2] for m in report.TABLE.finditer(fh.read())}
    assert shown == set(report.TABLES)


def test_a_number_that_drifts_from_its_file_is_caught(tmp_path, monkeypatch):
    """The check can fail: one accuracy changed in a copy of a results file changes the rendered table."""
    before = report.headline()
    r = json.loads(json.dumps(report.load("results/headline/fixed_base.json")))
    r["cells"]["kd-s0"]["by_distance"]["64-256"] = 0.99
    monkeypatch.setitem(report.load.__defaults__[0], "results/headline/fixed_base.json", r)
    assert report.headline() != before


def test_spread_pools_whole_runs_extension_seeds_and_logged_runs(tmp_path):
    """tools/spread.py: per bucket the mean and range over every run, the reach from 32-token bins."""
    import spread

    def recs(hits):  # one prompt per bucket: key distances 10, 100, 200, 300
        return [{"distance": d, "correct": c} for d, c in zip((10, 100, 200, 300), hits)]
    qs = {"n": 20, "models": {m: {"records": recs(h), "seed": 0, "train_time_s": 60, "trained_on": {"threads": 2, "cpu": "X"}}
                              for m, h in (("t", (1, 1, 1, 1)), ("p1", (1, 0, 0, 0)), ("p2", (1, 1, 0, 0)))}}
    abl = {"cpu": "X", "setup": {"prompts_per_cell": 10},
           "cells": {"teacher": {"distance_correct": [[10, 1], [100, 1], [200, 1], [300, 0]]},
                     "phase1": {"distance_correct": [[10, 1], [100, 0], [200, 0], [300, 0]]},
                     "kd-s1": {"distance_correct": [[10, 1], [100, 0], [200, 0], [300, 0]], "train_minutes": 7.0}}}
    (tmp_path / "qs.json").write_text(json.dumps(qs))
    (tmp_path / "abl.json").write_text(json.dumps(abl))
    (tmp_path / "log.json").write_text(json.dumps([{"seed": 0, "threads": 2, "cpu": "Y", "reach": None, "scope": "logged",
                                                     "acc_by_distance": {"0-64": 0.5, "64-128": 0.5, "128-256": 0.5, "256-512": 0.5}}]))
    out = tmp_path / "spread.json"
    assert spread.main([str(tmp_path / "qs.json"), "--extension", str(tmp_path / "abl.json"), "--log", str(tmp_path / "log.json"),
                        "--out", str(out)]) == 0
    s = json.loads(out.read_text())
    assert [r["seed"] for r in s["runs"]] == [0, 1, 0] and s["runs"][0]["minutes"] == 3.0
    assert s["summary"]["64-128"] == {"mean": 0.5, "min": 0.0, "max": 1.0}
    assert s["runs"][0]["reach"] == 128 and s["runs"][1]["reach"] == 32 and s["summary"]["reach"] == {"min": 32, "max": 128, "runs": 2}
    # each conclusion counts only the runs that have its numbers: the logged run has no phase 1 and no teacher
    claims = {c["claim"]: (c["holds"], c["runs"]) for c in s["summary"]["claims"]}
    assert claims["phase 2 beats phase 1 one document back (64-128)"] == (1, 2)
    assert claims["phase 2 >= 0.5 one document back"] == (2, 3)
    assert claims["the teacher >= 0.5 at 256-512"] == (1, 2)
    assert s["summary"]["teacher_256-512"] == {"min": 0.0, "max": 1.0, "runs": 2}


def test_eval_files_are_grouped_by_road_and_seed(monkeypatch):
    """report.by_road: phase0.pt is the teacher, phase1.pt phase 1, ROAD-sK/phase2.pt seed K of ROAD; the in-window
    table's buckets come from each seed's own records."""
    rec = lambda d, c: {"length": 512, "depth": 0.0, "distance": d, "correct": c}  # noqa: E731
    fake = {"models": {"out/phase0.pt": {"records": [rec(300, True)]}, "out/phase1.pt": {"records": [rec(300, False)]},
                       "runs/roads/pose-kd-s0/phase2.pt": {"records": [rec(10, True), rec(300, True)]},
                       "runs/roads/pose-kd-s1/phase2.pt": {"records": [rec(10, True), rec(300, False)]}}}
    monkeypatch.setitem(report.load.__defaults__[0], "fake.json", fake)
    got = report.in_window("fake.json")
    assert set(got) == {"teacher", "phase1", "pose-kd"} and len(got["pose-kd"]) == 2
    assert [x["256-512"] for x in got["pose-kd"]] == [1.0, 0.0] and got["pose-kd"][0]["64-128"] is None
    assert got["teacher"] == [{"0-64": None, "64-128": None, "128-256": None, "256-512": 1.0}]


@pytest.mark.parametrize("doc", ["README.md", "tools/README.md"])
def test_the_one_commands_time_in_the_docs_is_its_files(doc):
    """The bare `python tools/ablate.py` line states the measured wall time of results/roads/one_command.json."""
    minutes = report.load("results/roads/one_command.json")["minutes"]["total"]
    with open(os.path.join(ROOT, doc)) as fh:
        line = next(x for x in fh if x.startswith("python tools/ablate.py "))
    assert f"{minutes:.1f} min" in line
