"""
Rotary position embeddings (RoPE) and the rules that choose their frequencies.

RoPE (Su et al. 2021) rotates each pair of query/key channels by an angle that grows
linearly with the token's position: pair i of a head of size d turns by p * w_i at
position p, with w_i = theta ** (-2i / d).  The dot product of a rotated query at m and a
rotated key at n then depends on positions only through m - n.

Layout: "half-split" (as in Hugging Face / YaRN / nanochat): channel j is paired with
channel j + d/2.  Interleaved pairs (Meta, llama2.c) are the same thing up to a fixed
permutation of channels.

Everything that touches angles is computed in float32 from an explicit position tensor,
on every call: a cos/sin table stored as a module buffer would be silently cast by
`model.to(torch.bfloat16)`, and bf16 cannot even represent position 257 exactly.

Each scaling rule is one pure function returning (inv_freq, attn_factor):
  inv_freq    : float32 tensor [d/2], the angular speed w_i of each pair (radians/token)
  attn_factor : multiplies q and k (so attention logits scale by attn_factor**2); 1 except YaRN
`frequencies(spec, head_dim)` picks the rule named in a spec dict (stored in checkpoints).
"""

import functools
import math

import torch

RULES = ("fixed", "phasewise", "bound", "pi", "ntk", "yarn")


def base_inv_freq(head_dim, theta):
    """w_i = theta^(-2i/d) for i = 0 .. d/2-1: pair 0 turns fastest (1 rad/token), pair d/2-1 slowest."""
    if head_dim % 2 or head_dim < 2:
        raise ValueError(f"RoPE head dim must be even, got {head_dim}")
    if not theta > 1:
        raise ValueError(f"RoPE base theta must be > 1, got {theta}")
    i = torch.arange(0, head_dim, 2, dtype=torch.float64)
    return (theta ** (-i / head_dim)).float()


def wavelengths(inv_freq):
    """Tokens needed for each pair to turn once: 2*pi / w_i."""
    return 2 * math.pi / inv_freq.double()


# ---- one function per rule -------------------------------------------------------------

def fixed(head_dim, theta):
    """Plain RoPE with base theta, the same at every phase."""
    return base_inv_freq(head_dim, theta), 1.0


def phasewise_theta(head_dim, context_len, turns=1.0):
    """
    The base that "uses the whole rotational spectrum" of a context of `context_len` tokens
    (our explicit reading of arXiv 2604.06070, finding 1; the paper gives no formula).

    The slowest pair (i = d/2 - 1) has angular speed theta^(-(d-2)/d).  We choose theta so
    that this pair turns exactly `turns` full circles over the context:
        context_len * theta^(-(d-2)/d) = 2*pi*turns
        =>  theta = (context_len / (2*pi*turns)) ^ (d / (d-2)).
    Why: with a larger theta the slowest pairs barely move within the context, so their
    angle carries no position information there (wasted spectrum); with a smaller theta
    even the slowest pair wraps around several times and distant positions alias.  Each
    training phase therefore gets the smallest base whose spectrum still spans its window.
    Example (d=16): 64 tokens -> theta 14.19, 256 -> 69.19, 1024 -> 337.4.
    """
    if context_len < 2:
        raise ValueError(f"context length must be >= 2, got {context_len}")
    if head_dim < 4:
        raise ValueError(f"phase-wise rule needs head dim >= 4, got {head_dim}")
    theta = (context_len / (2 * math.pi * turns)) ** (head_dim / (head_dim - 2))
    return max(theta, 1.0 + 1e-6)


def phasewise(head_dim, context_len, turns=1.0):
    """Plain RoPE whose base is re-chosen for each phase's window by `phasewise_theta`."""
    return fixed(head_dim, phasewise_theta(head_dim, context_len, turns))


def long_term_decay(head_dim, theta, context_len):
    """B(m) = sum_i cos(m * w_i) for m = 1..context_len (Men et al. 2024, "Base of RoPE Bounds
    Context Length", NeurIPS 2024): the expected attention score gain of a key similar to the
    query at distance m, up to a positive factor.  While B(m) >= 0 a model can still tell a
    similar token at distance m from random ones; where it turns negative, it cannot."""
    m = torch.arange(1, context_len + 1, dtype=torch.float64)[:, None]
    return torch.cos(m * base_inv_freq(head_dim, theta).double()).sum(1)


