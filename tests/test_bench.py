"""bench.py: the things its numbers rest on (no timings are checked)."""
import contextlib
import copy
import json

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import bench
import loss
from distill import PRESETS

STUDENT, TEACHER, V = (1, 2, 16), (2, 2, 24), 50


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models: a second thread only adds synchronisation (4x slower on a busy 2-core machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


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
                "--warmup", "0", "--steps", "10", "--mem_vocab", "64", "--mem_window", "32", "--mem_warmup", "0",
                "--matmul_n", "64", "--chunk", "8", "--json", str(out)])
    assert "transformers is not installed" in capsys.readouterr().out
    res = json.loads(out.read_text())
    assert {"speedup_vs_transformers", "memory_vs_naive", "matmul_fraction"} <= set(res)
    assert res["speedup_vs_transformers"] is None
    assert res["matmul_fraction"] > 0
    assert [r["variant"] for r in res["sweep"]] == ["ours", "naive"] * 2
    ours, naive = res["memory_point"]
    assert ours["first_loss"] == pytest.approx(naive["first_loss"], rel=1e-4, abs=1e-7)
    assert res["timed_steps"] == 10 and res["chunk"] == 8
    assert all(len(t) == 10 for w in res["step_times"].values() for t in w.values())
    assert all(set(w) == {"ours", "naive", "attention"} for w in res["step_times"].values())
    assert res["headline_windows"] == [8, 16] and res["speedup_long_windows"] is None  # no preset step in this sweep
    assert set(res["ratios"]) == {"ours/naive"}  # transformers absent: its ratios and the ceiling are not made up
    assert res["ratios"]["ours/naive"]["min"] <= res["ratios"]["ours/naive"]["median"] <= res["ratios"]["ours/naive"]["max"]
    assert res["load"]["cores"] >= 1 and len(res["load"]["before"]) == 3 and len(res["load"]["after"]) == 3


def test_interleaving_rotates_the_order_every_round():
    calls = []
    steps = {k: (lambda k=k: calls.append(k)) for k in ("ours", "naive", "transformers")}
    times, order = bench.interleave(steps, warmup=1, rounds=4)
    assert order == calls
    assert calls == ["ours", "naive", "transformers",  # warm-up round
                     "naive", "transformers", "ours",
                     "transformers", "ours", "naive",
                     "ours", "naive", "transformers",
                     "naive", "transformers", "ours"]
    assert {k: len(v) for k, v in times.items()} == {"ours": 4, "naive": 4, "transformers": 4}
    assert all(a != b for a, b in zip(calls, calls[1:]))  # never the same variant twice in a row


def test_ratios_and_their_spread_from_fixed_timings():
    times = {"ours": [1.0, 2.0, 1.0], "naive": [2.0, 3.0, 4.0], "transformers": [3.0, 6.0, 2.0]}
    r = bench.ratio_table(times)
    assert r["ours/naive"] == {"median": 2.0, "min": 1.5, "max": 4.0}  # per round 2, 1.5, 4
    assert r["naive/transformers"] == {"median": 1.5, "min": 0.5, "max": 2.0}  # 1.5, 2, 0.5
    assert r["ours/transformers"] == {"median": 3.0, "min": 2.0, "max": 3.0}  # 3, 3, 2
    other = {"ours": [1.0], "naive": [8.0]}  # a second window: ours/naive 8
    overall = bench.overall_ratios({512: times, 1024: other})
    assert overall["ours/naive"] == {"median": pytest.approx(4.0), "min": 1.5, "max": 8.0}  # geomean of 2 and 8
    assert overall["ours/transformers"]["median"] == pytest.approx(3.0)  # only the window that has both
    assert bench.spread([3.0, 1.0, 2.0]) == {"median": 2.0, "min": 1.0, "max": 3.0}


@pytest.mark.parametrize("bad", [["--steps", "0"], ["--chunk", "0"], ["--warmup", "-1"], ["--variants", "ours,x"]])
def test_bad_arguments_are_one_line_errors(bad, capsys):
    with pytest.raises(SystemExit) as e:
        bench.parse_args(bad)
    assert e.value.code == 2 and "error:" in capsys.readouterr().err


def test_busy_warning_counts_only_other_work():
    assert bench.busy_warning([0.9, 0, 0], cores=2) is None
    assert "load average 1.50 on 2 cores" in bench.busy_warning([1.5, 0, 0], cores=2)
    assert bench.busy_warning([2.9, 0, 0], cores=2, own_threads=2) is None  # 0.9 is others'
    assert bench.busy_warning([3.5, 0, 0], cores=2, own_threads=2) is not None
    assert bench.busy_warning(None, cores=2) is None


def test_default_chunk_is_the_presets_and_memory_steps_start_without_buffers(monkeypatch):
    assert bench.parse_args([]).chunk == PRESETS["cpu"]["chunk"] == bench.parse_args(["--quick"]).chunk
    assert bench.parse_args(["--quick"]).steps >= 10
    chunks, buffers_at_start = [], []
    real_step, real_start = bench.train_step, bench.mem_start
    monkeypatch.setattr(bench, "train_step", lambda *a: (chunks.append(a[-1]), real_step(*a))[1])
    monkeypatch.setattr(bench, "mem_start", lambda d: (buffers_at_start.append(len(loss._buffers)), real_start(d))[1])
    args = bench.parse_args(["--quick"])
    rows = bench.measure_memory(["ours", "naive"], STUDENT, TEACHER, V, 32, 1, "cpu", "float32", args.chunk, 1e9)
    assert chunks == [PRESETS["cpu"]["chunk"]] * 4  # warm-up and measured step of both variants
    assert buffers_at_start == [0, 0]  # the loss's reusable buffers are allocated inside the measured step
    assert [r["variant"] for r in rows] == ["ours", "naive"] and rows[0]["peak_mib"] is not None


