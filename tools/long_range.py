"""
Where KD's reach stops, configuration by configuration: one summary (and figure) of ablation files.

    python tools/long_range.py baseline=results/long_range/one_seed.json \\
        teacher-1024=results/long_range/teacher_1024.json --out results/long_range/summary.json

Each NAME=FILE is one configuration tried, FILE a results file of tools/ablate.py; several files of one
configuration (one per phase-1 seed, say) are joined with '+' and their cells pooled.  Distances are
absolute, whatever the configuration's document length: "mid" is key distance 64-256 and "long"
256-512, as in the headline.  For each configuration: the predecessor's four rows (phase 1, ce-long, kd,
ce) at mid and long, KD's reach (the largest key distance, to 32 tokens, where KD still retrieves >= 0.5)
and the transfer channel by distance -- what the teacher's soft targets on the packed short documents
carry from each distance, the most KD could hand on there -- next to what KD retrieves there.

ce-long and ce never read the teacher: a configuration that changes only the teacher (same flags, same
phase 1) and runs kd alone takes them from the first earlier configuration that trained the same students,
and says which in `borrowed` ({variant: configuration}); ce-long, trained on real long documents, is also
taken across data designs (--snippets), which only shape the packed short data.
"""

import argparse
import json
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import ablate  # noqa: E402
from ablate import checkpoint, eval_retrieval  # noqa: E402

MID, LONG = (64, 256), (256, 512)
BUCKETS = ((0, 64), (64, 128), (128, 256), (256, 512))  # the headline's document length, 1x/2x/4x/8x
BIN = 32


def pooled(cells, lo, hi, key="distance_correct"):
    """Exact match over every prompt of these cells with key distance in [lo, hi) (key: which prompts, e.g. the
    held-out-text haystack's `text_distance_correct`)."""
    hits = [c for cell in cells for d, c in cell[key] if lo <= d < hi]
    return float(np.mean(hits)) if hits else None


def legacy(cell, lo, hi, short):
    """Files written before cells kept every prompt: only the ranges their own keys cover."""
    key = f"{lo}-{hi}"
    if key in cell["by_distance"]:
        return cell["by_distance"][key]
    if short == 64 and (lo, hi) in (MID, LONG):
        return cell.get("mid_acc" if (lo, hi) == MID else "long_acc")
    return cell.get("by_distance_fine", {}).get(key)


def acc(cells, lo, hi, short):
    if not cells:
        return None
    if all("distance_correct" in c for c in cells):
        return pooled(cells, lo, hi)
    vals = [v for v in (legacy(c, lo, hi, short) for c in cells) if v is not None]
    return float(np.mean(vals)) if vals else None


def same_students(setup, other, variant):
    """Would `variant` train the same students under both setups (same flags, phase 1, steps, rows and window)?
    ce-long trains on real long documents, so the packed data's design (--snippets) never reaches it."""
    def flags(st):
        words = st["flags"].split()
        if variant == "ce-long" and "--snippets" in words:
            del words[words.index("--snippets"):words.index("--snippets") + 2]
        return words
    same = ("short_len", "phase1", "steps", "batch", "window")
    return flags(setup) == flags(other) and all(setup[k] == other[k] for k in same)


