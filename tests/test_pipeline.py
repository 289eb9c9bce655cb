"""A tiny end-to-end run of phases 0 -> 2 (seconds), its checkpoints reloaded and evaluated."""
import argparse
import json
import os

import numpy as np
import pytest
import torch

import checkpoint
import distill
import eval_retrieval

TINY = ["--teacher_layers", "2", "--teacher_heads", "2", "--teacher_embd", "32", "--teacher_window", "128",
        "--teacher_steps", "4", "--teacher_batch", "2", "--student_layers", "1", "--student_heads", "2",
        "--student_embd", "16", "--short_len", "48", "--growth", "2", "--steps", "3", "--batch", "4",
        "--eval_n", "1", "--key_digits", "3", "--vocab_size", "1200", "--warmup", "1", "--ckpt_every", "2",
        "--log_every", "1", "--device", "cpu"]  # pinned: the exactness tests (resume, torchrun) hold on a CPU


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_corpus_dir):
    out = str(tmp_path_factory.mktemp("run"))
    assert distill.main(["--phase", "2", "--out", out, "--data", tiny_corpus_dir, *TINY]) == 0
    return out


def test_phase2_trains_missing_prerequisites_and_writes_everything(run):
    for k in (0, 1, 2):
        assert os.path.exists(os.path.join(run, f"phase{k}.pt"))
        assert not os.path.exists(os.path.join(run, f"phase{k}.partial.pt"))
        log = [json.loads(line) for line in open(os.path.join(run, f"phase{k}.jsonl"))]
        assert [r["step"] for r in log] == list(range(1, len(log) + 1)) and all(r["loss"] > 0 for r in log)
        ev = json.load(open(os.path.join(run, f"phase{k}.eval.json")))
        assert ev["phase"] == k and len(ev["records"]) > 0
        # the preset's losses: phase 1 learns from the labels (no KD term), the extension distils
        assert (all(r["kd"] == 0 for r in log) if k < 2 else all(r["kd"] > 0 for r in log)), k


def test_phase1_trains_the_teacher_its_kd_extension_needs(tmp_path, tiny_corpus_dir):
    """The preset's CE phase 1 does not use the teacher, but the next phase distils: `--phase 1` trains it
    first, so the Quickstart's two commands split the pipeline's time; an all-CE run trains none."""
    out, ce = str(tmp_path / "run"), str(tmp_path / "ce")
    assert distill.main(["--phase", "1", "--out", out, "--data", tiny_corpus_dir, *TINY]) == 0
    assert sorted(f for f in os.listdir(out) if f.endswith(".pt")) == ["phase0.pt", "phase1.pt"]
    assert distill.main(["--phase", "1", "--loss", "ce", "--out", ce, "--data", tiny_corpus_dir, *TINY]) == 0
    assert sorted(f for f in os.listdir(ce) if f.endswith(".pt")) == ["phase1.pt"]


def test_checkpoints_reload_with_their_phase_settings(run):
    teacher, tv, t = checkpoint.load_model(os.path.join(run, "phase0.pt"))
    s1, v1, c1 = checkpoint.load_model(os.path.join(run, "phase1.pt"))
    s2, v2, c2 = checkpoint.load_model(os.path.join(run, "phase2.pt"))
    assert tv == v1 == v2
    assert (t["window"], c1["window"], c2["window"]) == (128, 48, 96)
    assert c1["lineage"].startswith("scratch") and c2["lineage"].endswith("phase1.pt")
    assert c2["model_config"]["rope"]["theta"] > c1["model_config"]["rope"]["theta"]  # phase-wise base grew
    # phase 2 started from phase 1's weights and moved away from them
    moved = [(a - b).abs().max().item() for a, b in zip(s1.state_dict().values(), s2.state_dict().values())]
    assert max(moved) > 0
    recs = eval_retrieval.passkey(s2, v2, [64], n=1, digits=3)
    assert len(recs) == 5 and all(isinstance(r["correct"], bool) for r in recs)