@functools.lru_cache(maxsize=None)
def bound_theta(head_dim, context_len, per_decade=1000, lo=2.0, hi=1e12):
    """
    The smallest base (on a log grid, 0.23 % steps) with B(m) >= 0 for every m <= context_len:
    Men et al.'s lower bound on the RoPE base for retrieval over `context_len` tokens.  Below
    it, models keep a low perplexity but stop retrieving ("superficial" long context).  The
    condition is not monotone in the base (it holds in narrow windows first), so the grid is
    scanned upwards, not bisected.  Reproduces their Figure 1 for d=128: ~4.3e3 at 1k tokens,
    ~2.9e4 at 4k, ~8.4e4 at 8k; for d=16: ~1.7e3 at 64, ~8.6e3 at 256, ~5.6e4 at 512.
    """
    grid = lo * 10 ** (torch.arange(int(per_decade * math.log10(hi / lo)) + 1, dtype=torch.float64) / per_decade)
    i = torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim
    for thetas in grid.split(256):  # 256 bases at a time; most die at short distances, so check those first
        w = thetas[:, None] ** -i  # [bases, d/2]
        alive = torch.ones(len(thetas), dtype=torch.bool)
        for m in torch.arange(1, context_len + 1, dtype=torch.float64).split(128):
            alive[alive.clone()] = torch.cos(m[None, :, None] * w[alive][:, None]).sum(-1).min(1).values >= 0
            if not alive.any():
                break
        if alive.any():
            return float(thetas[alive][0])
    raise ValueError(f"no RoPE base below {hi:g} meets the long-term-decay bound at {context_len} tokens")


def bound(head_dim, context_len):
    """Plain RoPE whose base is re-chosen for each phase's window by `bound_theta`."""
    return fixed(head_dim, bound_theta(head_dim, context_len))


def pi(head_dim, theta, scale):
    """Linear position interpolation (Chen et al. 2023): positions divided by `scale`, i.e. every w_i / scale."""
    return base_inv_freq(head_dim, theta) / scale, 1.0


def ntk(head_dim, theta, scale):
    """
    "NTK-aware" base change (bloc97, 2023): theta' = theta * scale^(d/(d-2)).  The slowest
    pair is then slowed by exactly `scale` (like PI) while the fastest pair is untouched.
    """
    return base_inv_freq(head_dim, theta * scale ** (head_dim / (head_dim - 2))), 1.0