def configuration(name, paths, earlier=()):
    files = [json.load(open(p)) for p in paths]
    short = files[0]["setup"]["short_len"]
    cells = {v: [c for r in files for c in ablate.seed_cells(r["cells"], v)] for v in ("kd", "ce", "ce-long", "phase1", "teacher")}
    borrowed = {}
    for v in ("ce", "ce-long"):
        donor = next((c for c in earlier if c["_cells"][v] and same_students(files[0]["setup"], c["_setup"], v)), None)
        if not cells[v] and donor:
            cells[v], borrowed[v] = donor["_cells"][v], donor["name"]
    window = files[0]["setup"]["window"]
    kd_bins = {f"{lo}-{lo + BIN}": acc(cells["kd"], lo, lo + BIN, short) for lo in range(0, window, BIN)}
    channel = files[0]["transfer_channel"].get("by_distance")
    entry = {
        "name": name, "files": paths, "command": [r["command"] for r in files],
        "seeds": len(cells["kd"]), "teacher_window": files[0]["setup"]["teacher"]["window"],
        "document_length": short, "flags": files[0]["setup"]["flags"], "borrowed": borrowed,
        **{f"{who}_{rng}_acc": acc(cells[variant], *span, short)
           for who, variant in (("kd", "kd"), ("ce", "ce"), ("ref", "ce-long"), ("phase1", "phase1"))
           for rng, span in (("mid", MID), ("long", LONG))},
        "kd_reach": ablate.reach(kd_bins) if any(v is not None for v in kd_bins.values()) else None,
        **{f"{who}_by_distance": {f"{lo}-{hi}": acc(cells[variant], lo, hi, short) for lo, hi in BUCKETS}
           for who, variant in (("kd", "kd"), ("ce", "ce"), ("ref", "ce-long"), ("teacher", "teacher"))},
        "kd_by_distance_fine": kd_bins,
        "channel_by_distance": channel,
    }
    return {**entry, "_cells": cells, "_setup": files[0]["setup"]}


@torch.no_grad()
def needle_attention(model, vocab, lengths, n=4, digits=4, seed=1234):
    """
    What a model does at each distance: on the eval's own passkey prompts, the attention that the query
    predicting the key's first piece pays to the needle's key tokens (summed over them), for the head and
    layer that pay the most -- the retrieval head.  q and k are caught after the rotation, as the model's
    attention sees them.  Returns (key distance, that attention) per prompt.
    """
    model.eval()
    caught = [{} for _ in model.blocks]
    hooks = [blk.attn.rotary.register_forward_hook(lambda m, a, out, c=c: c.update(q=out[0][0], k=out[1][0]))
             for blk, c in zip(model.blocks, caught)]
    out = []
    try:
        for length in lengths:
            for tokens, answer, needle, _ in eval_retrieval._prompts(length, eval_retrieval.DEPTHS, n, seed, digits):
                model(torch.from_numpy(vocab(tokens))[None], torch.arange(length)[None], hidden_only=True)
                key = slice(needle, needle + length - answer)  # the needle holds the same key pieces as the answer
                best = 0.0
                for c in caught:
                    q, k = c["q"][:, answer - 1], c["k"][:, :answer]  # [heads, d], [heads, answer, d]
                    att = torch.softmax((k @ q[..., None])[..., 0] / q.shape[-1] ** 0.5, -1)
                    best = max(best, float(att[:, key].sum(-1).max()))
                out.append((answer - needle, best))
    finally:
        for h in hooks:
            h.remove()
    return out


def attention_by_distance(specs, lengths, n):
    """NAME=CKPT pairs -> each model's mean retrieval-head attention on the needle per distance bucket."""
    out = {}
    for spec in specs:
        name, _, path = spec.partition("=")
        model, vocab, ck = checkpoint.load_model(path)
        recs = [{"distance": d, "attention": a} for d, a in needle_attention(model, vocab, lengths, n, ck["key_digits"])]
        means = eval_retrieval.by_distance(recs, (*BUCKETS, (512, 1024)), key="attention")
        out[name] = {"checkpoint": path, "by_distance": {k: v for k, v in means.items() if v is not None}}
        print(f"{name:14s} " + "  ".join(f"{k}: {v:.3f}" for k, v in out[name]["by_distance"].items()), flush=True)
    return out


