"""Crash safety, resume, safe loading, clear errors on bad input, and data-parallel training."""
import hashlib
import json
import os
import pickle
import signal
import subprocess
import sys
import time

import pytest
import torch

import checkpoint
import distill
from test_pipeline import TINY

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = sys.executable


def losses(out, phase):
    return [json.loads(line)["loss"] for line in open(os.path.join(out, f"phase{phase}.jsonl"))]


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory, tiny_corpus_dir):
    """A finished tiny teacher + phase 1, shared by the tests below (copied before being modified)."""
    out = str(tmp_path_factory.mktemp("base"))
    for phase in ("0", "1"):  # phase 1 learns by CE (the preset's default) and would train no teacher
        assert distill.main(["--phase", phase, "--out", out, "--data", tiny_corpus_dir, *TINY]) == 0
    return out


ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}  # same float reduction order in every process


def cli(*args, cwd=ROOT, timeout=300):
    return subprocess.run([PY, "distill.py", *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=ONE_THREAD)


def test_sigkill_then_resume_reproduces_the_uninterrupted_losses(teacher_run, tiny_corpus_dir, tmp_path):
    common = ["--phase", "2", "--data", tiny_corpus_dir, *TINY, "--steps", "60", "--ckpt_every", "7",
              "--teacher", os.path.join(teacher_run, "phase0.pt"), "--init", os.path.join(teacher_run, "phase1.pt")]
    ref_out, out = str(tmp_path / "ref"), str(tmp_path / "killed")
    assert cli("--out", ref_out, *common).returncode == 0
    reference = losses(ref_out, 2)
    partial = os.path.join(out, "phase2.partial.pt")
    kills = 0
    for attempt in range(3):  # kill it (possibly several times, wherever it is), then resume
        proc = subprocess.Popen([PY, "distill.py", "--out", out, *common, "--resume"], cwd=ROOT, env=ONE_THREAD,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 60
        while time.time() < deadline and proc.poll() is None:
            if os.path.exists(partial) and checkpoint.load(partial)["step"] >= 7 * (attempt + 1):
                break
            time.sleep(0.05)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait()
        if os.path.exists(partial):
            ck = checkpoint.load(partial)  # whatever moment the kill hit, the file on disk loads
            assert ck["step"] % 7 == 0 and "optimizer" in ck
    assert kills >= 1
    before = checkpoint.load(partial)["train_time_s"]  # what the killed attempts trained, kept in the partial file
    assert cli("--out", out, *common, "--resume").returncode == 0
    assert losses(out, 2) == reference  # bit-identical loss curve (CPU, same seed)
    assert not os.path.exists(partial)
    # the training time adds up over the killed attempts: theirs (from the partial file) plus the last one's
    done = checkpoint.load(os.path.join(out, "phase2.pt"))
    last = json.loads(open(os.path.join(out, "phase2.jsonl")).readlines()[-1])["time_s"]
    assert before > 0 and done["train_time_complete"] and done["train_time_s"] >= before + last - 0.2


def test_malicious_pickle_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    bad = tmp_path / "evil.pt"
    with open(bad, "wb") as fh:
        pickle.dump({"format": 1, "model": Evil()}, fh)
    with pytest.raises(checkpoint.CheckpointError, match="refuses"):
        checkpoint.load(str(bad))
    torch.save({"format": 1, "model": {}, "x": Evil()}, tmp_path / "evil2.pt")
    with pytest.raises(checkpoint.CheckpointError):
        checkpoint.load(str(tmp_path / "evil2.pt"))
    assert not marker.exists()


def test_atomic_save_leaves_old_file_on_failure(tmp_path):
    path = str(tmp_path / "c.pt")
    checkpoint.save(path, {"model": {"w": torch.ones(2)}})
    before = open(path, "rb").read()

    class Unsaveable:
        pass
    with pytest.raises(Exception):
        checkpoint.save(path, {"model": {"w": Unsaveable()}, "bad": lambda: 0})
    assert open(path, "rb").read() == before
    assert sorted(os.listdir(tmp_path)) == ["c.pt"]  # no temporary file left behind


def bad_cases(base, corpus, tmp):
    """(name, argv) pairs that must each fail with one line, exit code 2, nothing written."""
    empty = os.path.join(tmp, "empty")
    os.makedirs(empty, exist_ok=True)
    garbage = os.path.join(tmp, "garbage.pt")
    open(garbage, "wb").write(b"not a checkpoint at all")
    evil = os.path.join(tmp, "evil.pt")
    open(evil, "wb").write(pickle.dumps({"format": 1, "model": {}, "x": print}))  # a global: refused by weights_only
    t0, p1 = os.path.join(base, "phase0.pt"), os.path.join(base, "phase1.pt")
    std = ["--out", base, "--data", corpus, *TINY]
    return [
        ("negative phase", ["--phase", "-1", *std]),
        ("phase not a number", ["--phase", "two", *std]),
        ("unknown flag", ["--phase", "2", "--bogus", *std]),
        ("zero steps", ["--phase", "2", *std, "--steps", "0"]),
        ("negative lr", ["--phase", "2", *std, "--lr", "-1"]),
        ("nan lr", ["--phase", "2", *std, "--lr", "nan"]),
        ("mix out of range", ["--phase", "2", *std, "--loss", "mix", "--mix", "1.5"]),
        ("unknown rope", ["--phase", "2", *std, "--rope", "spiral"]),
        ("missing data folder", ["--phase", "2", *std, "--data", os.path.join(tmp, "nope")]),
        ("empty data folder", ["--phase", "2", *std, "--data", empty]),
        ("missing teacher", ["--phase", "2", *std, "--teacher", os.path.join(tmp, "none.pt")]),
        ("garbage teacher", ["--phase", "2", *std, "--teacher", garbage]),
        ("pickled code as teacher", ["--phase", "2", *std, "--teacher", evil]),
        ("student as teacher", ["--phase", "2", *std, "--teacher", p1]),
        ("teacher as init (cloning)", ["--phase", "2", *std, "--init", t0]),
        ("init of another size", ["--phase", "2", *std, "--student_embd", "32"]),
        ("heads do not divide width", ["--phase", "2", *std, "--student_heads", "3"]),
        ("short window cannot hold a passkey", ["--phase", "1", "--force", *std, "--short_len", "16"]),
        ("other short window than phase 1", ["--phase", "2", *std, "--short_len", "56"]),
        ("windows shrinking", ["--phase", "2", *std, "--windows", "48,40"]),
        ("too few windows", ["--phase", "3", *std, "--windows", "48,96"]),
        ("vocab cap too small", ["--phase", "0", "--force", *std, "--vocab_size", "20"]),
        ("key digits zero", ["--phase", "2", *std, "--key_digits", "0"]),
    ] + ([] if torch.cuda.is_available() else [("no CUDA here", ["--phase", "2", *std, "--device", "cuda"])])


def digest(folder):
    return {f: hashlib.sha256(open(os.path.join(folder, f), "rb").read()).hexdigest() for f in sorted(os.listdir(folder))}


def test_bad_inputs_fail_in_one_line_with_exit_2_and_touch_nothing(teacher_run, tiny_corpus_dir, tmp_path, capsys):
    cases = bad_cases(teacher_run, tiny_corpus_dir, str(tmp_path))
    assert len(cases) >= 15
    before = digest(teacher_run)
    for name, argv in cases:
        code = distill.main(argv)
        err = capsys.readouterr().err.strip()
        assert code == 2, f"{name}: exit {code}"
        assert len(err.splitlines()) == 1 and err.startswith("error: "), f"{name}: {err!r}"
        assert digest(teacher_run) == before, f"{name} changed the run folder"


def test_cli_bad_input_exit_code_and_single_line():
    r = cli("--phase", "1", "--lr", "0")
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "--lr" in r.stderr
    r = subprocess.run([PY, "eval_retrieval.py", "/nonexistent.pt"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.strip().startswith("error:") and r.stderr.strip().count("\n") == 0


def test_unfinished_run_is_not_silently_restarted(teacher_run, tiny_corpus_dir, tmp_path, capsys):
    out = str(tmp_path / "r")
    os.makedirs(out)
    checkpoint.save(os.path.join(out, "phase2.partial.pt"), {"model": {}, "step": 3})
    before = digest(out)
    code = distill.main(["--phase", "2", "--out", out, "--data", tiny_corpus_dir, *TINY,
                         "--teacher", os.path.join(teacher_run, "phase0.pt"), "--init", os.path.join(teacher_run, "phase1.pt")])
    assert code == 2 and "--resume" in capsys.readouterr().err and digest(out) == before


def test_torchrun_two_cpu_processes_match_one_process(teacher_run, tiny_corpus_dir, tmp_path):
    common = ["--phase", "2", "--data", tiny_corpus_dir, *TINY, "--steps", "4", "--device", "cpu",
              "--teacher", os.path.join(teacher_run, "phase0.pt"), "--init", os.path.join(teacher_run, "phase1.pt")]
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    assert distill.main(["--out", one, *common]) == 0
    env = ONE_THREAD
    r = subprocess.run([PY, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29517",
                        "distill.py", "--out", two, *common], cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    a, b = losses(one, 2), losses(two, 2)
    assert len(a) == len(b) == 4
    assert a == pytest.approx(b, rel=1e-4, abs=1e-5)
    assert sorted(os.listdir(two)) == sorted(os.listdir(one))  # rank 0 alone wrote checkpoints and logs


def test_bad_paths_are_rejected_before_anything_trains(tiny_corpus_dir, tmp_path, capsys):
    """A fresh folder (no teacher yet) and a truncated --init: the error comes before the teacher would train;
    an --out that names a file is one line too, and the file is untouched."""
    fresh = str(tmp_path / "fresh")
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(b"PK\x03\x04 cut short")
    std = ["--data", tiny_corpus_dir, *TINY]
    for argv, flag in ((["--phase", "2", "--out", fresh, *std, "--init", str(truncated)], "--init"),
                       (["--phase", "2", "--out", fresh, *std, "--teacher", str(tmp_path / "none.pt")], "--teacher"),
                       (["--phase", "1", "--out", fresh, *std, "--init", str(truncated)], "--init"),
                       (["--phase", "1", "--out", str(truncated), *std], "--out")):
        assert distill.main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"error: {flag}") and err.count("\n") == 0, err
        assert not os.path.exists(os.path.join(fresh, "phase0.pt"))
    assert truncated.read_bytes() == b"PK\x03\x04 cut short"


def test_a_ce_phase_trains_no_teacher_and_builds_the_teachers_vocabulary(teacher_run, tiny_corpus_dir, tmp_path, capsys):
    out = str(tmp_path / "ce")
    assert distill.main(["--phase", "1", "--loss", "ce", "--out", out, "--data", tiny_corpus_dir, *TINY]) == 0
    assert sorted(f for f in os.listdir(out) if f.endswith(".pt")) == ["phase1.pt"]  # no teacher, placeholder or real
    _, ce_vocab, _ = checkpoint.load_model(os.path.join(out, "phase1.pt"))
    _, teacher_vocab, _ = checkpoint.load_model(os.path.join(teacher_run, "phase0.pt"))
    assert ce_vocab == teacher_vocab
    capsys.readouterr()
    # KD from that teacher with another vocabulary (the full GPT-2 one) is refused in one line, before training
    code = distill.main(["--phase", "1", "--loss", "kd", "--force", "--out", out, "--data", tiny_corpus_dir, *TINY, "--vocab", "gpt2",
                         "--teacher", os.path.join(teacher_run, "phase0.pt")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "another vocabulary" in err and err.count("\n") == 0


def test_eval_names_the_flag_of_bad_lengths(teacher_run):
    r = subprocess.run([PY, "eval_retrieval.py", os.path.join(teacher_run, "phase0.pt"), "--lengths", "abc"],
                       cwd=ROOT, capture_output=True, text=True, env=ONE_THREAD)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "--lengths" in r.stderr


@pytest.mark.parametrize("argv,flag", [(["--lengths", "64,128", "--span", "100"], "--span 100"),
                                       (["--span", "600", "--greedy"], "--greedy")])
def test_eval_refuses_a_span_it_cannot_honour(teacher_run, capsys, argv, flag):
    import eval_retrieval
    with pytest.raises(SystemExit) as e:
        eval_retrieval.main([os.path.join(teacher_run, "phase0.pt"), *argv])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.count("\n") == 0 and flag in err


def test_more_bad_inputs_fail_in_one_line_before_any_work(teacher_run, tiny_corpus_dir, tmp_path, capsys):
    """An --out that cannot be created; an --init of another student shape, with no teacher trained yet (the error
    must not wait for it); ablate --seeds 0; an eval whose --png folder does not exist (before any prompt runs)."""
    fresh = str(tmp_path / "fresh")
    init = os.path.join(teacher_run, "phase1.pt")
    for argv, words in ((["--phase", "1", "--out", "/proc/no/such/dir", "--data", tiny_corpus_dir, *TINY], "--out"),
                        (["--phase", "2", "--out", fresh, "--data", tiny_corpus_dir, *TINY, "--init", init,
                          "--student_embd", "32"], "--init")):
        assert distill.main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"error: {words}") and err.count("\n") == 0, err
    assert not os.path.exists(fresh)  # refused before the missing teacher would have trained
    import ablate
    assert ablate.main(["--seeds", "0", "--out", str(tmp_path / "abl")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: --seeds must be >= 1, got 0" and not os.path.exists(tmp_path / "abl")
    r = subprocess.run([PY, "eval_retrieval.py", os.path.join(teacher_run, "phase0.pt"), "--png", "/nonexistent/dir/x.png"],
                       cwd=ROOT, capture_output=True, text=True, env=ONE_THREAD)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "--png" in r.stderr and "passkey" not in r.stdout
