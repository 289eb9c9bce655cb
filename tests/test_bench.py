"""bench.py: the things its numbers rest on (no timings are checked)."""
import contextlib
import copy
import json

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import bench

STUDENT, TEACHER, V = (1, 2, 16), (2, 2, 24), 50


def models():
    student, teacher, _ = bench.build("ours", STUDENT, TEACHER, V, 64, "cpu")
    return student, teacher


def batch(B=2, T=19):  # 38 rows: chunk 8 does not divide it
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, V, (B, T), generator=g), torch.arange(T).expand(B, T)


def test_our_step_equals_the_naive_step():
    """Same loss and the same parameter update (gradients, clipping, AdamW) from identical models."""
    student, teacher = models()
    with torch.no_grad():  # a confident teacher: far from the student's near-uniform start
        teacher.wte.weight.mul_(20)
    twin = copy.deepcopy(student)
    idx, pos = batch()
    losses = []
    for s in (student, twin):
        opt = s.configure_optimizer(1e-2, 0.1)
        kind = "ours" if s is student else "naive"
        losses.append(bench.train_step(kind, s, teacher, opt, idx, pos, contextlib.nullcontext(), chunk=8))
    assert losses[0].item() == pytest.approx(losses[1].item(), rel=1e-5)
    assert losses[0].item() > 0.1
    for (name, a), b in zip(student.named_parameters(), twin.parameters()):
        assert torch.allclose(a.grad, b.grad, rtol=1e-4, atol=1e-7), name  # the (clipped) gradients
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6), name  # and the weights after AdamW


def test_naive_kd_is_forward_kl_and_zero_for_equal_logits():
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(2, 5, V, generator=g), torch.randn(2, 5, V, generator=g)
    p_t = t.softmax(-1)
    kl = (p_t * (t.log_softmax(-1) - s.log_softmax(-1))).sum(-1).mean()
    assert bench.naive_kd(s, t).item() == pytest.approx(kl.item(), rel=1e-5)
    assert bench.naive_kd(t, t).item() == 0.0


def test_flops_formula_equals_a_hand_count():
    # L=1, C=4, V=10, T=8 forward, per token: qkv 2*4*12=96, attention proj 2*4*4=32, MLP 2*(2*4*16)=256,
    # head 2*4*10=80 -> 464; QK^T and AV over T/2=4 keys: 2 * (2*4*4) = 64  -> 528.
    assert bench.forward_flops_per_token(1, 4, 10, 8) == 528
    # step: student fwd+bwd (3x) + teacher fwd (the same shape here)
    assert bench.step_flops_per_token((1, 2, 4), (1, 2, 4), 10, 8) == 4 * 528
    # SwiGLU of matched size: C=6 -> intermediate 16, 3*6*16 = 288 = 8*C^2 weights: the same FLOPs.
    # C=6 by hand: qkv 216 + proj 72 + MLP 576 + head 120 = 984, attention 2*(2*6*4) = 96 -> 1080
    assert bench.llama_intermediate(6) == 16
    assert bench.step_flops_per_token((1, 2, 6), (1, 2, 6), 10, 8, inter=bench.llama_intermediate) == 4 * 1080


def test_flops_formula_matches_torch_flop_counter():
    """torch's counter on a real forward (full logits, math attention, which computes all T*T scores:
    twice the causal count of the formula)."""
    B, T = 2, 16
    student, _ = models()
    L, _, C = STUDENT
    idx, pos = batch(B, T)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
        student(idx, pos)
    assert fc.get_total_flops() == B * T * (bench.forward_flops_per_token(L, C, V, T) + 2 * L * C * T)


def test_llama_shapes_match_ours():
    pytest.importorskip("transformers")
    for shape in (STUDENT, (2, 4, 64), (12, 12, 768)):
        L, H, C = shape
        ours = bench.gpt(shape, V)
        theirs = bench.llama(shape, V, 64)
        n_ours = sum(p.numel() for n, p in ours.named_parameters() if "wte" not in n)
        n_theirs = sum(p.numel() for n, p in theirs.named_parameters() if "embed" not in n and "lm_head" not in n)
        assert abs(n_theirs - n_ours) / n_ours < 0.01
        assert theirs.config.tie_word_embeddings and theirs.config.num_attention_heads == H


def test_json_has_the_headline_keys(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(bench, "load_transformers", lambda: None)  # as if transformers were absent
    out = tmp_path / "bench.json"
    bench.main(["--student", "1,2,8", "--teacher", "1,2,16", "--vocab", "32", "--windows", "8,16", "--tokens", "16",
                "--warmup", "0", "--steps", "1", "--mem_vocab", "64", "--mem_window", "32", "--mem_warmup", "0",
                "--matmul_n", "64", "--chunk", "8", "--json", str(out)])
    assert "transformers is not installed" in capsys.readouterr().out
    res = json.loads(out.read_text())
    assert {"speedup_vs_transformers", "memory_vs_naive", "matmul_fraction"} <= set(res)
    assert res["speedup_vs_transformers"] is None
    assert res["matmul_fraction"] > 0
    assert [r["variant"] for r in res["sweep"]] == ["ours", "naive"] * 2
    ours, naive = res["memory_point"]
    assert ours["first_loss"] == pytest.approx(naive["first_loss"], rel=1e-4, abs=1e-7)
