"""The ablation command end to end on a tiny configuration, and the transfer-channel diagnostic."""
import json

import numpy as np
import pytest
import torch

import ablate
from ablate import distill
import data
import eval_retrieval
from model import GPT, GPTConfig
from test_pipeline import TINY


def test_ablate_runs_variants_and_writes_summary(tmp_path, tiny_corpus_dir, capsys):
    flags = " ".join(["--data", tiny_corpus_dir, *TINY, "--short_len", "64", "--teacher_window", "128"])
    results = tmp_path / "ablation.json"
    code = ablate.main(["--out", str(tmp_path / "runs"), "--results", str(results), "--flags", flags,
                        "--window", "128", "--steps", "3", "--batch", "4", "--seeds", "2",
                        "--variants", "kd,ce", "--n", "1", "--jobs", "2"])
    assert code == 0
    r = json.loads(results.read_text())
    assert set(r["cells"]) == {"teacher", "phase1", "kd-s0", "kd-s1", "ce-s0", "ce-s1"}
    for key in ("kd_long_acc", "ce_long_acc", "phasewise_long_acc", "fixed_long_acc"):
        assert key in r["summary"] and (r["summary"][key] is None or 0 <= r["summary"][key] <= 1)
    for key in ("kd_mid_acc", "ce_mid_acc", "ref_mid_acc", "phase1_mid_acc"):  # key distance 1x-4x the short window
        assert key in r["summary"]
    assert r["summary"]["mid_distance_from"] == 64 and r["summary"]["mid_distance_to"] == 256
    assert r["setup"]["distance_buckets"][:3] == ["0-64", "64-128", "128-257"]  # doubling, up to 2x the window
    assert set(r["transfer_channel"]) == {"q1", "q2", "q3", "q4", "answers", "by_distance"}
    assert set(r["transfer_channel"]["by_distance"]["kl_full_last_k"]) == {"64"}  # the window 128 has one edge below it
    assert r["variants"]["kd"]["seeds"] == 2
    assert "| kd | 2 |" in capsys.readouterr().out  # one row per variant, over its 2 seeds
    assert ablate.main(["--report", "--results", str(results)]) == 0
    # tools/long_range.py: absolute key distances from every prompt's record; a kd-only configuration borrows ce
    import long_range
    kd_only = tmp_path / "kd_only.json"
    kd_only.write_text(json.dumps({**r, "cells": {k: v for k, v in r["cells"].items() if not k.startswith("ce-")}}))
    new_students = tmp_path / "new_students.json"  # other training flags: nobody's ce stands in for its own
    new_students.write_text(json.dumps({**json.loads(kd_only.read_text()), "setup": {**r["setup"], "flags": "--lr 1e-3"}}))
    longer = tmp_path / "longer.json"  # 3x the extension steps: a budget point borrows nothing either
    longer.write_text(json.dumps({**json.loads(kd_only.read_text()), "setup": {**r["setup"], "steps": 9}}))
    with_long = tmp_path / "with_long.json"  # a ce-long run: its students never see the packed data's design
    with_long.write_text(json.dumps({**r, "cells": {**r["cells"], "ce-long-s0": r["cells"]["ce-s0"]}}))
    design = tmp_path / "design.json"
    design.write_text(json.dumps({**json.loads(kd_only.read_text()), "setup": {**r["setup"], "flags": flags + " --snippets repeat"}}))
    assert long_range.main([f"base={results}", f"kd-only={kd_only}", f"new={new_students}", f"longer={longer}",
                            f"long={with_long}", f"design={design}", "--out", str(tmp_path / "lr.json"), "--png", ""]) == 0
    base, other, new, budget, _, designed = json.loads((tmp_path / "lr.json").read_text())["configurations"]
    assert new["borrowed"] == budget["borrowed"] == {} and new["ce_mid_acc"] is None and budget["ce_mid_acc"] is None
    assert designed["borrowed"] == {"ce-long": "long"} and designed["ce_mid_acc"] is None
    prompts = [ok for k in ("kd-s0", "kd-s1") for d, ok in r["cells"][k]["distance_correct"] if 64 <= d < 256]
    assert prompts and base["kd_mid_acc"] == pytest.approx(np.mean(prompts)) and base["seeds"] == 2
    assert other["borrowed"] == {"ce": "base"} and other["ce_mid_acc"] == base["ce_mid_acc"] and base["borrowed"] == {}
    # a third seed added later: --first_seed trains kd-s2 only, and long_range pools it with the first file's two
    third = tmp_path / "third.json"
    assert ablate.main(["--out", str(tmp_path / "runs"), "--results", str(third), "--flags", flags, "--window", "128",
                        "--steps", "3", "--batch", "4", "--seeds", "1", "--first_seed", "2", "--variants", "kd",
                        "--n", "1", "--png", ""]) == 0
    assert set(json.loads(third.read_text())["cells"]) == {"teacher", "phase1", "kd-s2"}
    assert long_range.main([f"pooled={results}+{third}", "--out", str(tmp_path / "lr3.json"), "--png", ""]) == 0
    assert json.loads((tmp_path / "lr3.json").read_text())["configurations"][0]["seeds"] == 3
    try:
        import matplotlib  # noqa: F401  (optional: the figure is only drawn when it is installed)
        assert (tmp_path / "ablation.png").stat().st_size > 0
    except ImportError:
        assert not (tmp_path / "ablation.png").exists()


