import math

import pytest
import torch

import rope


def rotate(x, pos, inv_freq, attn_factor=1.0):
    cos, sin = rope.cos_sin(pos, inv_freq, attn_factor)
    return rope.apply_rotary(x, cos[:, None], sin[:, None])


def test_score_depends_only_on_relative_position():
    torch.manual_seed(0)
    d = 16
    inv = rope.base_inv_freq(d, 500.0)
    q, k = torch.randn(1, 1, 1, d), torch.randn(1, 1, 1, d)
    def score(m, n):
        return (rotate(q, torch.tensor([[m]]), inv) * rotate(k, torch.tensor([[n]]), inv)).sum().item()
    for delta in (0, 3, 17, 100):
        ref = score(delta, 0)
        for shift in (1, 50, 977):
            assert score(shift + delta, shift) == pytest.approx(ref, rel=1e-4, abs=1e-4)
    assert abs(score(5, 0) - score(9, 0)) > 1e-3  # and it does depend on m - n


def test_half_split_equals_complex_multiplication():
    torch.manual_seed(1)
    d, T = 8, 11
    inv = rope.base_inv_freq(d, 10000.0)
    x = torch.randn(2, 3, T, d)
    pos = torch.arange(T).expand(2, T) * 7
    out = rotate(x, pos, inv)
    z = torch.complex(x[..., : d // 2].double(), x[..., d // 2:].double())
    angles = pos[:, None, :, None].double() * inv.double()
    ref = z * torch.polar(torch.ones_like(angles), angles)
    assert torch.allclose(out[..., : d // 2].double(), ref.real, atol=1e-4)
    assert torch.allclose(out[..., d // 2:].double(), ref.imag, atol=1e-4)


@pytest.mark.parametrize("rule", ["pi", "ntk", "yarn"])
def test_scaling_rules_at_scale_one_are_identity(rule):
    d, theta = 16, 300.0
    base = rope.base_inv_freq(d, theta)
    inv, factor = rope.frequencies({"rule": rule, "theta": theta, "scale": 1.0, "original_len": 64}, d)
    assert torch.allclose(inv, base) and factor == 1.0


def test_scaling_rules_stretch_the_slowest_pair_by_scale():
    d, theta, s = 16, 300.0, 4.0
    base = rope.base_inv_freq(d, theta)
    for rule in ("pi", "ntk"):
        inv, _ = rope.frequencies({"rule": rule, "theta": theta, "scale": s}, d)
        assert inv[-1].item() == pytest.approx(base[-1].item() / s, rel=1e-5)
    inv, _ = rope.frequencies({"rule": "ntk", "theta": theta, "scale": s}, d)
    assert inv[0].item() == pytest.approx(1.0)  # NTK keeps the fastest pair
    inv, factor = rope.yarn(d, theta, s, original_len=64, ramp="turns")
    assert factor == pytest.approx(0.1 * math.log(s) + 1)
    turns = 64 * base.double() / (2 * math.pi)
    assert torch.allclose(inv[turns >= 32], base[turns >= 32])  # fast pairs untouched
    assert torch.allclose(inv[turns <= 1], base[turns <= 1] / s)  # slow pairs interpolated


def test_yarn_default_ramps_over_pair_indices_like_the_reference():
    """Hand-computed: d=16, base 1e4, original 64, scale 4.  The pair turning 32 times over 64 tokens
    sits at index 16 ln(64 / (2 pi 32)) / (2 ln 1e4) = -0.99 -> floor -1 -> clamped to 0; the pair
    turning once at 16 ln(64 / (2 pi)) / (2 ln 1e4) = 2.02 -> ceil 3.  Ramp over pairs 0..3."""
    d, theta, s = 16, 1e4, 4.0
    base = rope.base_inv_freq(d, theta)
    keep = torch.tensor([1, 2 / 3, 1 / 3, 0, 0, 0, 0, 0])
    inv, factor = rope.yarn(d, theta, s, original_len=64)
    assert torch.allclose(inv, base * keep + base / s * (1 - keep), rtol=1e-6)
    assert factor == pytest.approx(0.1 * math.log(4) + 1)
    # the paper-equation ramp ("turns") is another curve: it differs by tens of percent on some pair
    turns, _ = rope.yarn(d, theta, s, original_len=64, ramp="turns")
    assert (turns / inv - 1).abs().max() > 0.3
    with pytest.raises(ValueError):
        rope.yarn(d, theta, s, original_len=64, ramp="nope")


@pytest.mark.parametrize("d,theta,scale,orig", [(16, 1e4, 4.0, 64), (64, 1e4, 8.0, 512), (128, 5e5, 16.0, 4096),
                                                 (16, 14.19, 8.0, 64)])
def test_yarn_matches_transformers(d, theta, scale, orig):
    """The reference implementation, when transformers is installed (it is optional)."""
    rope_utils = pytest.importorskip("transformers.modeling_rope_utils")
    from transformers import LlamaConfig
    cfg = LlamaConfig(hidden_size=d * 2, num_attention_heads=2, max_position_embeddings=int(orig * scale),
                      rope_theta=theta, rope_scaling={"rope_type": "yarn", "factor": scale,
                                                      "original_max_position_embeddings": orig})
    ref, ref_factor = rope_utils.ROPE_INIT_FUNCTIONS["yarn"](cfg, "cpu")
    inv, factor = rope.yarn(d, theta, scale, orig)
    assert torch.allclose(inv, ref.float(), rtol=1e-6, atol=0)
    assert factor == pytest.approx(ref_factor, rel=1e-6)


def test_yarn_needs_the_original_length():
    with pytest.raises(ValueError):
        rope.yarn(16, 100.0, 4.0, original_len=0)


@pytest.mark.parametrize("d,L", [(16, 64), (16, 256), (32, 1024), (64, 8192)])
def test_phasewise_rule_slowest_pair_turns_once_over_the_window(d, L):
    theta = rope.phasewise_theta(d, L)
    inv = rope.base_inv_freq(d, theta)
    assert rope.wavelengths(inv)[-1].item() == pytest.approx(L, rel=1e-5)
    # a longer window gets a larger base (phase-wise scaling grows theta)
    assert rope.phasewise_theta(d, 4 * L) > theta
    assert rope.phasewise_theta(d, L, turns=0.25) > theta


def test_schedule_per_rule():
    d = 16
    t1 = rope.phasewise_theta(d, 64)
    assert rope.schedule("fixed", d, 256, 64, t1)["theta"] == t1
    assert rope.schedule("phasewise", d, 256, 64, t1)["theta"] == pytest.approx(rope.phasewise_theta(d, 256))
    y = rope.schedule("yarn", d, 256, 64, t1)
    assert y["scale"] == 4 and y["original_len"] == 64 and y["theta"] == t1
    with pytest.raises(ValueError):
        rope.schedule("nope", d, 256, 64, t1)


def test_angles_are_float32_and_exact_at_positions_bf16_cannot_hold():
    """bf16 rounds 257 to 256 and 4097 to 4096; the angles come from the integer positions in fp32.
    (That a bf16-cast model keeps these fp32 tables: tests/test_model.py.)"""
    inv = rope.base_inv_freq(16, 10000.0)
    cos, sin = rope.cos_sin(torch.tensor([[257, 4097]]), inv)
    assert cos.dtype == sin.dtype == torch.float32
    assert cos[0, 0, 0].item() == pytest.approx(math.cos(257.0), abs=1e-5)
    assert sin[0, 1, 0].item() == pytest.approx(math.sin(4097.0), abs=1e-3)
    assert abs(math.cos(257.0) - math.cos(256.0)) > 0.1  # so a bf16 position would be visibly wrong


def test_bound_rule_reproduces_the_published_lower_bounds():
    """Men et al. 2024, Figure 1 (head dim 128): ~4.3e3 at 1k tokens, ~2.9e4 at 4k."""
    assert rope.bound_theta(128, 1024) == pytest.approx(4.3e3, rel=0.02)
    assert rope.bound_theta(128, 4096) == pytest.approx(2.9e4, rel=0.02)
    assert rope.bound_theta(16, 256) == pytest.approx(8.6e3, rel=0.02)


def test_bound_rule_meets_its_condition_and_is_the_smallest_on_its_grid():
    d, L = 16, 128
    theta = rope.bound_theta(d, L)
    assert rope.long_term_decay(d, theta, L).min() >= 0
    assert rope.long_term_decay(d, theta / 10 ** (1 / 1000), L).min() < 0  # one grid step below fails
    assert rope.long_term_decay(d, rope.phasewise_theta(d, L), L).min() < 0  # the phase-wise base sits below it


def test_bound_schedule_grows_with_the_window():
    d = 16
    s1, s2 = rope.schedule("bound", d, 64, 64, None), rope.schedule("bound", d, 256, 64, None)
    assert s1["theta"] < s2["theta"]
    inv, factor = rope.frequencies(s2, d)
    assert torch.allclose(inv, rope.base_inv_freq(d, s2["theta"])) and factor == 1.0