def test_finished_phase_is_not_retrained(run, tiny_corpus_dir, capsys):
    path = os.path.join(run, "phase1.pt")
    before = open(path, "rb").read()
    assert distill.main(["--phase", "1", "--out", run, "--data", tiny_corpus_dir, *TINY]) == 0
    assert "already finished" in capsys.readouterr().out
    assert open(path, "rb").read() == before


def test_eval_cli_compares_checkpoints(run, tmp_path, capsys):
    js = str(tmp_path / "r.json")
    eval_retrieval.main([os.path.join(run, f"phase{k}.pt") for k in (0, 1, 2)] + ["--lengths", "64,128", "--n", "1", "--json", js])
    out = capsys.readouterr().out
    assert out.count("phase0.pt") >= 2 and "by key distance" in out
    assert len(json.load(open(js))["models"]) == 3


def test_step_shape_shrinks_rows_only_under_a_length_curriculum(tiny_corpus):
    import data
    teacher = data.DocSampler(tiny_corpus, 40, 512, curriculum=0.6)
    teacher.progress = 0.0
    assert distill.step_shape(teacher, 512, 8) == (64, 64)  # short documents: short rows, same tokens
    teacher.progress = 1.0
    assert distill.step_shape(teacher, 512, 8) == (512, 8)
    student = data.DocSampler(tiny_corpus, 16, 64)  # short documents packed into the long window
    assert distill.step_shape(student, 256, 8) == (256, 8)


def test_teacher_packing_switches_the_teachers_attention(tmp_path, tiny_corpus_dir, capsys):
    """--teacher_packing cross_doc trains the teacher across packed documents: same data, other losses."""
    losses = {}
    for packing in ("doc_mask", "cross_doc"):
        out = str(tmp_path / packing)
        assert distill.main(["--phase", "0", "--out", out, "--data", tiny_corpus_dir, *TINY,
                             "--teacher_packing", packing]) == 0
        losses[packing] = [json.loads(line)["loss"] for line in open(os.path.join(out, "phase0.jsonl"))]
    printed = capsys.readouterr().out
    assert "(doc_mask, reset)" in printed and "(cross_doc, continuous)" in printed
    assert losses["doc_mask"][0] != losses["cross_doc"][0]


def test_pose_off_draws_todays_packed_batch_bit_for_bit(tiny_corpus):
    """Without --positions pose a step's batch is the packer's rows and positions, and no extra random draw."""
    import data
    args = distill.parse_args(["--phase", "2", *TINY])
    s = argparse.Namespace(pose=False, positions="continuous", window=96, batch=2, max_doc=48,
                           vocab=data.Vocab.compact(tiny_corpus, 3, 1200), rng=np.random.default_rng(5))
    s.sampler, _ = distill.sampler_for(args, tiny_corpus, 2)
    got = distill.draw_batch(args, s)
    rng = np.random.default_rng(5)
    want = data.make_batch([data.pack(s.sampler, rng, 96, 48) for _ in range(2)], s.vocab)
    for k in want:
        assert torch.equal(got[k], want[k]), k
    assert torch.equal(got["pos"], torch.arange(96).expand(2, 96))
    assert s.rng.bit_generator.state == rng.bit_generator.state  # the stream goes on exactly as before


