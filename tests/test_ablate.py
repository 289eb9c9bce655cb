"""The ablation command end to end on a tiny configuration, and the transfer-channel diagnostic."""
import json

import numpy as np
import pytest
import torch

import ablate
import data
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
    assert set(r["transfer_channel"]) == {"q1", "q2", "q3", "q4", "answers"}
    assert r["variants"]["kd"]["seeds"] == 2
    assert "| kd | 2 |" in capsys.readouterr().out  # one row per variant, over its 2 seeds
    assert ablate.main(["--report", "--results", str(results)]) == 0
    try:
        import matplotlib  # noqa: F401  (optional: the figure is only drawn when it is installed)
        assert (tmp_path / "ablation.png").stat().st_size > 0
    except ImportError:
        assert not (tmp_path / "ablation.png").exists()


def test_bad_variant_is_a_one_line_error(capsys):
    assert ablate.main(["--variants", "kd,nope"]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_channel_needs_an_existing_teacher(tmp_path, capsys):
    assert ablate.main(["--channel"]) == 2
    assert ablate.main(["--channel", "--teacher", str(tmp_path / "missing.pt"), "--results", str(tmp_path / "c.json")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 2 and not (tmp_path / "c.json").exists()


def test_transfer_channel_is_zero_under_document_masking_and_positive_across_documents(tiny_corpus):
    """A model that cannot see other documents (attention masked) has an empty channel by construction."""
    torch.manual_seed(0)
    vocab = data.Vocab.gpt2()
    teacher = GPT(GPTConfig(vocab_size=len(vocab), n_layer=1, n_head=2, n_embd=16)).eval()
    sampler = data.DocSampler(tiny_corpus, 8, 24)
    ch = ablate.transfer_channel(teacher, vocab, sampler, window=96, short=24, rows=2)
    quarters = ("q1", "q2", "q3", "q4")
    assert all(ch[q]["kl_full_doc"] > 0 for q in quarters)  # cross-document context changes the output

    class DocMasked(torch.nn.Module):  # the same model, but it always masks documents
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, idx, pos, doc=None):
            return self.m(idx, pos, torch.from_numpy(np.asarray(self.doc)))

    rng = np.random.default_rng(0)
    b = data.make_batch([data.pack(sampler, rng, 96) for _ in range(2)], vocab)
    wrapped = DocMasked(teacher)
    wrapped.doc = b["doc"]
    ch = ablate.transfer_channel(wrapped, vocab, sampler, window=96, short=24, rows=2)
    assert all(abs(ch[q]["kl_full_doc"]) < 1e-5 and ch[q]["top1_changed"] == 0 for q in quarters)


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
