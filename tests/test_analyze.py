"""analyze.py: its metrics on constructed cases where the answer is known, and its command line."""
import json

import numpy as np
import pytest
import torch

import analyze
import checkpoint
import data
import rope
from model import GPT, GPTConfig

N_HEAD, N_EMBD = 2, 32  # head dim 16: 8 RoPE pairs


def tiny(vocab=97, theta=100.0, seed=0, n_layer=2, n_embd=N_EMBD):
    torch.manual_seed(seed)
    cfg = GPTConfig(vocab_size=vocab, n_layer=n_layer, n_head=N_HEAD, n_embd=n_embd, rope={"rule": "fixed", "theta": theta})
    model = GPT(cfg).eval()
    with torch.no_grad():  # sharper than GPT-2 init, so that attention and the output depend on position
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(8.0)
    return model


def repeated(vocab=97, period=12, T=60, B=2):
    g = torch.Generator().manual_seed(3)
    seq = torch.randint(1, vocab, (B, period), generator=g)
    return seq.repeat(1, -(-T // period))[:, :T]


def pair_channels(lo, hi, hd=16):
    """Channels of a head that belong to pairs lo..hi-1 (half-split layout)."""
    return [*range(lo, hi), *range(lo + hd // 2, hi + hd // 2)]


# ---- pairs and bands -------------------------------------------------------------------

def test_band_split_and_reassembly_is_the_identity():
    x = torch.randn(2, 3, 5, 16)
    p = analyze.split_pairs(x)
    assert p.shape == (2, 3, 5, 8, 2)
    assert torch.equal(analyze.merge_pairs(p), x)
    assert torch.equal(analyze.split_pairs(analyze.merge_pairs(p)), p)
    assert torch.equal(p[..., 3, 0], x[..., 3]) and torch.equal(p[..., 3, 1], x[..., 11])  # pair i = (i, i + d/2)


def test_bands_cover_every_pair_once_fast_first():
    for n_pairs, n_bands in [(8, 4), (16, 4), (8, 3), (4, 8)]:
        b = analyze.bands(n_pairs, n_bands)
        assert b[0][0] == 0 and b[-1][1] == n_pairs
        assert all(hi > lo for lo, hi in b) and all(b[j][1] == b[j + 1][0] for j in range(len(b) - 1))


def test_head_pair_rows_are_the_documented_rows():
    W = torch.arange(32 * 5, dtype=torch.float32).view(32, 5)  # [C, C_in], 2 heads of 16
    rows = analyze.head_pair_rows(W, 2)
    assert rows.shape == (2, 8, 2, 5)
    for h in range(2):
        for i in range(8):
            assert torch.equal(rows[h, i, 0], W[h * 16 + i]) and torch.equal(rows[h, i, 1], W[h * 16 + i + 8])


# ---- positional perturbation -----------------------------------------------------------

@pytest.mark.parametrize("mode,target", [("shift", "q"), ("shift", "k"), ("shift", "qk"), ("noise", "qk")])
def test_zero_perturbation_changes_nothing_anywhere(mode, target):
    model, idx = tiny(), repeated()
    (r,) = analyze.perturbation_trace(model, idx, [0.0], mode=mode, target=target)
    for layer in r["layers"]:
        assert all(layer[k] == 0.0 for k in analyze.TRACE_KEYS) and layer["resid_by_quarter"] == [0.0] * 4
    assert r["kl"] == 0.0 and r["kl_by_quarter"] == [0.0] * 4


def test_a_real_perturbation_changes_every_layer_and_the_output():
    model, idx = tiny(), repeated()
    r1, r8 = analyze.perturbation_trace(model, idx, [1.0, 8.0], target="q")
    for r in (r1, r8):
        assert all(layer["resid"] > 1e-4 for layer in r["layers"]) and r["kl"] > 0
        assert r["layers"][0]["k"] == 0.0  # only the queries were moved; layer 0's keys cannot change
    noisy = analyze.perturbation_trace(model, idx, [0.5], mode="noise", target="k")[0]
    assert noisy["kl"] > 0 and noisy["layers"][0]["q"] == 0.0


def test_shifting_queries_and_keys_together_is_invisible():
    """RoPE scores depend on m - n only: moving every q and k by the same delta changes nothing."""
    model, idx = tiny(), repeated()
    (r,) = analyze.perturbation_trace(model, idx, [7.0], target="qk", start=0)
    assert all(layer["resid"] < 1e-4 for layer in r["layers"]) and abs(r["kl"]) < 1e-6
    # ... but a gap in the middle (qk shifted from position 30 on) is a real change
    (g,) = analyze.perturbation_trace(model, idx, [7.0], target="qk", start=30)
    assert g["layers"][-1]["resid"] > 1e-3 and g["kl"] > 0


def test_a_band_confined_perturbation_changes_only_that_band():
    model, idx = tiny(), repeated()
    T = idx.shape[1]
    lo, hi = analyze.bands(8, 4)[2]  # pairs 4-5
    off = analyze.angle_offset(model.inv_freq, T, 5.0, "shift", start=10, pairs=(lo, hi))
    assert (off != 0).any(dim=0).nonzero().flatten().tolist() == list(range(lo, hi))  # only the band's angles move ...
    assert not off[:10].any() and off[10:, lo:hi].all()  # ... from start on
    _, clean = analyze.traced(model, idx)
    _, pert = analyze.traced(model, idx, off, target="q")
    dq = (clean[0]["q"] != pert[0]["q"]).any(dim=(0, 1, 2)).nonzero().flatten().tolist()
    assert dq == pair_channels(lo, hi)  # layer-0 queries differ in that band's channels only ...
    assert torch.equal(clean[0]["q"][:, :, :10], pert[0]["q"][:, :, :10])  # ... and only from start on
    assert torch.equal(clean[0]["k"], pert[0]["k"])


def test_metric_values_on_known_cases():
    x = torch.randn(2, 5, 8)
    assert torch.allclose(analyze.rel_change(x, 3 * x), torch.full((2, 5), 2.0))
    assert torch.equal(analyze.rel_change(x, x), torch.zeros(2, 5))
    head = torch.eye(2)  # logits = hidden
    h0 = torch.zeros(1, 1, 2)  # p = (1/2, 1/2)
    h1 = torch.tensor([[[float(np.log(3.0)), 0.0]]])  # q = (3/4, 1/4)
    expected = 0.5 * np.log(0.5 / 0.75) + 0.5 * np.log(0.5 / 0.25)
    assert abs(float(analyze.kl_per_token(h0, h1, head)) - expected) < 1e-6
    means, quarters = analyze.span_means(torch.arange(8.0)[None], start=4, n_buckets=2)
    assert means == 5.5 and quarters == [4.5, 6.5]


# ---- query-state updates ---------------------------------------------------------------

def test_query_states_are_the_queries_before_rotation():
    model, idx = tiny(), repeated()
    pos = torch.arange(idx.shape[1]).expand(idx.shape)
    _, traces = analyze.traced(model, idx)
    for q_pre, t in zip(analyze.query_states(model, idx), traces):
        q = q_pre.view(*idx.shape, N_HEAD, -1).transpose(1, 2)
        assert torch.allclose(rope.apply_rotary(q, *model.rotations(pos)), t["q"], atol=1e-6)


def test_update_analysis_of_a_model_against_itself_is_zero():
    a, b, idx = tiny(), tiny(), repeated()
    for delta, base in analyze.update_analysis(a, b, idx).values():
        assert delta.shape == (2, N_HEAD, 8) and (delta == 0).all() and (base > 0).all()


def test_update_analysis_reports_exactly_the_edited_band():
    before, after, idx = tiny(), tiny(), repeated()
    band_list = analyze.bands(8, 4)
    lo, hi = band_list[1]
    C, hd = N_EMBD, 16
    with torch.no_grad():
        w = after.blocks[1].attn.qkv.weight
        for ch in pair_channels(lo, hi):
            w[1 * hd + ch] += 0.05 * torch.randn(C)  # W_q, layer 1, head 1, band 1
        lo0, hi0 = band_list[0]
        for ch in pair_channels(lo0, hi0):
            w[C + ch] *= 1.5  # W_k, layer 1, head 0, band 0
    sq = analyze.update_analysis(before, after, idx)
    expect = {"W_q": (1, 1, 1), "W_k": (1, 0, 0), "q": (1, 1, 1)}  # (layer, head, band) that moved
    for name, (delta, base) in sq.items():
        rel = analyze.relative(analyze.by_band(delta, band_list), analyze.by_band(base, band_list))
        moved = [tuple(int(i) for i in ix) for ix in zip(*np.nonzero(rel))]
        assert moved == [expect[name]], name
    assert abs(analyze.relative(*(analyze.by_band(x, band_list) for x in sq["W_k"]))[1, 0, 0] - 0.5) < 1e-6


# ---- command line ----------------------------------------------------------------------

def save_ckpt(path, model, vocab, phase, window):
    checkpoint.save(path, {"phase": phase, "model": model.state_dict(), "model_config": model.cfg.as_dict(),
                           "vocab": vocab.state(), "window": window, "short_len": 32, "key_digits": 3,
                           "lineage": "test", "args": {}})
    return str(path)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory, tiny_corpus):
    d = tmp_path_factory.mktemp("ck")
    vocab = data.Vocab([0] + sorted(set(np.unique(np.asarray(tiny_corpus.tokens)).tolist()) | {data.EOT}), unk=True)
    before = tiny(len(vocab), theta=30.0)
    after = tiny(len(vocab), theta=120.0)
    after.load_state_dict(before.state_dict())
    with torch.no_grad():
        after.blocks[0].attn.qkv.weight[:16] *= 1.1  # every W_q row of head 0, layer 0
    other = tiny(len(vocab), n_embd=64)
    return {"before": save_ckpt(d / "p1.pt", before, vocab, 1, 32), "after": save_ckpt(d / "p2.pt", after, vocab, 2, 64),
            "other": save_ckpt(d / "big.pt", other, vocab, 0, 64), "dir": d}


def test_cli_perturb_writes_tables_and_json(ckpts, tiny_corpus_dir, capsys):
    out = ckpts["dir"] / "perturb.json"
    rc = analyze.main(["perturb", ckpts["before"], ckpts["other"], "--period", "16", "--samples", "2",
                       "--deltas", "0,4", "--data", tiny_corpus_dir, "--json", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "summary" in text and "one copy (T=16)" in text
    res = json.load(open(out))
    assert res["settings"]["window"] == 64
    for m in res["models"].values():
        for part in ("packed", "control"):
            zero, four = m[part]
            assert zero["kl"] == 0 and all(x["resid"] == 0 for x in zero["layers"])
            assert four["kl"] > 0 and all(x["resid"] > 0 for x in four["layers"])


def test_cli_updates_reports_the_edited_head(ckpts, tiny_corpus_dir, capsys):
    out = ckpts["dir"] / "updates.json"
    rc = analyze.main(["updates", ckpts["before"], ckpts["after"], "--samples", "2", "--data", tiny_corpus_dir,
                       "--json", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "theta 30" in text and "theta 120" in text
    res = json.load(open(out))
    wq = np.array(res["layer_head_pair"]["W_q"])  # [L, H, P]
    assert np.allclose(wq[0, 0], 0.1) and (wq[0, 1] == 0).all() and (wq[1] == 0).all()
    assert (np.array(res["layer_head_pair"]["W_k"]) == 0).all()
    assert np.allclose(res["wavelength_after"][-1], 2 * np.pi * 120.0 ** (14 / 16))


@pytest.mark.parametrize("argv", [["updates", "NOPE.pt", "NOPE2.pt"], ["perturb", "NOPE.pt"], ["perturb", "--bogus"]])
def test_cli_bad_input_is_one_line_and_exit_2(argv, capsys):
    assert analyze.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1


def test_cli_updates_refuses_models_of_different_size(ckpts, tiny_corpus_dir, capsys):
    assert analyze.main(["updates", ckpts["before"], ckpts["other"], "--data", tiny_corpus_dir]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "differ in size" in err and err.count("\n") == 1


# ---- a perturbed span, read by distance; a control subtracted -----------------------------

def test_a_span_perturbation_is_confined_to_the_span_and_read_after_it():
    model, idx = tiny(), repeated()
    T = idx.shape[1]
    off = analyze.angle_offset(model.inv_freq, T, 5.0, "shift", start=10, stop=14)
    assert off[10:14].all() and not off[:10].any() and not off[14:].any()
    buckets = [(0, 8), (8, 16), (16, 32), (32, 64)]
    (r,) = analyze.perturbation_trace(model, idx, [5.0], target="k", start=10, span=4, buckets=buckets)
    # distances run from the span's last token (13): positions 14..59 are 1..46 back from it
    assert list(r["kl_by_distance"]) == ["0-8", "8-16", "16-32", "32-64"]
    assert all(v > 0 for v in r["kl_by_distance"].values())
    (z,) = analyze.perturbation_trace(model, idx, [0.0], target="k", start=10, span=4, buckets=buckets)
    assert all(v == 0 for v in z["kl_by_distance"].values())


def test_subtracting_a_control_leaves_what_only_the_extension_moved():
    before, after, control, idx = tiny(), tiny(), tiny(), repeated()
    band_list = analyze.bands(8, 4)
    lo, hi = band_list[3]
    with torch.no_grad():
        for m in (after, control):  # both move every W_q row of layer 0 by 10 % ...
            m.blocks[0].attn.qkv.weight[:N_EMBD] *= 1.1
        for ch in pair_channels(lo, hi):  # ... and the extension alone the slow band of head 0, layer 1
            after.blocks[1].attn.qkv.weight[ch] *= 1.5
    tab = analyze.update_tables(analyze.update_analysis(before, after, idx), band_list)
    ctl = analyze.update_tables(analyze.update_analysis(before, control, idx), band_list)
    ex = analyze.minus(tab, ctl)["layer_head_pair"]["W_q"]  # [L, H, P]
    assert np.allclose(tab["layer_head_pair"]["W_q"][0], 0.1)  # the change both share ...
    assert np.allclose(ex[0], 0) and np.allclose(ex[1, 1], 0)  # ... is gone beyond the control
    assert np.allclose(ex[1, 0, lo:hi], 0.5) and np.allclose(ex[1, 0, :lo], 0)


def test_cli_perturb_on_packed_documents_by_distance(ckpts, tiny_corpus_dir):
    out = ckpts["dir"] / "perturb_packed.json"
    rc = analyze.main(["perturb", ckpts["after"], "--input", "packed", "--start", "4", "--span", "8", "--target", "k",
                       "--samples", "2", "--deltas", "8", "--data", tiny_corpus_dir, "--json", str(out)])
    assert rc == 0
    (r,) = json.load(open(out))["models"].values()
    assert r["control"] is None and set(r["packed"][0]["kl_by_distance"]) == {"0-65"}  # short_len 64 = the window: one bucket
    assert analyze.main(["perturb", ckpts["after"], "--span", "64", "--data", tiny_corpus_dir]) == 2


def test_cli_updates_with_the_after_checkpoint_as_control_leaves_nothing(ckpts, tiny_corpus_dir):
    out = ckpts["dir"] / "updates_control.json"
    assert analyze.main(["updates", ckpts["before"], ckpts["after"], "--control", ckpts["after"], "--samples", "2",
                         "--data", tiny_corpus_dir, "--json", str(out)]) == 0
    res = json.load(open(out))
    assert res["control"] == ckpts["after"] and np.allclose(res["excess_layer_head_pair"]["W_q"], 0)
    assert np.array(res["layer_head_pair"]["W_q"]).max() > 0.09