def test_figure_draws_seeds_that_agree_exactly(tmp_path):
    """Three seeds with the same accuracy: their mean is one rounding step above their max, and the
    error bar must still draw."""
    pytest.importorskip("matplotlib")
    cell = {"by_distance": {"0-64": 0.7, "64-256": 0.9181818181818182}, "text_loss_by_quarter": [3.0, 3.1, 3.2, 3.3]}
    r = {"setup": {"distance_buckets": ["0-64", "64-256"], "window": 512}, "variants": {"kd": {}},
         "cells": {f"kd-s{s}": cell for s in range(3)}}
    ablate.plot(r, str(tmp_path / "f.png"))
    assert (tmp_path / "f.png").stat().st_size > 0


def test_bad_variant_is_a_one_line_error(capsys):
    assert ablate.main(["--variants", "kd,nope"]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_channel_needs_an_existing_teacher(tmp_path, capsys):
    assert ablate.main(["--channel"]) == 2
    assert ablate.main(["--channel", "--teacher", str(tmp_path / "missing.pt"), "--results", str(tmp_path / "c.json")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 2 and not (tmp_path / "c.json").exists()


def channel_by_hand(model, vocab, sampler, window, rows, seed=0):
    """KL(full window || current document) per quarter, the document side computed by running each
    document ALONE (its own tokens, its window positions, no mask): an independent reference for
    what document masking must give."""
    rng = np.random.default_rng(seed)  # the same windows as ablate.transfer_channel draws
    b = data.make_batch([data.pack(sampler, rng, window) for _ in range(rows)], vocab)
    pos = torch.arange(window).expand(rows, window)
    full = torch.log_softmax(model(b["idx"], pos), -1)
    alone = torch.empty_like(full)
    for r in range(rows):
        for d in b["doc"][r].unique():
            at = (b["doc"][r] == d).nonzero()[:, 0]
            alone[r, at] = torch.log_softmax(model(b["idx"][r, at][None], pos[r, at][None]), -1)[0]
    kl = (full.exp() * (full - alone)).sum(-1)
    quarters, valid = torch.arange(window) * 4 // window, b["targets"] >= 0
    return [float(kl[valid & (quarters == q)].mean()) for q in range(4)]


def test_transfer_channel_is_the_teacher_seeing_other_documents(tiny_corpus, monkeypatch):
    """The channel KL(full || doc) equals the teacher's shift when each document runs alone (so the
    'doc' side truly sees one document) and is > 0 (the 'full' side truly sees the others).  With the
    document mask broken (plain causal), the same comparison fails: the check can fail."""
    import model as model_module
    torch.manual_seed(0)
    vocab = data.Vocab.gpt2()
    teacher = GPT(GPTConfig(vocab_size=len(vocab), n_layer=1, n_head=2, n_embd=16)).eval()
    sampler = data.DocSampler(tiny_corpus, 8, 24)
    with torch.no_grad():
        [w.mul_(3) for w in teacher.parameters() if w.dim() > 1]  # sharper attention than at init: a clear signal
        want = channel_by_hand(teacher, vocab, sampler, window=96, rows=2)
    ch = ablate.transfer_channel(teacher, vocab, sampler, window=96, short=24, rows=2)
    got = [ch[q]["kl_full_doc"] for q in ("q1", "q2", "q3", "q4")]
    assert all(w > 1e-4 for w in want)  # other documents change the output
    assert got == pytest.approx(want, rel=1e-3, abs=1e-6)

    causal = lambda doc: torch.ones(doc.shape[1], doc.shape[1], dtype=torch.bool).tril()[None, None]  # noqa: E731
    monkeypatch.setattr(model_module, "doc_causal_mask", causal)  # a document mask that masks nothing
    broken = ablate.transfer_channel(teacher, vocab, sampler, window=96, short=24, rows=2)
    assert all(broken[q]["kl_full_doc"] < 1e-6 for q in ("q2", "q3", "q4"))
    assert broken["q2"]["kl_full_doc"] != pytest.approx(want[1], rel=1e-3, abs=1e-6)


def test_long_range_is_from_4x_the_short_window_to_the_extension_window():
    """Keys beyond the window trained on (length extrapolation) do not dilute the long-range metric."""
    args = type("A", (), {"short": 64, "window": 512})()
    recs = [{"distance": d, "correct": c} for d, c in [(100, 0), (255, 0), (256, 1), (511, 0), (512, 0), (900, 0)]]
    assert ablate.long_acc(recs, args) == 0.5
    assert ablate.long_acc(recs[:2], args) is None


def test_answer_targets_reads_own_and_earlier_keys():
    """Two passkey answers in one row: only the second has an earlier key; its masses are read exactly."""
    T, V = 12, 10
    targets, weights = torch.zeros(1, T, dtype=torch.long), torch.ones(1, T)
    weights[0, 3:5], targets[0, 3] = 10, 7   # first document's answer starts with key piece 7
    weights[0, 9:11], targets[0, 9] = 10, 4  # second document's answer: key piece 4
    p_full, p_doc = torch.full((1, T, V), 0.1), torch.full((1, T, V), 0.1)
    p_full[0, 9] = torch.tensor([0.05] * 4 + [0.35] + [0.05] * 2 + [0.25] + [0.05] * 2)
    p_doc[0, 9] = torch.tensor([0.06] * 4 + [0.46] + [0.06] * 2 + [0.0] + [0.06] * 2)
    out = ablate.answer_targets({"full": p_full.log(), "doc": p_doc.log()}, {"weights": weights, "targets": targets})
    assert out["n"] == 1
    assert out["own_key_full"] == pytest.approx(0.35) and out["other_keys_full"] == pytest.approx(0.25)
    assert out["own_key_doc"] == pytest.approx(0.46) and out["other_keys_doc"] == pytest.approx(0.0)


def test_smoke_runs_the_cpu_ablation_path(tmp_path, capsys):
    """--smoke: the cpu preset's real path (both teachers, phase 1, the variants, evaluation, summary) with tiny models."""
    results = tmp_path / "ablation.json"
    code = ablate.main(["--smoke", "--preset", "cpu", "--out", str(tmp_path / "runs"), "--results", str(results),
                        "--png", "", "--variants", "kd,ce,kd-fixed,kd-mismatch,ce-long,pose-kd,pose-ce,pose-rows-ce,pose-far-ce"])
    assert code == 0
    r = json.loads(results.read_text())
    assert set(r["cells"]) == {"teacher", "phase1", "kd-s0", "ce-s0", "kd-fixed-s0", "kd-mismatch-s0", "ce-long-s0",
                               "pose-kd-s0", "pose-ce-s0", "pose-rows-ce-s0", "pose-far-ce-s0"}
    assert (tmp_path / "runs" / "shared_docmask" / "phase0.pt").exists()  # kd-mismatch's own, document-masked teacher
    s = r["summary"]
    assert s["seeds"] == 1 and (s["long_distance_from"], s["long_distance_to"]) == (256, 512) and s["rope"] == "bound"
    for k in ("phase1_window_acc", "ref_long_acc", "kd_long_acc", "ce_long_acc", "bound_long_acc", "fixed_long_acc",
              "kd_mid_acc", "ce_mid_acc"):
        assert 0 <= s[k] <= 1, k
    assert r["variants"]["kd-fixed"]["rope"] == "fixed" and r["setup"]["window"] == 512
    theta = lambda p: torch.load(tmp_path / "runs" / p, weights_only=True)["model_config"]["rope"]["theta"]  # noqa: E731
    assert theta("kd-fixed-s0/phase2.pt") == theta("shared/phase1.pt") != theta("kd-s0/phase2.pt")  # fixed = phase 1's base
    out = capsys.readouterr().out
    assert "upper reference: CE on long documents (ce-long)" in out and "KD on short packed documents" in out
    assert "CE on short packed documents" in out
    # the roads summary of that file: both haystacks, the short-context price, and the cost of each road
    import roads
    assert roads.main([str(results), "--out", str(tmp_path / "roads.json")]) == 0
    s = {x["name"]: x for x in json.loads((tmp_path / "roads.json").read_text())["roads"]}
    assert list(s) == ["teacher", "phase1", "ce-long", "kd", "ce", "pose-kd", "pose-ce", "pose-rows-ce", "pose-far-ce"]
    for x in s.values():
        assert set(x["acc_by_distance"]) == set(x["text_acc_by_distance"]) == {"0-64", "64-128", "128-256", "256-512"}
        assert all(r[0] <= x["acc_by_distance"][k] <= r[1] for k, r in x["acc_range"].items() if r)
        assert x["short_text_loss"] > 0 and 0 <= x["short_passkey_acc"] <= 1
    assert s["kd"]["tokens"] == s["pose-kd"]["tokens"] == s["ce"]["tokens"] == 2 * 512  # smoke: 2 steps of one 512-token row
    # rows of 64 instead of 512: an eighth of the attention, the teacher's forward included; KD adds the teacher's
    assert s["pose-kd"]["attention_gflop_per_step"] * 8 == pytest.approx(s["kd"]["attention_gflop_per_step"])
    assert s["pose-ce"]["attention_gflop_per_step"] * 8 == pytest.approx(s["ce"]["attention_gflop_per_step"])
    assert s["kd"]["attention_gflop_per_step"] > s["ce"]["attention_gflop_per_step"]
    # rows of 64 or 128, one length per step: (8 * 64^2 + 4 * 128^2) / 2 = 3/16 of one 512-token row's
    assert s["pose-rows-ce"]["attention_gflop_per_step"] * 16 / 3 == pytest.approx(s["ce"]["attention_gflop_per_step"])
    assert "PoSE: rows of 64 or 128 in 2 chunks" in (tmp_path / "runs" / "pose-rows-ce-s0" / "train.log").read_text()
    # rows of 64 or 256: (8 * 64^2 + 2 * 256^2) / 2 = 5/16; their ids reach 512 + 3 * 64
    assert s["pose-far-ce"]["attention_gflop_per_step"] * 16 / 5 == pytest.approx(s["ce"]["attention_gflop_per_step"])
    assert "rows of 64 or 256 in 2 chunks, ids < 704" in (tmp_path / "runs" / "pose-far-ce-s0" / "train.log").read_text()
    # --alias: pose-ce cells run with the flags that make pose-far-ce join the summary under that name; without, refused
    r = json.loads(results.read_text())
    r["cells"] = {k: v for k, v in r["cells"].items() if k in ("teacher", "phase1", "pose-ce-s0")}
    r["variants"] = {k: r["variants"][k] for k in ("teacher", "phase1", "pose-ce")}
    for flags, code in (("--pose_len 64,256 --pose_reach 704", 0), ("--pose_len 64,128 --pose_reach 704", 2), ("", 2)):
        (tmp_path / "flagged.json").write_text(json.dumps({**r, "setup": {**r["setup"], "flags": flags}}))
        assert roads.main([str(results), "--alias", f"pose-far-ce={tmp_path / 'flagged.json'}", "--out",
                           str(tmp_path / "aliased.json")]) == code
    far = {x["name"]: x for x in json.loads((tmp_path / "aliased.json").read_text())["roads"]}["pose-far-ce"]
    assert far["seeds"] == 1 and far["acc_by_distance"] == s["pose-ce"]["acc_by_distance"]  # pose-ce-s0's cells, renamed
    assert roads.main([str(results), "--alias", f"no-such-road={tmp_path / 'flagged.json'}", "--out", str(tmp_path / "x.json")]) == 2
    err = capsys.readouterr().err
    assert "is not pose-far-ce's extension phase" in err and "expected ROAD=A.json" in err


def test_pose_rows_are_one_and_two_short_windows_at_any_preset():
    """The rows variants name their lengths through the short window, so a preset with another one keeps them valid."""
    assert ablate.variant_flags("pose-rows-ce", 512, 4096)[-2:] == ["--pose_len", "512,1024"]
    assert ablate.variant_flags("kd-control", 64, 512)[-2:] == ["--windows", "64,64"]
    assert ablate.variant_flags("pose-ce", 64, 512) == ablate.VARIANTS["pose-ce"]


def test_pose_far_is_the_flags_it_was_measured_with():
    """pose-far-ce = pose-ce with --pose_len 64,256 --pose_reach 704 at the default windows (the runs of record were
    made with those flags), and at any windows a document in a row of four spans exactly the whole window."""
    ext = lambda extra: vars(distill.parse_args(["--phase", "2", "--windows", "64,512", *extra]))  # noqa: E731
    assert ext(ablate.variant_flags("pose-far-ce", 64, 512)) == ext([*ablate.VARIANTS["pose-ce"], "--pose_len", "64,256",
                                                                      "--pose_reach", "704"])
    for short, window in ((64, 512), (128, 2048)):
        args = distill.parse_args(["--phase", "2", "--short_len", str(short), "--windows", f"{short},{window}",
                                   *ablate.variant_flags("pose-far-ce", short, window)])
        row = max(distill.pose_lens(args))
        assert row == 4 * short and short - 1 + args.pose_reach - row == window - 1


def test_a_run_cut_short_continues_on_the_next_invocation(tmp_path, monkeypatch):
    """An invocation killed mid-run leaves phase2.partial.pt; the next one resumes it rather than failing on it."""
    import checkpoint
    save, argv = checkpoint.save, ["--smoke", "--preset", "cpu", "--out", str(tmp_path / "runs"), "--png", "",
                                   "--results", str(tmp_path / "a.json"), "--variants", "kd", "--flags", "--ckpt_every 1"]

    def killed_after_first_partial(path, obj):
        save(path, obj)
        if path.endswith("phase2.partial.pt"):
            raise RuntimeError("killed")
    monkeypatch.setattr(checkpoint, "save", killed_after_first_partial)
    with pytest.raises(RuntimeError):
        ablate.main(argv)
    run = tmp_path / "runs" / "kd-s0"
    assert (run / "phase2.partial.pt").exists() and not (run / "phase2.pt").exists()
    monkeypatch.setattr(checkpoint, "save", save)
    assert ablate.main(argv) == 0
    assert (run / "phase2.pt").exists() and not (run / "phase2.partial.pt").exists()
    assert "resuming phase 2 at step 1" in (run / "train.log").read_text()


def test_other_keys_by_key_distance_counts_each_earlier_key_in_its_own_bucket():
    """Three passkey answers in one row: at the third, key A stands 100 tokens back and key B 20 tokens back.
    Their probabilities land in the 64-128 and 0-64 buckets; an answer's own key is never counted."""
    T, V = 130, 10
    targets = torch.full((1, T), 1)
    weights = torch.ones(1, T)
    for pos, key in ((10, 3), (90, 4), (110, 5)):  # first answer pieces: keys 3, 4, 5
        targets[0, pos], weights[0, pos] = key, 10.0
    probs = torch.full((1, T, V), 0.01)
    probs[0, 110, 3], probs[0, 110, 4], probs[0, 110, 5] = 0.2, 0.05, 0.6
    logp = {"full": probs.log(), "doc": probs.log()}
    out = ablate.answer_targets(logp, {"targets": targets, "weights": weights}, [(0, 64), (64, 128)])
    assert out["n"] == 2  # answers at 90 (one earlier key) and 110 (two)
    by = out["by_key_distance"]
    assert by["0-64"]["n"] == 1 and by["0-64"]["other_keys_full"] == pytest.approx(0.05)  # key 4, 20 back from 110
    # 64-128: key 3 is 80 back from 90 (p 0.01) and 100 back from 110 (p 0.2)
    assert by["64-128"]["n"] == 2 and by["64-128"]["other_keys_full"] == pytest.approx((0.01 + 0.2) / 2)


def test_needle_attention_is_uniform_when_queries_are_zero():
    """With every query zeroed, attention is uniform over the causal prefix: the answer query pays exactly
    (key pieces) / (positions it sees) to the needle; a trained-looking model stays within [0, 1]."""
    import long_range
    vocab = data.Vocab.gpt2()
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=len(vocab), n_layer=2, n_head=2, n_embd=16)).eval()
    pairs = long_range.needle_attention(model, vocab, [64, 128], n=1, digits=4)
    assert len(pairs) == 10 and all(0 <= a <= 1 for _, a in pairs)
    with torch.no_grad():
        for blk in model.blocks:
            blk.attn.qkv.weight[:16] = 0  # the query third of the projection
    prompts = [p for L in (64, 128) for p in eval_retrieval._prompts(L, eval_retrieval.DEPTHS, 1, 1234, 4)]
    for (d, a), (tokens, answer, needle, _) in zip(long_range.needle_attention(model, vocab, [64, 128], n=1, digits=4), prompts):
        assert d == answer - needle and a == pytest.approx((len(tokens) - answer) / answer, abs=1e-6)


@pytest.mark.parametrize("name", ["kd-control", "ce-control"])
def test_a_control_trains_as_long_at_phase_1s_own_window_and_base(name):
    """The controls of the mechanistic analyses: the extension phase's steps and loss, but no extension."""
    import distill
    args = ablate.parse_args([])
    flags, _ = ablate.extension_flags(args, name, 168.0)
    twin = ablate.extension_flags(args, name.replace("-control", ""), 168.0)[0]
    ctl, ext = (distill.parse_args(ablate.distill_args(args, 2) + f) for f in (flags, twin))
    p1 = distill.parse_args(ablate.distill_args(args, 1))
    assert distill.window_of(ctl, 2) == distill.window_of(p1, 1) == 64 and distill.window_of(ext, 2) == 512
    assert distill.model_config(ctl, 2, 100).rope == distill.model_config(p1, 1, 100).rope
    assert distill.model_config(ext, 2, 100).rope != distill.model_config(p1, 1, 100).rope
    assert (ctl.loss, ctl.steps, ctl.lr, ctl.batch) == (ext.loss, ext.steps, ext.lr, ext.batch)