def test_options_steps_run_and_restore_buffer_reuse(monkeypatch):
    monkeypatch.setattr(torch, "compile", lambda m: m)  # the compiled variant's wiring, not inductor itself
    args = bench.parse_args(["--student", "1,2,8", "--teacher", "1,2,16", "--vocab", "32", "--windows", "8",
                             "--tokens", "16", "--chunk", "8"])
    idx, pos = bench.make_batch(8, 2, 32, "cpu")
    steps = bench.option_steps(args, idx, pos)
    assert list(steps) == list(bench.OPTIONS)
    seen = []
    monkeypatch.setattr(bench, "train_step", lambda *a: seen.append(loss.reuse_buffers))
    for k in steps:
        steps[k]()
    assert seen == [k != "fresh buffers" for k in bench.OPTIONS] and loss.reuse_buffers


def test_the_default_sweep_starts_with_the_presets_own_steps():
    """The headline shapes are the ones distill.py trains at: its phase 1 and 2 windows and rows per step."""
    import distill
    args = distill.parse_args(["--phase", "1"])
    own = [(distill.window_of(args, k), distill.rows_of(args, k)) for k in (1, 2)]
    assert bench.preset_steps("cpu") == own
    for k, (window, rows) in zip((1, 2), own):  # rows x window = the phase's batch at the short window
        assert window * rows == distill.per_phase(PRESETS["cpu"]["batch"], k) * PRESETS["cpu"]["short_len"]
    for argv in ([], ["--quick"]):
        a = bench.parse_args(argv)
        assert list(zip(a.windows, a.rows))[:2] == own and len(a.windows) > 2 and bench.own_windows(a) == {64: 1, 512: 2}
    a = bench.parse_args(["--windows", "64,512", "--rows", "32"])
    assert a.rows == [32, 32] and bench.own_windows(a) == {64: 1}  # 512 x 32 is not a step of the preset
    assert bench.own_windows(bench.parse_args(["--student", "2,4,128"])) == {}  # not the preset's models


@pytest.mark.parametrize("bad", [["--rows", "1,2", "--windows", "8,16,32"], ["--rows", "2", "--tokens", "16"],
                                 ["--rows", "0"], ["--windows", "0"]])
def test_bad_rows_are_one_line_errors(bad, capsys):
    with pytest.raises(SystemExit) as e:
        bench.parse_args(bad)
    assert e.value.code == 2 and "error:" in capsys.readouterr().err


def test_headlines_split_the_presets_steps_from_the_longer_windows():
    times = {64: {"ours": [1.0, 1.0], "transformers": [2.0, 2.0], "attention": [0.1, 0.1]},
             256: {"ours": [1.0, 1.0], "transformers": [8.0, 8.0], "attention": [0.1, 0.1]},
             4096: {"ours": [2.0, 2.0], "transformers": [3.0, 3.0], "attention": [1.5, 1.5]}}
    sweep = [{"variant": "ours", "window": 64, "step_s": 1.0, "achieved_gflops": 30.0},
             {"variant": "ours", "window": 256, "step_s": 3.0, "achieved_gflops": 50.0},
             {"variant": "ours", "window": 4096, "step_s": 2.0, "achieved_gflops": 99.0}]
    head, ratios, long, windows = bench.headlines(sweep, [], times, {64: 1, 256: 2}, 8192, peak=100e9)
    assert windows == [64, 256]
    assert head["speedup_vs_transformers"] == pytest.approx(4.0)  # geometric mean of 2 and 8; 4096 left out
    assert head["speedup_long_windows"] == pytest.approx(1.5) and long["ceiling"]["median"] == pytest.approx(2.0)
    assert head["matmul_fraction"] == pytest.approx((30 * 1 + 50 * 3) / 4 / 100)  # FLOPs over time, back to back
    assert ratios["ceiling"]["median"] == pytest.approx(40.0)  # geometric mean of 20 and 80
    assert head["memory_vs_naive"] is None
    head, _, long, windows = bench.headlines(sweep, [], times, {}, 8192, peak=100e9)  # no preset step: all windows
    assert windows == [64, 256, 4096] and long == {} and head["speedup_long_windows"] is None
    assert head["speedup_vs_transformers"] == pytest.approx((2 * 8 * 1.5) ** (1 / 3))


def test_attention_step_makes_the_attention_calls_of_one_step(monkeypatch):
    calls, real = [], torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, **kw):
        calls.append((tuple(q.shape), q.requires_grad and torch.is_grad_enabled(), kw))
        return real(q, k, v, **kw)
    monkeypatch.setattr(bench.F, "scaled_dot_product_attention", spy)
    run = bench.attention_step((2, 2, 16), (3, 4, 32), 5, 12, "cpu", "float32")
    run()
    assert calls == [((5, 2, 12, 8), True, {"is_causal": True})] * 2 + [((5, 4, 12, 8), False, {"is_causal": True})] * 3
    # and the model's own attention makes the same calls: one per layer, causal, the same shapes
    calls.clear()
    student, _ = models()
    idx, pos = bench.make_batch(12, 5, V, "cpu")
    student(idx, pos, hidden_only=True)
    assert calls == [((5, STUDENT[1], 12, STUDENT[2] // STUDENT[1]), True, {"is_causal": True})] * STUDENT[0]
