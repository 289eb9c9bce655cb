"""The course walkthrough runs top to bottom on the tiny path (its asserts are the facts) and writes every figure;
figures go to tmp_path, so the committed ones in results/walkthrough/ are never rewritten by a test."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIGURES = ("rope_spectrum.png", "rope_bound.png", "packing.png", "pose_positions.png", "kd_vs_ce.png", "teacher_attention.png",
           "passkey.png")


def test_walkthrough_runs_whole_and_writes_every_figure(tmp_path):
    figs, scratch = tmp_path / "figures", tmp_path / "scratch"
    env = {k: v for k, v in os.environ.items() if not k.startswith("WALKTHROUGH_")}
    r = subprocess.run([sys.executable, "walkthrough.py", "--models", "tiny", "--figures", str(figs), "--scratch", str(scratch)],
                       cwd=ROOT, capture_output=True, text=True, timeout=300, env={**env, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "every assertion held" in r.stdout
    for name in FIGURES:
        assert (figs / name).stat().st_size > 10_000, f"{name} missing or empty"
    assert all((scratch / f"phase{k}.pt").exists() for k in range(3))  # the tiny run went where it was told
