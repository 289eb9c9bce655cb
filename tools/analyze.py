"""
Two analyses of the paper's mechanism claims (arXiv 2604.06070), on any checkpoints distill.py writes.

    python tools/analyze.py perturb out/phase0.pt out/phase1.pt out/phase2.pt [--deltas 1,4,16,64] [--json J] [--png P]
    python tools/analyze.py updates out/phase1.pt out/phase2.pt [--control C] [--bands 4] [--json J] [--png P]

(tools/findings.py runs both over the roads' seeds and states each finding's verdict.)

perturb -- finding 2, "positional information travels in the logits".
    Input: a short piece of held-out text (BOS + period-1 tokens) repeated back to back to fill the
    window: packed repeated sequences seen as one causal stream with continuous positions 0..T-1,
    the way the cross-document packer feeds the student.  The same forward runs clean and with the
    rotary angles of the queries and/or keys (--target q|k|qk) perturbed from --start onward:
      shift : each pair i of the chosen band turns by an extra delta * w_i, i.e. those tokens look
              delta positions further along.  (qk from position 0 is a relabelling and changes
              nothing: RoPE scores see only m - n.  That is a test, not a useful setting.)
      noise : an extra N(0, delta^2) angle in radians, drawn per token and pair.
    Per layer: the relative change ||x_pert - x_clean|| / ||x_clean|| per token of q and k (after
    rotation), of the attention output and of the residual stream after the block; at the output
    KL(clean || perturbed) of the next-token distribution (nats/token).  Means over the perturbed
    tokens, and per quarter of that span (distance into the window).  Control: the same
    measurement on one unpacked copy of the sequence.  If a teacher's output moves when only the
    positions of a repeated input move, its soft targets carry position: what distillation on
    short packed data could hand on to the student.  --input packed: the student's own packed
    short documents instead.  --span N: only positions start..start+N-1 are perturbed, and the KL
    is also given by distance from that span -- how far back position still reaches the output.

updates -- finding 3, "structured query updates".
    Two checkpoints of one model (before / after an extension phase).  Per layer, head and RoPE
    pair i (channels i and i + d/2 of the head): ||dW_q rows|| / ||W_q rows before||, the same for
    W_k, and the relative change of the actual query states (taken BEFORE the rotation, so that a
    change of theta alone does not count as a change of the state) on held-out text.  Pairs are
    grouped into bands from fast (pair 0) to slow; the wavelength of every pair before and after is
    printed next to its change, so band movement can be read against the theta change.
    --control C: the before-checkpoint trained as many steps without the extension (tools/ablate.py's
    kd-control / ce-control); its change is subtracted, so what remains is what the extension moved
    beyond what any further training moves.

Both print compact tables, write everything as JSON (--json) and, with matplotlib installed, a
figure (--png).  Bad input is one line "error: ..." on stderr and exit code 2.
"""

import argparse
import contextlib
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the core modules live one folder up

import numpy as np
import torch

import checkpoint
import data
import distill
import eval_retrieval
import rope

TRACE_KEYS = ("q", "k", "attn", "resid")


class UsageError(ValueError):
    """Bad arguments or incompatible checkpoints: one line on stderr, exit code 2."""


# ---- RoPE pairs and frequency bands -------------------------------------------------------

