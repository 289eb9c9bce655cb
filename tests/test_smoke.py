"""--smoke: each preset's whole path (every phase, its windows, vocabulary, data, eval, report) with
tiny models and 2 steps per phase, so that a path that only the big presets take cannot break unseen.
The gpu preset's path runs inside the CPU dry run of tools/gpu_check.py (its third stage)."""
import json
import os

import distill
import gpu_check


def test_cpu_preset_smoke_runs_every_phase_and_prints_its_passkey_table(tmp_path, capsys):
    out = str(tmp_path / "cpu")
    assert distill.main(["--phase", "2", "--preset", "cpu", "--smoke", "--out", out, "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "passkey retrieval after phase 2" in printed and "phase2                      512" in printed
    for k, window in ((0, 512), (1, 64), (2, 512)):  # the preset's windows, tiny models
        ev = json.load(open(os.path.join(out, f"phase{k}.eval.json")))
        assert ev["window"] == window and ev["records"]


def test_gpu_check_dry_run_covers_attention_bench_and_the_gpu_preset_pipeline(tmp_path, capsys):
    report, out = str(tmp_path / "gpu_check.json"), str(tmp_path / "pipeline")
    assert gpu_check.main(["--device", "cpu", "--tiny", "--json", report, "--out", out]) == 0
    r = json.load(open(report))
    assert r["attention"] and all(row["ok"] for row in r["attention"])
    assert "speedup_vs_transformers" in r["bench"] and r["bench_tf32"]
    pipe = r["pipeline"]
    assert pipe["exit"] == 0 and "--preset gpu" in pipe["command"]
    assert [pipe[f"phase{k}"]["window"] for k in range(3)] == [8192, 512, 2048]  # the gpu preset's windows
    assert "passkey retrieval after phase 2" in capsys.readouterr().out
