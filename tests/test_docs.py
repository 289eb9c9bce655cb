"""The docs' tables and commands of record are rendered from their result files (tools/report.py): a test per rule."""
import glob
import json
import os

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
        stored = [f for f in glob.glob(folder + "*.json") if json.load(open(f)).get("command")]
        if stored:
            with open(folder + "README.md") as fh:
                assert "<!-- commands -->" in fh.read(), f"{folder}README.md has no commands of record"


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