def split_pairs(x):
    """[..., d] -> [..., d/2, 2]: pair i = channels (i, i + d/2), the half-split layout of rope.py."""
    d = x.shape[-1]
    if d % 2:
        raise ValueError(f"cannot split an odd dimension {d} into RoPE pairs")
    return torch.stack((x[..., : d // 2], x[..., d // 2:]), dim=-1)


def merge_pairs(p):
    """Inverse of split_pairs: [..., d/2, 2] -> [..., d]."""
    return torch.cat((p[..., 0], p[..., 1]), dim=-1)


def bands(n_pairs, n_bands):
    """Contiguous pair ranges [(lo, hi), ...], band 0 = fastest pairs (pair 0 turns 1 rad/token)."""
    n_bands = max(1, min(n_bands, n_pairs))
    edges = np.linspace(0, n_pairs, n_bands + 1).round().astype(int)
    return [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:])]


def head_pair_rows(weight, n_head):
    """W_q or W_k [C, C_in] -> [H, d/2, 2, C_in]: [h, i] holds rows h*d + i and h*d + i + d/2."""
    C, C_in = weight.shape
    return split_pairs(weight.view(n_head, C // n_head, C_in).transpose(1, 2)).permute(0, 2, 3, 1)


def qk_weights(model, layer):
    """(W_q, W_k) of one layer, each [C, C]: rows 0:C and C:2C of the fused qkv matrix."""
    C = model.cfg.n_embd
    w = model.blocks[layer].attn.qkv.weight.detach().float()
    return w[:C], w[C:2 * C]


# ---- 1. positional perturbation (finding 2) -----------------------------------------------

def repeated_text(corpus, period, window, samples, seed=0):
    """
    GPT-2 ids [samples, window]: BOS + (period-1) held-out tokens, repeated back to back and cut
    to the window.  Repetition makes the content of every position predictable from one period
    back, so what changes under a positional perturbation is position, not content.
    """
    if period < 2 or window < period:
        raise UsageError(f"need 2 <= --period ({period}) <= window ({window})")
    rng = np.random.default_rng(seed)
    reps = -(-window // period)
    return np.stack([np.tile(data.text_doc(corpus, rng, period, "val"), reps)[:window] for _ in range(samples)])


def packed_documents(corpus, window, samples, seed=0):
    """
    GPT-2 ids [samples, window] of the student's own extension data: short documents of the default
    mix (passkey, copy and text documents up to the short window) packed back to back, held-out text.
    """
    dargs = distill.parse_args(["--phase", "2"])
    dargs.windows = [dargs.short_len, window]
    sampler, _ = distill.sampler_for(dargs, corpus, 2, split="val")
    rng = np.random.default_rng(seed)
    return np.stack([data.pack(sampler, rng, window)[0] for _ in range(samples)]), dargs.short_len


def angle_offset(inv_freq, T, delta, mode="shift", start=0, pairs=None, seed=0, stop=None):
    """
    Extra rotary angles [T, d/2]: non-zero only at positions start..stop-1 (stop None: to the end)
    and on the pairs lo:hi (all pairs when None).  shift: delta * w_i (a position shift by delta tokens, band-limited
    when pairs are given); noise: delta * N(0, 1) radians per token and pair.
    """
    n = inv_freq.numel()
    lo, hi = pairs if pairs is not None else (0, n)
    mask = torch.zeros(n)
    mask[lo:hi] = 1.0
    t = torch.arange(T)
    span = ((t >= start) & (t < (T if stop is None else stop))).float()[:, None]
    if mode == "shift":
        off = delta * inv_freq.detach().cpu().float()[None, :].expand(T, n)
    elif mode == "noise":
        off = delta * torch.randn(T, n, generator=torch.Generator().manual_seed(seed))
    else:
        raise UsageError(f"unknown perturbation mode {mode!r} (shift or noise)")
    return off * mask * span


@contextlib.contextmanager
def hooked(model, traces, offset=None, target="q"):
    """
    Forward hooks that fill `traces` with one dict per layer (rotated q and k, attention output,
    residual stream after the block) and, given extra angles [T, d/2], rotate q and/or k
    (target) further by them.  Rotations compose per pair, so rotating the already rotated
    query by o equals rotating the raw query by its position's angle + o.
    """
    extra = None if offset is None else (torch.cos(offset)[None, None], torch.sin(offset)[None, None])
    handles = []
    for block in model.blocks:
        t = {}
        traces.append(t)

        def on_rotary(mod, args, out, t=t):
            q, k = out
            if extra is not None:
                cos, sin = (x.to(q.device) for x in extra)
                q = rope.apply_rotary(q, cos, sin) if "q" in target else q
                k = rope.apply_rotary(k, cos, sin) if "k" in target else k
            t.update(q=q, k=k)
            return q, k

        handles += [block.attn.rotary.register_forward_hook(on_rotary),
                    block.attn.register_forward_hook(lambda mod, args, out, t=t: t.update(attn=out)),
                    block.register_forward_hook(lambda mod, args, out, t=t: t.update(resid=out))]
    try:
        yield traces
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def traced(model, idx, offset=None, target="q"):
    """(final hidden states, per-layer traces); q and/or k (target) rotated with the extra angles."""
    B, T = idx.shape
    traces = []
    with hooked(model, traces, offset, target):
        h = model.hidden(idx, torch.arange(T, device=idx.device).expand(B, T))
    return h, traces


def rel_change(clean, pert):
    """Per token ||pert - clean|| / ||clean|| over all channels (and heads): [B, T]."""
    if clean.dim() == 4:  # q, k: [B, H, T, d] -> [B, T, H*d]
        clean, pert = (x.transpose(1, 2).flatten(2) for x in (clean, pert))
    clean, pert = clean.float(), pert.float()
    return (pert - clean).norm(dim=-1) / clean.norm(dim=-1).clamp_min(1e-12)


@torch.no_grad()
def kl_per_token(h_clean, h_pert, head, chunk=256):
    """KL(clean || perturbed) of next-token distributions in nats, [B, T]; row chunks keep a 50k vocab cheap."""
    out = []
    for a, b in zip(h_clean.split(chunk, dim=1), h_pert.split(chunk, dim=1)):
        lp = (a @ head.t()).double().log_softmax(-1)  # float64: a tiny KL stays >= 0
        lq = (b @ head.t()).double().log_softmax(-1)
        out.append((lp.exp() * (lp - lq)).sum(-1).float())
    return torch.cat(out, dim=1)


def span_means(values, start, n_buckets=4):
    """Mean of [B, T] values over positions >= start, and per bucket (quarter) of that span."""
    T = values.shape[1]
    parts = [p for p in np.array_split(np.arange(start, T), n_buckets) if len(p)]
    return float(values[:, start:].mean()), [float(values[:, p].mean()) for p in parts]


def perturbation_trace(model, idx, deltas, mode="shift", target="q", start=0, band=None, n_bands=4, seed=0,
                       span=None, buckets=()):
    """
    Clean vs perturbed forwards of idx [B, T] for each delta.  Returns one dict per delta:
    {"delta", "layers": [{q, k, attn, resid, resid_by_quarter}, ...], "kl", "kl_by_quarter"}.
    Finding 2 predicts non-zero residual changes growing through the layers and a non-zero KL.
    With span, only positions start..start+span-1 are perturbed, and "kl_by_distance" gives the
    KL at the positions after that span by their distance d from its last token, d in [lo, hi) of
    each bucket: does moving the positions of tokens d back still reach the output?
    """
    T = idx.shape[1]
    if not 0 <= start < T:
        raise UsageError(f"--start {start} is outside the {T}-token input")
    if target not in ("q", "k", "qk"):
        raise UsageError(f"--target must be q, k or qk, not {target!r}")
    n_pairs = model.inv_freq.numel()
    all_bands = bands(n_pairs, n_bands)
    if band is not None and not 0 <= band < len(all_bands):
        raise UsageError(f"--band {band}: this model has bands 0..{len(all_bands) - 1}")
    pairs = None if band is None else all_bands[band]
    h0, tr0 = traced(model, idx)
    head = model.head_weight().detach()
    results = []
    for delta in deltas:
        stop = None if span is None else start + span
        h1, tr1 = traced(model, idx, angle_offset(model.inv_freq, T, delta, mode, start, pairs, seed, stop), target)
        layers = []
        for a, b in zip(tr0, tr1):
            row = {key: span_means(rel_change(a[key], b[key]), start)[0] for key in TRACE_KEYS}
            row["resid_by_quarter"] = span_means(rel_change(a["resid"], b["resid"]), start)[1]
            layers.append(row)
        kl_tok = kl_per_token(h0, h1, head)
        kl, kl_q = span_means(kl_tok, start)
        results.append({"delta": delta, "layers": layers, "kl": kl, "kl_by_quarter": kl_q})
        if span is not None:
            d = torch.arange(T) - (stop - 1)  # distance of each position from the span's last token
            at = {f"{lo}-{hi}": (d > 0) & (d >= lo) & (d < hi) for lo, hi in buckets}
            results[-1]["kl_by_distance"] = {k: float(kl_tok[:, m].mean()) for k, m in at.items() if m.any()}
    return results


# ---- 2. query-state updates (finding 3) ----------------------------------------------------

@torch.no_grad()
def query_states(model, idx):
    """
    Pre-rotation queries per layer, each [B, T, C]: W_q applied to the layer's normalised input.
    Before the rotation, so that two checkpoints with different theta are compared on what their
    weights do, not on the angles their theta adds afterwards.
    """
    _, traces = traced(model, idx)
    inputs = [model.wte(idx)] + [t["resid"] for t in traces[:-1]]
    C = model.cfg.n_embd
    return [blk.attn.qkv(blk.ln1(x))[..., :C] for blk, x in zip(model.blocks, inputs)]


def weight_pair_sq(weight, n_head):
    """Squared Frobenius norm per head and pair of W_q/W_k rows: [H, d/2] (float64)."""
    return head_pair_rows(weight.double(), n_head).pow(2).sum((2, 3)).cpu().numpy()


def state_pair_sq(states, n_head):
    """Squared norm per head and pair of query states [..., C], summed over tokens: [H, d/2] (float64)."""
    C = states.shape[-1]
    p = split_pairs(states.double().unflatten(-1, (n_head, C // n_head)))  # [..., H, d/2, 2]
    return p.pow(2).sum(-1).reshape(-1, n_head, p.shape[-2]).sum(0).cpu().numpy()


def check_same_shape(m0, m1):
    """updates compares weights row by row: the two models must have the same layers, heads and width."""
    shape = lambda m: (m.cfg.n_layer, m.cfg.n_head, m.cfg.n_embd)
    if shape(m0) != shape(m1):
        raise UsageError("checkpoints differ in size (layers, heads, width) "
                         f"{shape(m0)} vs {shape(m1)}: updates needs two checkpoints of one model")


def update_analysis(m0, m1, idx0, idx1=None):
    """
    Squared norms per layer, head and pair of the change (delta) and of the before-value (base) of
    W_q rows, W_k rows and the pre-rotation query states on the same text (idx0 / idx1: that text
    in each model's vocabulary).  Returns {"W_q"|"W_k"|"q": (delta [L, H, P], base [L, H, P])}.
    Finding 3 predicts that the change concentrates in some pairs (bands), not spread evenly.
    """
    check_same_shape(m0, m1)
    H = m0.cfg.n_head
    q0, q1 = query_states(m0, idx0), query_states(m1, idx0 if idx1 is None else idx1)
    out = {k: ([], []) for k in ("W_q", "W_k", "q")}
    for layer in range(m0.cfg.n_layer):
        for name, a, b in zip(("W_q", "W_k"), qk_weights(m0, layer), qk_weights(m1, layer)):
            out[name][0].append(weight_pair_sq(b - a, H))
            out[name][1].append(weight_pair_sq(a, H))
        out["q"][0].append(state_pair_sq(q1[layer] - q0[layer], H))
        out["q"][1].append(state_pair_sq(q0[layer], H))
    return {k: (np.stack(d), np.stack(b)) for k, (d, b) in out.items()}


def update_tables(sq, band_list):
    """Relative changes of update_analysis's output: per pair and per band (all layers and heads), per layer x
    pair and layer x band (heads together) and per layer x head x pair, each {"W_q"|"W_k"|"q": array}."""
    return {"per_pair": {k: relative(d, b, (0, 1)) for k, (d, b) in sq.items()},
            "band": {k: relative(by_band(d, band_list), by_band(b, band_list), (0, 1)) for k, (d, b) in sq.items()},
            "layer_pair": {k: relative(d, b, 1) for k, (d, b) in sq.items()},
            "layer_band": {k: relative(by_band(d, band_list), by_band(b, band_list), 1) for k, (d, b) in sq.items()},
            "layer_head_pair": {k: relative(d, b) for k, (d, b) in sq.items()}}


def minus(a, b):
    """a - b for every table of two update_tables outputs: what the extension moved beyond the control."""
    return {t: {k: a[t][k] - b[t][k] for k in a[t]} for t in a}


def by_band(sq, band_list):
    """[..., P] -> [..., n_bands]: squared norms summed over the pairs of each band."""
    return np.stack([sq[..., lo:hi].sum(-1) for lo, hi in band_list], -1)


def relative(sq_delta, sq_base, axis=None):
    """sqrt(sum ||delta||^2 / sum ||base||^2) over `axis`: a norm ratio, so bands of any size compare."""
    if axis is not None:
        sq_delta, sq_base = sq_delta.sum(axis), sq_base.sum(axis)
    return np.sqrt(sq_delta / np.maximum(sq_base, 1e-300))


# ---- printing, JSON, figures --------------------------------------------------------------

def _short(name):
    """Last two path components (run folder + file): several runs all have a phase0.pt."""
    return os.path.join(*name.replace(os.sep, "/").split("/")[-2:])


def _name(path):
    """A short printable name: the path relative to here, unless that climbs out of the folder."""
    rel = os.path.relpath(path)
    return path if rel.startswith("..") else rel


def fmt(x, w=8):
    """A number in at most 7 characters (so columns never touch), right-aligned in w."""
    s = "0" if x == 0 else f"{x:.3g}" if 1e-3 <= abs(x) < 1e4 else f"{x:.1e}"
    return f"{s:>{w}}"


def describe(ck, model):
    return (f"phase {ck.get('phase')}, {model.cfg.n_layer} layers x {model.cfg.n_head} heads, d_head {model.cfg.head_dim}, "
            f"rope {rope.describe(ck['model_config']['rope'])}, window {ck.get('window')}")


def print_perturbation(name, desc, packed, control, T, period):
    L = len(packed[0]["layers"])
    print(f"\n== {name}: {desc}")
    print("relative change of the residual stream after each layer; KL(clean||perturbed) at the output, nats/token")
    head = f"{'delta':>7}" + "".join(f"{f'L{l}':>8}" for l in range(L)) + f"{'KL':>9}"
    if control:
        print(f"packed (T={T})".ljust(len(head)) + f"  | one copy (T={period})")
        head += f"  |{f'L{L - 1}':>8}{'KL':>9}"
    print(head)
    for i, r in enumerate(packed):
        line = f"{r['delta']:>7g}" + "".join(fmt(x["resid"]) for x in r["layers"]) + fmt(r["kl"], 9)
        if control:
            c = control[i]
            line += "  |" + fmt(c["layers"][-1]["resid"]) + fmt(c["kl"], 9)
        print(line)
    nq = len(packed[0]["kl_by_quarter"])
    print("by distance into the window (quarters of the perturbed span): KL | last-layer residual change")
    print(f"{'delta':>7}" + "".join(f"{f'Q{j + 1}':>8}" for j in range(nq)) + "  |" + "".join(f"{f'Q{j + 1}':>8}" for j in range(nq)))
    for r in packed:
        print(f"{r['delta']:>7g}" + "".join(fmt(x) for x in r["kl_by_quarter"]) + "  |"
              + "".join(fmt(x) for x in r["layers"][-1]["resid_by_quarter"]))
    big = packed[-1]
    print(f"per layer at delta={big['delta']:g} (packed): relative change of q, k (rotated), attention output, residual")
    print(f"{'layer':>7}" + "".join(f"{k:>8}" for k in TRACE_KEYS))
    for l, x in enumerate(big["layers"]):
        print(f"{l:>7}" + "".join(fmt(x[k]) for k in TRACE_KEYS))


def save_perturbation_png(path, results):
    plt = eval_retrieval.pyplot()
    if plt is None:
        return
    names = list(results)
    fig, axes = plt.subplots(1, len(names) + 1, figsize=(3.4 * (len(names) + 1), 3), squeeze=False)
    for ax, name in zip(axes[0], names):
        res = results[name]
        for i, r in enumerate(res["packed"]):
            line, = ax.plot([x["resid"] for x in r["layers"]], marker="o", label=f"δ={r['delta']:g}")
            if res["control"]:
                ax.plot([x["resid"] for x in res["control"][i]["layers"]], ls="--", color=line.get_color())
        ax.set_xticks(range(len(res["packed"][0]["layers"])))
        ax.set_yscale("symlog", linthresh=1e-4)  # symlog: a zero perturbation (exactly 0) stays drawable
        ax.set_ylim(bottom=0)
        ax.set_title(_short(name) + " (dashed: one copy)", fontsize=8)
        ax.set_xlabel("layer", fontsize=7)
        ax.set_ylabel("rel. change of residual", fontsize=7)
        ax.legend(fontsize=6)
    ax = axes[0][-1]
    for name in names:
        r = results[name]["packed"][-1]
        ax.plot(range(1, len(r["kl_by_quarter"]) + 1), r["kl_by_quarter"], marker="o", label=f"{_short(name)} δ={r['delta']:g}")
    ax.set_xlabel("quarter of the window", fontsize=7)
    ax.set_ylabel("KL(clean||perturbed), nats", fontsize=7)
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"figure -> {path}")


def save_updates_png(path, tables, band_list):
    plt = eval_retrieval.pyplot()
    if plt is None:
        return
    fig, axes = plt.subplots(1, len(tables), figsize=(3.2 * len(tables), 3), squeeze=False)
    for ax, (name, grid) in zip(axes[0], tables.items()):
        grid = np.asarray(grid)
        im = ax.imshow(grid, cmap="viridis", aspect="auto", origin="lower")
        ax.set_xticks(range(len(band_list)), [f"{lo}-{hi - 1}" for lo, hi in band_list], fontsize=7)
        ax.set_yticks(range(grid.shape[0]), [str(l) for l in range(grid.shape[0])], fontsize=7)
        ax.set_xlabel("RoPE pairs (fast -> slow)", fontsize=7)
        ax.set_ylabel("layer", fontsize=7)
        ax.set_title(f"relative change of {name}", fontsize=8)
        fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"figure -> {path}")


def write_json(path, obj):
    with open(path, "w") as fh:
        json.dump(obj, fh, indent=1)
    print(f"results -> {path}")


# ---- commands ------------------------------------------------------------------------------

def cmd_perturb(args):
    loaded = [(p, *checkpoint.load_model(p, args.device)) for p in args.ckpts]
    window = args.window or max(ck["window"] for _, _, _, ck in loaded)
    if not 0 <= args.start < window:
        raise UsageError(f"--start {args.start} is outside the {window}-token input")
    if args.span is not None and not 1 <= args.span <= window - args.start - 1:
        raise UsageError(f"--span {args.span} must leave tokens after it in the {window}-token input (from --start {args.start})")
    corpus = data.load_corpus(args.data)
    if args.input == "repeated":
        ids, short = repeated_text(corpus, args.period, window, args.samples, args.seed), args.period
        what_in = f"{args.samples} x (BOS + {args.period - 1} held-out tokens) repeated to {window} tokens"
    else:
        ids, short = packed_documents(corpus, window, args.samples, args.seed)
        what_in = f"{args.samples} windows of {window} tokens of the student's short documents (<= {short}), packed"
    deltas = [float(x) for x in args.deltas.split(",")]
    kw = dict(deltas=deltas, mode=args.mode, target=args.target, start=args.start, band=args.band,
              n_bands=args.bands, seed=args.seed, span=args.span, buckets=eval_retrieval.distance_buckets(short, window))
    what = (f"{args.mode} {args.target} by delta ({'tokens' if args.mode == 'shift' else 'radians'}) from position "
            f"{args.start}{'' if args.span is None else f' for {args.span} tokens'}, "
            f"{'all pairs' if args.band is None else f'band {args.band} of {args.bands} only'}")
    print(f"input: {what_in}; perturbation: {what}")
    results = {}
    for path, model, vocab, ck in loaded:
        name = _name(path)
        idx = torch.from_numpy(vocab(ids)).to(args.device)
        packed = perturbation_trace(model, idx, **kw)
        control = (perturbation_trace(model, idx[:, :args.period], **{**kw, "span": None})
                   if args.input == "repeated" and args.span is None and args.start < args.period else None)
        results[name] = {"phase": ck.get("phase"), "window": ck.get("window"), "rope": ck["model_config"]["rope"],
                         "lineage": ck.get("lineage"), "packed": packed, "control": control}
        print_perturbation(name, describe(ck, model), packed, control, window, args.period)
        if args.span is not None:
            print("KL at the output by distance from the perturbed span: " + "; ".join(
                f"delta={r['delta']:g}: " + ", ".join(f"{k} {fmt(v, 0)}" for k, v in r["kl_by_distance"].items()) for r in packed))
    has_control = any(r["control"] for r in results.values())
    if len(results) > 1:
        print("\nsummary: KL(clean||perturbed) at the output, nats/token, packed" + (" | one copy" if has_control else ""))
        print(f"{'model':<28}" + "".join(f"{f'd={d:g}':>9}" for d in deltas) + ("  |" + "".join(f"{f'd={d:g}':>9}" for d in deltas)
                                                                            if has_control else ""))
        for name, r in results.items():
            line = f"{name[-28:]:<28}" + "".join(fmt(x["kl"], 9) for x in r["packed"])
            if r["control"]:
                line += "  |" + "".join(fmt(x["kl"], 9) for x in r["control"])
            print(line)
    if args.json:
        write_json(args.json, {"command": eval_retrieval.command_line("tools/analyze.py"), "settings": {**kw, "window": window, "input": args.input,
                                                                 "period": args.period, "samples": args.samples},
                               "models": results})
    if args.png:
        save_perturbation_png(args.png, results)
    return 0


def held_out_text(data_dir, length, samples, seed):
    """GPT-2 ids [samples, length] of held-out text: the input of the query-state comparison."""
    corpus = data.load_corpus(data_dir)
    rng = np.random.default_rng(seed)
    return np.stack([data.text_doc(corpus, rng, length, "val") for _ in range(samples)])


def cmd_updates(args):
    (m0, v0, c0), (m1, v1, c1) = (checkpoint.load_model(p, args.device) for p in (args.before, args.after))
    check_same_shape(m0, m1)
    length = args.length or c0["window"]
    text = held_out_text(args.data, length, args.samples, args.seed)
    ids = lambda v: torch.from_numpy(v(text)).to(args.device)
    sq = update_analysis(m0, m1, ids(v0), ids(v1))
    n_pairs = m0.cfg.head_dim // 2
    band_list = bands(n_pairs, args.bands)
    tab = update_tables(sq, band_list)
    if args.control:  # the same student trained as long without the extension: subtract what training alone moves
        mc, vc, cc = checkpoint.load_model(args.control, args.device)
        control = update_tables(update_analysis(m0, mc, ids(v0), ids(vc)), band_list)
        excess = minus(tab, control)
    wl0, wl1 = rope.wavelengths(m0.inv_freq).tolist(), rope.wavelengths(m1.inv_freq).tolist()

    print(f"before: {_name(args.before)}: {describe(c0, m0)}, lineage {c0.get('lineage')}")
    print(f"after : {_name(args.after)}: {describe(c1, m1)}, lineage {c1.get('lineage')}")
    if v0 != v1:
        print("note: the two checkpoints use different vocabularies; each reads the same text in its own")
    print(f"query states: pre-rotation, {args.samples} held-out texts of {length} tokens")
    per_pair = tab["per_pair"]
    w0, w1 = c0.get("window") or length, c1.get("window") or length
    print(f"\nper RoPE pair (all layers and heads): wavelength in tokens, turns over each phase's window "
          f"({w0} / {w1}), relative change")
    print(f"{'pair':>5}{'band':>5}{'wl before':>11}{'wl after':>10}{'turns bef':>10}{'turns aft':>10}"
          + "".join(f"{k:>8}" for k in sq) + ("  | minus the control's: " + "".join(f"{k:>8}" for k in sq) if args.control else ""))
    band_of = {i: b for b, (lo, hi) in enumerate(band_list) for i in range(lo, hi)}
    for i in range(n_pairs):
        print(f"{i:>5}{band_of[i]:>5}{wl0[i]:>11.4g}{wl1[i]:>10.4g}{w0 / wl0[i]:>10.3g}{w1 / wl1[i]:>10.3g}"
              + "".join(fmt(per_pair[k][i]) for k in sq)
              + ("  |" + " " * 20 + "".join(fmt(excess["per_pair"][k][i]) for k in sq) if args.control else ""))
    tables = tab["layer_band"]  # [L, nb]
    print(f"\nrelative change per layer x band (band b = pairs lo-hi, 0 = fastest): "
          + ", ".join(f"b{j}={lo}-{hi - 1}" for j, (lo, hi) in enumerate(band_list)))
    print(f"{'layer':>5}" + "  |".join("".join(f"{f'{k}:b{j}':>8}" for j in range(len(band_list))) for k in tables))
    for layer in range(m0.cfg.n_layer):
        print(f"{layer:>5}" + "  |".join("".join(fmt(x) for x in tables[k][layer]) for k in tables))
    q_band = tab["band"]["q"]
    if args.control:
        print(f"control: {_name(args.control)}: {describe(cc, mc)}; beyond it, per layer x band (query states): "
              + "; ".join(f"L{l} " + " ".join(fmt(x, 0) for x in row) for l, row in enumerate(excess["layer_band"]["q"])))
    top = int(np.argmax(q_band))
    lo, hi = band_list[top]
    print(f"\nquery states moved most in band {top} (pairs {lo}-{hi - 1}, wavelength {wl0[lo]:.3g}-{wl0[hi - 1]:.3g} tokens "
          f"before, {wl1[lo]:.3g}-{wl1[hi - 1]:.3g} after): {q_band[top]:.3g} vs "
          + ", ".join(f"b{j} {x:.3g}" for j, x in enumerate(q_band) if j != top))
    if args.json:
        write_json(args.json, {
            "command": eval_retrieval.command_line("tools/analyze.py"), "before": args.before, "after": args.after, "length": length, "samples": args.samples,
            "rope_before": c0["model_config"]["rope"], "rope_after": c1["model_config"]["rope"],
            "window_before": c0.get("window"), "window_after": c1.get("window"),
            "wavelength_before": wl0, "wavelength_after": wl1, "bands": band_list,
            **{t: {k: v.tolist() for k, v in tab[t].items()} for t in tab},
            **({"control": args.control, **{f"excess_{t}": {k: v.tolist() for k, v in excess[t].items()} for t in excess}}
               if args.control else {})})
    if args.png:
        save_updates_png(args.png, tables, band_list)
    return 0


class Parser(argparse.ArgumentParser):
    """argparse, but a bad argument is one line (UsageError) instead of usage + message."""

    def error(self, message):
        raise UsageError(f"{message} (see --help)")


def parse_args(argv=None):
    p = Parser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    a = sub.add_parser("perturb", help="positional perturbation of packed repeated input (finding 2)")
    a.add_argument("ckpts", nargs="+", help="checkpoints to compare (e.g. teacher and students)")
    a.add_argument("--window", type=int, default=None, help="input length (default: the largest checkpoint window)")
    a.add_argument("--input", choices=("repeated", "packed"), default="repeated",
                   help="packed repeated text (the paper's input) or the student's packed short documents")
    a.add_argument("--period", type=int, default=32, help="length of the repeated sequence, BOS included")
    a.add_argument("--span", type=int, default=None, help="perturb only this many positions from --start; the KL "
                   "is then also given by distance from that span")
    a.add_argument("--samples", type=int, default=4, help="different repeated sequences averaged over")
    a.add_argument("--deltas", default="1,4,16,64", help="perturbation sizes: tokens (shift) or radians (noise)")
    a.add_argument("--mode", choices=("shift", "noise"), default="shift")
    a.add_argument("--target", choices=("q", "k", "qk"), default="q", help="which rotations are perturbed")
    a.add_argument("--start", type=int, default=0, help="first perturbed position")
    a.add_argument("--bands", type=int, default=4, help="number of frequency bands (fast .. slow)")
    a.add_argument("--band", type=int, default=None, help="perturb only this band (default: all pairs)")
    a.set_defaults(func=cmd_perturb)
    u = sub.add_parser("updates", help="per-RoPE-band change of W_q, W_k and query states (finding 3)")
    u.add_argument("before", help="checkpoint before the extension phase")
    u.add_argument("after", help="checkpoint after it (same model size)")
    u.add_argument("--control", default=None, help="the before-checkpoint trained as many steps without the extension "
                   "(same window and base): its change is subtracted, leaving what the extension alone moves")
    u.add_argument("--bands", type=int, default=4, help="number of frequency bands (fast .. slow)")
    u.add_argument("--length", type=int, default=None, help="held-out text length (default: the before-window)")
    u.add_argument("--samples", type=int, default=8, help="held-out texts")
    u.set_defaults(func=cmd_updates)
    for s in (a, u):
        s.add_argument("--data", default=None, help="folder of .txt files (default: the Shakespeare corpus)")
        s.add_argument("--seed", type=int, default=0)
        s.add_argument("--device", default="cpu")
        s.add_argument("--json", default=None, help="write all results to this JSON file")
        s.add_argument("--png", default=None, help="write a figure (needs matplotlib)")
    args = p.parse_args(argv)
    for k in ("window", "length"):
        if getattr(args, k, None) is not None and getattr(args, k) < 2:
            raise UsageError(f"--{k} must be >= 2")
    if args.samples < 1 or args.bands < 1:
        raise UsageError("--samples and --bands must be >= 1")
    if args.command == "perturb":
        try:
            [float(x) for x in args.deltas.split(",")]
        except ValueError:
            raise UsageError(f"--deltas must be comma-separated numbers, not {args.deltas!r}") from None
    return args


def main(argv=None):
    try:
        args = parse_args(argv)
        with torch.no_grad():
            return args.func(args)
    except (UsageError, checkpoint.CheckpointError, data.DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