def yarn(head_dim, theta, scale, original_len, beta_fast=32.0, beta_slow=1.0, ramp="pairs"):
    """
    YaRN (Peng et al. 2023, "NTK-by-parts" + attention temperature).

    `original_len` is the context the weights were trained at; it must be given explicitly
    (inferring it from the current max length is a classic bug: the ramp would move).
    A pair that turns >= beta_fast times over the original context is left alone (local
    detail), one that turns <= beta_slow times is interpolated by `scale`, and a linear ramp
    blends the pairs in between.  ramp="pairs" (default) is the reference implementation's
    ramp (YaRN's own code, and Hugging Face transformers' yarn rope): linear in the *pair
    index*, between the pair indices where the turn count equals beta_fast and beta_slow,
    rounded outwards (floor / ceil).  ramp="turns" is linear in the *turn count* instead, as
    the paper's equations read; per-pair frequencies differ by up to ~60 % between the two, so
    checkpoints made with the reference need the default.  Attention logits are multiplied
    by (0.1 ln(scale) + 1)^2, i.e. q and k each by attn_factor = 0.1 ln(scale) + 1 (eq. 22).
    """
    if original_len < 1:
        raise ValueError("YaRN needs the original (pre-extension) context length")
    base = base_inv_freq(head_dim, theta)
    if ramp == "pairs":
        def pair_turning(turns):  # the (fractional) pair index i whose wavelength fits `turns` times
            return head_dim * math.log(original_len / (2 * math.pi * turns)) / (2 * math.log(theta))
        lo = max(math.floor(pair_turning(beta_fast)), 0)
        hi = min(math.ceil(pair_turning(beta_slow)), head_dim - 1)  # (sic: head_dim, as the reference)
        hi = hi + 0.001 if hi == lo else hi
        keep = 1 - ((torch.arange(head_dim // 2, dtype=torch.float32) - lo) / (hi - lo)).clamp(0, 1)  # 1 = untouched
    elif ramp == "turns":
        turns = original_len * base.double() / (2 * math.pi)
        keep = ((turns - beta_slow) / (beta_fast - beta_slow)).clamp(0, 1).float()
    else:
        raise ValueError(f"unknown YaRN ramp {ramp!r}; choose 'pairs' (the reference) or 'turns'")
    inv_freq = base / scale * (1 - keep) + base * keep
    attn_factor = 0.1 * math.log(scale) + 1.0 if scale > 1 else 1.0
    return inv_freq, attn_factor


# ---- dispatch from a spec stored in the checkpoint -------------------------------------

def frequencies(spec, head_dim):
    """spec: {'rule', 'theta', 'scale', 'original_len', 'context_len', 'turns'} -> (inv_freq, attn_factor)."""
    rule = spec["rule"]
    if rule == "fixed":
        return fixed(head_dim, spec["theta"])
    if rule == "phasewise":
        return phasewise(head_dim, spec["context_len"], spec.get("turns", 1.0))
    if rule == "bound":
        return bound(head_dim, spec["context_len"])
    if rule == "pi":
        return pi(head_dim, spec["theta"], spec["scale"])
    if rule == "ntk":
        return ntk(head_dim, spec["theta"], spec["scale"])
    if rule == "yarn":
        return yarn(head_dim, spec["theta"], spec["scale"], spec["original_len"], ramp=spec.get("ramp", "pairs"))
    raise ValueError(f"unknown RoPE rule {rule!r}; choose one of {RULES}")


def schedule(rule, head_dim, window, first_window, first_theta, turns=1.0):
    """
    The RoPE spec for a student phase at `window`, given phase 1's window and base.
    phasewise : a new base per phase (phasewise_theta);   bound : a new base per phase (bound_theta);
    fixed : phase 1's base kept;
    pi / ntk / yarn : phase 1's base, stretched by scale = window / first_window.
    """
    scale = window / first_window
    if rule == "phasewise":
        return {"rule": "phasewise", "context_len": window, "turns": turns,
                "theta": phasewise_theta(head_dim, window, turns)}
    if rule == "bound":
        return {"rule": "bound", "context_len": window, "theta": bound_theta(head_dim, window)}
    if rule == "fixed" or scale == 1:
        return {"rule": "fixed", "theta": first_theta}
    if rule in ("pi", "ntk", "yarn"):
        return {"rule": rule, "theta": first_theta, "scale": scale, "original_len": first_window}
    raise ValueError(f"unknown RoPE schedule {rule!r}; choose one of {RULES}")


def describe(spec):
    """A schedule entry in words, for logs: 'phasewise (theta 14.19)', 'yarn (theta 14.19, scale 8)'."""
    extra = f", scale {spec['scale']:g}" if "scale" in spec else ""
    return f"{spec['rule']} (theta {spec['theta']:.4g}{extra})"


def cos_sin(positions, inv_freq, attn_factor=1.0):
    """Angles p * w_i in float32 -> (cos, sin), each [..., T, d/2], pre-multiplied by attn_factor."""
    angles = positions.float()[..., None] * inv_freq.to(positions.device, torch.float32)
    return torch.cos(angles) * attn_factor, torch.sin(angles) * attn_factor


def apply_rotary(x, cos, sin):
    """Rotate x [B, H, T, d] pairwise (channel j with j + d/2) by the angles behind cos/sin [B, 1, T, d/2]."""
    d2 = x.shape[-1] // 2
    x1, x2 = x[..., :d2].float(), x[..., d2:].float()
    out = torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    return out.to(x.dtype)
