"""--smoke: each preset's whole path (every phase, its windows, vocabulary, data, eval, report) with
tiny models and 2 steps per phase, so that a path that only the big presets take cannot break unseen.
The gpu preset's path runs inside the CPU dry run of tools/gpu_check.py (its third stage), and so does the
headline comparison of tools/ablate.py (its fourth, under ablate --smoke)."""
import json
import os

import config
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


def test_gpu_check_dry_run_covers_attention_bench_the_gpu_preset_pipeline_and_the_headline(tmp_path, capsys):
    report, out = str(tmp_path / "gpu_check.json"), str(tmp_path / "pipeline")
    assert gpu_check.main(["--device", "cpu", "--tiny", "--json", report, "--out", out]) == 0
    r = json.load(open(report))
    assert r["attention"] and all(row["ok"] for row in r["attention"])
    assert "speedup_vs_transformers" in r["bench"] and r["bench_tf32"]
    pipe = r["pipeline"]
    assert pipe["exit"] == 0 and "--preset gpu" in pipe["command"]
    assert [pipe[f"phase{k}"]["window"] for k in range(3)] == [8192, 512, 2048]  # the gpu preset's windows
    printed = capsys.readouterr().out
    assert "passkey retrieval after phase 2" in printed
    head = r["headline"]
    assert head["exit"] == 0 and head["step_factor"] == 1.0 and "--smoke" in head["command"]
    assert "--variants ce-long,kd,ce" in head["command"] and "--seeds 1" in head["command"]
    assert set(head["summary"]) == set(gpu_check.SUMMARY_KEYS)
    for key, value in head["summary"].items():
        if key == "kd_reach":  # a key distance in tokens, not an accuracy
            assert value is None or 0 <= value <= gpu_check.HEADLINE_TINY["window"]
        else:
            assert value is None or 0 <= value <= 1, (key, value)
    assert head["long_distance"] == [256, 512]  # 4x the short window up to the extension: prompts fall in it
    assert head["summary"]["kd_long_acc"] is not None
    assert set(head["by_distance"]) == {"teacher", "phase1", "ce-long", "kd", "ce"}
    for buckets in head["by_distance"].values():
        assert list(buckets) == head["distance_buckets"] and all(v is None or 0 <= v <= 1 for v in buckets.values())
    assert "| kd | 1 |" in printed and "upper reference: CE on long documents" in printed  # ablate's report table
    assert set(r["stage_seconds"]) == {"attention+bench", "pipeline", "headline"}


def test_gpu_check_headline_scale_and_time_plan():
    """The GPU headline's configuration (not the dry run's): >= 8x the CPU headline, a teacher that has trained
    on 4x the distances the student must reach, and a plan that leaves the earlier stages most of the budget."""
    h, cpu = gpu_check.HEADLINE, config.PRESETS["cpu"]
    for cfg in (h, gpu_check.HEADLINE_TINY):
        assert cfg["teacher_window"] >= 4 * cfg["window"] and cfg["window"] >= 8 * cfg["short_len"]
    for who in ("teacher", "student"):  # non-embedding parameters, 12 L C^2
        assert h[f"{who}_layers"] * h[f"{who}_embd"] ** 2 >= 8 * cpu[f"{who}_layers"] * cpu[f"{who}_embd"] ** 2
        assert h[f"{who}_embd"] // h[f"{who}_heads"] == 64  # the head size of the CPU headline's student
    assert h["teacher_window"] >= 8 * cpu["teacher_window"] and h["window"] > cpu["short_len"] * cpu["growth"]
    plan = gpu_check.headline_seconds(h)
    assert plan["total"] <= gpu_check.BUDGET_S / 3


def test_gpu_check_time_guard_scales_every_phase_or_skips():
    h = gpu_check.HEADLINE
    plan = gpu_check.headline_seconds(h)
    assert gpu_check.fit_budget(h, plan["total"] + 1) == (h, 1.0)
    half = plan["fixed"] + (plan["total"] - plan["fixed"]) / 2  # half the step-dependent time left
    cfg, f = gpu_check.fit_budget(h, half)
    assert f == 0.5 and all(cfg[k] == h[k] // 2 for k in ("teacher_steps", "phase1_steps", "steps"))
    assert gpu_check.headline_seconds(cfg)["total"] <= half + 0.5
    assert {k: v for k, v in cfg.items() if not k.endswith("steps")} == {k: v for k, v in h.items() if not k.endswith("steps")}
    assert gpu_check.fit_budget(h, plan["fixed"])[0] is None  # nothing left for a single step: skipped