def plot(configs, png):
    plt = eval_retrieval.pyplot()
    if plt is None:
        return
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 5.6))
    for i, c in enumerate(configs):
        color = plt.get_cmap("tab20")(i % 20)  # one color per configuration in both panels
        xs = [int(k.split("-")[0]) + BIN / 2 for k in c["kd_by_distance_fine"]]
        ys = [np.nan if v is None else v for v in c["kd_by_distance_fine"].values()]
        ax1.plot(xs, ys, marker=".", color=color, label=f"kd: {c['name']} (reach {c['kd_reach']})")
        ch = c["channel_by_distance"]
        if ch:
            other = ch["other_keys_by_key_distance"]
            ax2.plot([int(k.split("-")[0]) for k in other], [np.nan if v["other_keys_full"] is None else v["other_keys_full"]
                                                              for v in other.values()], marker="o", color=color)
            kl = ch["kl_full_last_k"]
            ax2.plot([int(k) for k in kl], list(kl.values()), ls="--", marker="x", color=color)
    ref = configs[0]["ref_by_distance"]
    ax1.plot([(lo + hi) / 2 for lo, hi in BUCKETS], [np.nan if v is None else v for v in ref.values()], "k:", marker="s",
             label="ce-long (upper reference)")
    ax1.axhline(0.5, color="grey", lw=0.6)
    ax1.set(xlabel="key distance (tokens)", ylabel="passkey exact match", ylim=(-0.05, 1.05),
            title="what KD retrieves, by key distance (32-token bins)")
    ax2.plot([], [], "k-o", label="p(other documents' keys) at a packed answer, by key distance")
    ax2.plot([], [], "k--x", label="KL(full window || last k tokens)")
    ax2.set(xlabel="key distance / context removed beyond k (tokens)", ylabel="probability / nats per token", yscale="log",
            title="what the teacher's soft targets carry, by distance")
    ax2.legend(fontsize=7)
    fig.legend(*ax1.get_legend_handles_labels(), loc="lower center", ncol=3, fontsize=7)  # colors of both panels
    fig.tight_layout(rect=(0, 0.2, 1, 1))
    fig.savefig(png, dpi=110)
    print(f"figure -> {png}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("configs", nargs="+", help="NAME=FILE[+FILE...] (tools/ablate.py results files), the baseline first")
    p.add_argument("--out", default="results/long_range/summary.json")
    p.add_argument("--png", default=None, help="figure (default: OUT with .png; '' = none)")
    p.add_argument("--attention", action="store_true", help="instead: the arguments are NAME=CKPT, and OUT gets each "
                   "model's retrieval-head attention on the needle by key distance (needle_attention)")
    p.add_argument("--n", type=int, default=4, help="--attention: prompts per (length, depth)")
    args = p.parse_args(argv)
    if args.attention:
        missing = [s for s in args.configs if "=" not in s or not os.path.isfile(s.partition("=")[2])]
        if missing:
            print(f"error: want NAME=CKPT of existing checkpoints, got {missing}", file=sys.stderr)
            return 2
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", 2)))
        res = attention_by_distance(args.configs, eval_retrieval.default_lengths(512), args.n)
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as fh:
            json.dump({"command": eval_retrieval.command_line("tools/long_range.py"), "models": res}, fh, indent=1)
        print(f"-> {args.out}")
        return 0
    out = []
    for spec in args.configs:
        name, _, files = spec.partition("=")
        paths = files.split("+")
        missing = [f for f in paths if not os.path.isfile(f)]
        if not name or not files or missing:
            print(f"error: {spec!r}: want NAME=FILE[+FILE...] of existing files (missing: {missing})", file=sys.stderr)
            return 2
        out.append(configuration(name, paths, out))
    for c in out:
        c.pop("_cells"), c.pop("_setup")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump({"mid": list(MID), "long": list(LONG), "configurations": out}, fh, indent=1)
    fmt = lambda x: "-" if x is None else f"{x:.2f}"  # noqa: E731
    print("| configuration | kd runs | teacher window | document length | phase 1 | ce-long | kd | ce | kd's reach |")
    print("|---|---|---|---|---|---|---|---|---|")
    for c in out:
        print(f"| {c['name']} | {c['seeds']} | {c['teacher_window']} | {c['document_length']} | "
              + " | ".join(f"{fmt(c[f'{w}_mid_acc'])} / {fmt(c[f'{w}_long_acc'])}" for w in ("phase1", "ref", "kd", "ce"))
              + f" | {c['kd_reach']} |")
    print(f"(accuracy at key distance {MID[0]}-{MID[1]} / {LONG[0]}-{LONG[1]}) -> {args.out}")
    png = os.path.splitext(args.out)[0] + ".png" if args.png is None else args.png
    if png:
        plot(out, png)
    return 0


if __name__ == "__main__":
    sys.exit(main())