def test_pose_len_packs_several_documents_into_each_skipped_row(tiny_corpus):
    """--pose_len: rows longer than one document -- several packed documents, the same tokens per step --
    whose ids still increase and skip within the phase's window."""
    import data
    args = distill.parse_args(["--phase", "2", "--positions", "pose", "--pose_len", "96", *TINY, "--growth", "8"])
    s = argparse.Namespace(pose=True, positions="continuous", window=384, batch=2, max_doc=48,
                           vocab=data.Vocab.compact(tiny_corpus, 3, 1200), rng=np.random.default_rng(5))
    s.sampler, _ = distill.sampler_for(args, tiny_corpus, 2)
    b = distill.draw_batch(args, s)
    assert b["idx"].shape == b["pos"].shape == (8, 96)  # 2 x 384 tokens -> 8 rows of 96
    assert (b["doc"][:, -1] >= 1).all()  # documents of <= 48 tokens: at least two in each row
    d = b["pos"].diff(dim=1)
    assert b["pos"].max() < 384 and (d >= 1).all() and (d > 1).any()
    args = distill.parse_args(["--phase", "2", "--positions", "pose", "--pose_len", "48,96", *TINY, "--growth", "8"])
    assert {distill.draw_batch(args, s)["idx"].shape for _ in range(12)} == {(16, 48), (8, 96)}  # one length per step
    for bad, msg in (("32", "must be >= the short window 48"), ("48,x", "must be comma-separated integers"),
                     ("48,96", "48,96 leaves no room to skip in an extension window of \\[96\\]")):
        with pytest.raises(distill.UsageError, match=f"--pose_len {msg}"):
            distill.parse_args(["--phase", "2", "--positions", "pose", "--pose_len", bad, *TINY])


def test_pose_reach_lets_skipped_ids_pass_the_window(tiny_corpus):
    """--pose_reach: the same rows, ids below the reach instead of the window; less than the window is an error."""
    import data
    s = argparse.Namespace(pose=True, positions="continuous", window=384, batch=2, max_doc=48,
                           vocab=data.Vocab.compact(tiny_corpus, 3, 1200), rng=np.random.default_rng(5))
    top = {}
    for reach in ("384", "768"):
        args = distill.parse_args(["--phase", "2", "--positions", "pose", "--pose_reach", reach, *TINY, "--growth", "8"])
        s.sampler, _ = distill.sampler_for(args, tiny_corpus, 2)
        pos = torch.cat([distill.draw_batch(args, s)["pos"] for _ in range(4)])
        assert pos.shape[1] == 48 and (pos.diff(dim=1) >= 1).all()
        top[reach] = int(pos.max())
    assert top["384"] < 384 < top["768"] < 768
    with pytest.raises(distill.UsageError, match="--pose_reach must be at least the extension window 384, got 200"):
        distill.parse_args(["--phase", "2", "--positions", "pose", "--pose_reach", "200", *TINY, "--growth", "8"])


def test_pose_rows_are_short_and_the_teacher_sees_the_students_positions(run, tiny_corpus_dir, tmp_path, monkeypatch):
    """An extension phase with --positions pose: rows of the short window, the same tokens per step, ids that
    jump across the long window -- and the teacher's forward gets the very position ids the student's got."""
    import model
    seen, forward = [], model.GPT.forward
    def spy(self, idx, pos, *a, **k):
        seen.append((self.cfg.n_embd, tuple(idx.shape), pos.clone()))
        return forward(self, idx, pos, *a, **k)
    monkeypatch.setattr(model.GPT, "forward", spy)
    out = str(tmp_path / "pose")
    assert distill.main(["--phase", "2", "--out", out, "--data", tiny_corpus_dir, "--teacher", os.path.join(run, "phase0.pt"),
                         "--init", os.path.join(run, "phase1.pt"), "--positions", "pose", "--pose_chunks", "3", *TINY]) == 0
    train = [x for x in seen if x[1][1] == 48][:6]  # 3 steps x (student, teacher); the eval's prompts come after
    assert [x[0] for x in train] == [16, 32] * 3  # student (width 16), then teacher (width 32), each step
    for (_, shape_s, pos_s), (_, shape_t, pos_t) in zip(train[::2], train[1::2]):
        assert shape_s == shape_t == (4, 48) and torch.equal(pos_s, pos_t)  # 2 rows of 96 -> 4 rows of 48
        assert pos_s.max() < 96 and (pos_s.diff(dim=1) >= 1).all() and (pos_s.diff(dim=1) > 1).any()
