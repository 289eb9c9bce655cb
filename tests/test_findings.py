"""findings.py: the verdict rules on constructed numbers, and the whole path on smoke-sized runs."""
import json

import numpy as np
import pytest
import torch

import ablate
import findings


def spread(*seeds):
    return findings.spread(seeds)


def test_finding1_needs_a_lead_beyond_the_seed_spread():
    assert findings.schedule_verdict({"bound": spread(0.5, 0.6), "fixed": spread(0.2, 0.4)}) == ("reproduced", "bound")
    assert findings.schedule_verdict({"bound": spread(0.2, 0.3), "yarn": spread(0.5, 0.6)}) == ("reversed", "yarn")
    assert findings.schedule_verdict({"bound": spread(0.5, 0.6), "ntk": spread(0.3, 0.55)}) == ("not reproduced", "bound")
    with pytest.raises(ValueError, match="compares base schedules"):
        findings.schedule_verdict({"bound": spread(0.5, 0.6)})


def test_finding3_needs_one_band_ahead_in_every_seed():
    assert findings.band_verdict([[0.0, 0.1, 0.3], [0.05, 0.0, 0.2]]) == ("reproduced", [2, 2])
    assert findings.band_verdict([[0.0, 0.1, 0.3], [0.05, 0.25, 0.2]])[0] == "not reproduced"  # another top band
    assert findings.band_verdict([[0.0, 0.25, 0.3], [0.05, 0.1, 0.2]])[0] == "not reproduced"  # overlapping seeds
    assert findings.band_verdict([[-0.3, -0.1, -0.2], [-0.2, -0.2, -0.1]])[0] == "reversed"  # less than the control
    assert findings.band_verdict([[-0.3, -0.2, -0.05], [-0.2, -0.2, -0.05]])[0] == "reversed"


def test_the_whole_path_on_smoke_runs(tmp_path):
    runs = tmp_path / "runs"
    assert ablate.main(["--smoke", "--out", str(runs), "--results", str(tmp_path / "a.json"), "--png", "", "--variants",
                        ",".join([*findings.ROADS, *ablate.CONTROLS, "kd-fixed", "kd-yarn"])]) == 0
    out = tmp_path / "an"
    argv = ["--runs", str(runs), "--teacher", str(runs / "shared/phase0.pt"), "--init", str(runs / "shared/phase1.pt"),
            "--seeds", "0", "--schedules", str(tmp_path / "a.json"), "--samples", "2", "--out", str(out)]
    assert findings.main(argv) == 0
    assert torch.is_grad_enabled()  # the analyses ran without gradients, and left them on for whoever runs next
    s = json.loads((out / "summary.json").read_text())
    assert {s[f]["verdict"] for f in ("finding1", "finding2", "finding3")} <= {"reproduced", "not reproduced", "reversed"}
    assert [r["rule"] for r in s["finding1"]["rules"]] == ["bound", "fixed", "yarn"]
    assert set(s["finding3"]["by_road"]) == set(findings.ROADS) and s["finding3"]["control"]["ce-long"] == "ce-control"
    q = json.loads((out / "query_updates.json").read_text())["roads"]["kd"]
    assert np.allclose(np.subtract(q["band_change"]["mean"], q["band_control"]["mean"]), q["band_excess"]["mean"])
    p = json.loads((out / "perturbation.json").read_text())["models"]
    assert set(p) == {"teacher", "phase1", *findings.ROADS}
    assert set(p["kd"]["documents"]["kl_by_distance"]) == {"0-64", "64-128", "128-256", "256-513"}
    import roads  # the controls as roads.py sees them: trained in rows of phase 1's window
    assert roads.main([str(tmp_path / "a.json"), "--out", str(tmp_path / "roads.json")]) == 0
    r = {x["name"]: x for x in json.loads((tmp_path / "roads.json").read_text())["roads"]}
    # smoke: one row per step at the short window (batch 1), where PoSE packs 512 tokens into 8 rows of 64
    assert r["kd-control"]["tokens"] == 2 * 64 and r["pose-kd"]["tokens"] == 2 * 512
    assert r["kd-control"]["attention_gflop_per_step"] * 8 == pytest.approx(r["pose-kd"]["attention_gflop_per_step"])
    assert r["ce-control"]["attention_gflop_per_step"] * 64 == pytest.approx(r["ce"]["attention_gflop_per_step"])
    with pytest.raises(SystemExit, match="checkpoints missing"):
        findings.main([*argv[:-2], "--runs", str(tmp_path / "nothing")])
