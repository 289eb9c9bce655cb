"""
Short data, long context: the roads from short documents to the long window, side by side, with their cost
and their short-context price -- one summary (and figure) of tools/ablate.py results files.

    python tools/roads.py DEFAULT.json [MORE.json] [--also STRONG.json] [--attention ATT.json] --out results/roads/summary.json

DEFAULT.json [MORE.json ...]: ablate runs of the default teacher and phase 1 with the variants kd, ce, ce-long,
pose-kd, pose-ce, pose-rows-kd, pose-rows-ce, pose-far-ce and the controls kd-control, ce-control (phase 1 and the teacher come with the first; several
files are pooled); --also: further ablate runs (another teacher or phase 1,
e.g. the strongest KD configuration of results/long_range), each variant a road named FILE-STEM/VARIANT.
Per road: passkey exact match by key distance in two haystacks (the eval's filler and held-out text), seed
means and min-max, the reach (largest key distance, to half a document, still retrieved >= 0.5, filler),
the short-context price (held-out text loss over windows of the short length, passkey at the short length),
and the cost (tokens trained, dense attention FLOPs of one step, wall minutes of one run on one thread).
--attention: a tools/long_range.py --attention file whose model names are road names (retrieval-head
attention on the needle by key distance, the mechanism beside the table).
"""

import argparse
import json
import os
import sys
import warnings

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import ablate  # noqa: E402
import long_range  # noqa: E402
from ablate import distill, eval_retrieval  # noqa: E402

BUCKETS = ((0, 64), (64, 128), (128, 256), (256, 512))
LABELS = {"teacher": "the teacher (long documents, window 512)", "phase1": "phase 1 alone (lower reference)",
          "ce-long": "CE on real long documents (upper reference)", "kd": "KD on packed short documents",
          "ce": "CE on packed short documents", "pose-kd": "KD on short rows with skipped positions (PoSE)",
          "pose-ce": "CE on short rows with skipped positions (PoSE)",
          "pose-rows-kd": "KD, skipped positions, rows of 1-2 documents",
          "pose-rows-ce": "CE, skipped positions, rows of 1-2 documents",
          "pose-far-ce": "CE, skipped positions, rows of 1 or 4 documents spanning the window",
          # the same steps at phase 1's own window and base: what training alone does to the short context
          "kd-control": "control: KD at phase 1's window, no extension", "ce-control": "control: CE at phase 1's window, no extension"}


def f2(x):
    return "-" if x is None else f"{x:.2f}"


def extension_args(setup, variant):
    """The distill.py arguments of a variant's extension phase, from an ablate file's setup."""
    short, window = setup["short_len"], setup["window"]
    return distill.parse_args(["--phase", "2", *setup["flags"].split(), "--batch", str(setup["batch"]),
                               "--windows", f"{short},{window}", *ablate.variant_flags(variant, short, window)])


def step_cost(setup, variant):
    """(tokens, dense attention FLOPs) of one optimizer step.  Attention: QK^T and AV, 2*T*T*d each, for the
    student's forward and backward (3x its forward) over the step's rows, plus the teacher's forward when the
    variant distils (at the full window: a length curriculum's shorter early rows cost less)."""
    args = extension_args(setup, variant)
    trained = distill.window_of(args, 2)  # the controls': the short window
    tokens = distill.rows_of(args, 2) * trained  # PoSE: the same tokens in rows of --pose_len
    lens = distill.pose_lens(args) if args.positions == "pose" else [trained]
    widths = [(args.student_layers, args.student_embd, 3)]
    if distill.uses_teacher(args, 2):
        t = setup["teacher"]["config"]
        widths.append((t["n_layer"], t["n_embd"], 1))
    # one step at each row length (a list of lengths: one drawn per step, so the mean)
    return tokens, float(np.mean([tokens // T * sum(k * 4 * T * T * C * L for L, C, k in widths) for T in lens]))


def road(name, label, r, variant, untimed=()):
    cells = ablate.seed_cells(r["cells"], variant)
    setup, out = r["setup"], {"name": name, "label": label, "seeds": len(cells), "short_len": r["setup"]["short_len"]}
    for key, src in (("acc", "distance_correct"), ("text_acc", "text_distance_correct")):
        per = {f"{lo}-{hi}": [v for v in (long_range.pooled([c], lo, hi, src) for c in cells) if v is not None] for lo, hi in BUCKETS}
        out[f"{key}_by_distance"] = {k: float(np.mean(v)) if v else None for k, v in per.items()}  # None: no prompt there
        out[f"{key}_range"] = {k: [min(v), max(v)] if v else None for k, v in per.items()}
        fine = [c[("text_" if key == "text_acc" else "") + "by_distance_fine"] for c in cells]
        bins = {k: None if any(f[k] is None for f in fine) else float(np.mean([f[k] for f in fine])) for k in fine[0]}
        out["reach" if key == "acc" else "text_reach"] = ablate.reach(bins)
    out["short_text_loss"] = float(np.mean([c["short_text_loss"] for c in cells]))
    out["short_passkey_acc"] = float(np.mean([c["short_passkey_acc"] for c in cells]))
    out["text_loss_by_quarter"] = np.mean([c["text_loss_by_quarter"] for c in cells], 0).tolist()
    trained = variant not in ("teacher", "phase1")
    tokens, flops = step_cost(setup, variant) if trained else (None, None)
    out["tokens"] = setup["steps"] * tokens if trained else None
    out["attention_gflop_per_step"] = flops / 1e9 if trained else None
    timed = [c["train_minutes"] for k, c in r["cells"].items()
             if ablate.run_key(k)[0] == variant and c["train_minutes"] is not None and k not in untimed]
    out["wall_min"] = float(np.mean(timed)) if trained and timed else None
    return out


def check_setup(other, r, path, first="the default files"):
    keys = ("short_len", "window", "steps", "batch", "prompts_per_cell", "teacher")
    if any(other["setup"][k] != r["setup"][k] for k in keys):
        raise ValueError(f"{path} has another setup than {first} ({', '.join(keys)} must agree)")


def pooled_files(paths):
    """Several ablate files of one teacher, phase 1 and setup (say, the PoSE roads and the packed ones, run side
    by side) as one: their variants' cells together, teacher and phase 1 from the first."""
    r = load(paths[0])
    for path in paths[1:]:
        other = load(path)
        check_setup(other, r, path, paths[0])
        r["cells"].update({k: v for k, v in other["cells"].items() if k not in ("teacher", "phase1")})
    return r


def add_alias(r, spec):
    """ROAD=A.json[+B.json]: the one trained variant of those ablate files, run with --flags, is the named variant
    ROAD of the default setup -- its cells join r as ROAD-sK, once the flags are checked to make ROAD's extension."""
    name, _, paths = spec.partition("=")
    if name not in LABELS or not paths:
        raise ValueError(f"--alias {spec}: expected ROAD=A.json[+B.json], ROAD one of {', '.join(LABELS)}")
    ra = pooled_files(paths.split("+"))
    check_setup(ra, r, paths)
    trained = [v for v in ra["variants"] if v not in ("teacher", "phase1")]
    if len(trained) != 1:
        raise ValueError(f"{paths}: --alias needs runs of one variant, found {', '.join(trained) or 'none'}")
    variant = trained[0]
    if vars(extension_args(ra["setup"], variant)) != vars(extension_args(r["setup"], name)):
        raise ValueError(f"{paths}: {variant} with --flags '{ra['setup']['flags']}' is not {name}'s extension phase")
    r["cells"].update({f"{name}-s{ablate.run_key(k)[1]}": c for k, c in ra["cells"].items() if ablate.run_key(k)[0] == variant})


def summarise(default, also=(), attention=None, untimed=(), aliases=()):
    r = pooled_files(default)
    for spec in aliases:
        add_alias(r, spec)
    roads = [road(v, LABELS[v], r, v, untimed) for v in LABELS if ablate.seed_cells(r["cells"], v)]
    for path in also:  # another teacher or phase 1: theirs first, then the file's roads
        ra, stem = load(path), os.path.splitext(os.path.basename(path))[0]
        own = {"teacher": f"its teacher (trained at {ra['setup']['teacher']['window']} tokens)",
               "phase1": f"its phase 1 (documents <= {ra['setup']['short_len']} tokens)"}
        roads += [road(f"{stem}/{v}", own.get(v, LABELS[v]), ra, v) for v in dict.fromkeys(("teacher", "phase1", *ra["variants"]))]
    if attention:
        att = load(attention)["models"]
        for x in roads:
            x["needle_attention_by_distance"] = att.get(x["name"], {}).get("by_distance")
    base = next(x for x in roads if x["name"] == "phase1")
    return {"files": [*default, *also], "attention_file": attention,
            "commands": [load(p)["command"] for p in (*default, *also)],
            "untimed": list(untimed), "machine": r["machine"], "cpu": r.get("cpu"), "setup": {k: r["setup"][k] for k in ("short_len", "window", "steps", "batch", "prompts_per_cell")},
            "phase1_short_text_loss": base["short_text_loss"], "phase1_short_passkey_acc": base["short_passkey_acc"],
            "roads": roads}


def load(path):
    with open(path) as fh:
        return json.load(fh)


def plot(s, png):
    """Every road by key distance, one panel per haystack (mean over seeds, bars = min..max)."""
    plt = eval_retrieval.pyplot()
    if plt is None:
        return
    fig, axes = plt.subplots(1, 2, figsize=(14, 4.2), sharey=True)
    keys = [f"{lo}-{hi}" for lo, hi in BUCKETS]
    for ax, key, title in ((axes[0], "acc", "the eval's filler haystack"), (axes[1], "text_acc", "held-out text haystack")):
        for i, x in enumerate(x for x in s["roads"] if not x["name"].endswith("-control")):
            mean = np.array([np.nan if x[f"{key}_by_distance"][k] is None else x[f"{key}_by_distance"][k] for k in keys])
            lo, hi = (np.array([np.nan if x[f"{key}_range"][k] is None else x[f"{key}_range"][k][j] for k in keys]) for j in (0, 1))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ax.errorbar(np.arange(4) + (i - len(s["roads"]) / 2) * 0.03, mean, yerr=np.clip([mean - lo, hi - mean], 0, None),
                            marker="o", capsize=3, label=f"{x['name']} ({x['seeds']})", color=plt.cm.tab20(2 * i % 20 + 2 * i // 20),
                            linestyle="--" if x["name"] in ("teacher", "phase1", "ce-long") else ":" if "/" in x["name"] else "-")
        ax.set_xticks(range(4), keys)
        ax.set(xlabel="key distance (tokens)", title=title, ylim=(-0.05, 1.05))
    axes[0].set_ylabel("passkey exact match")
    axes[1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))  # beside the panels: many roads
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    print(f"figure -> {png}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("default", nargs="+", help="tools/ablate.py results of the default teacher and phase 1 (several: pooled)")
    p.add_argument("--also", nargs="*", default=[], help="further ablate results files, each variant a road")
    p.add_argument("--alias", nargs="*", default=[], help="ROAD=A.json[+B.json]: ablate runs of one variant with --flags "
                   "that make the named variant ROAD (checked), e.g. pose-far-ce=pose_ce_runs.json")
    p.add_argument("--attention", default=None, help="a tools/long_range.py --attention file (model names = road names)")
    p.add_argument("--untimed", default="", help="cells (NAME-sK) whose recorded training time is incomplete (a run killed "
                   "and resumed before checkpoints kept their time): left out of the minutes per run")
    p.add_argument("--out", required=True, help="summary JSON (and a figure beside it, .png)")
    args = p.parse_args(argv)
    aliased = [p for a in args.alias for p in a.partition("=")[2].split("+")]
    for path in [*args.default, *args.also, *aliased, *([args.attention] if args.attention else [])]:
        if not os.path.isfile(path):
            print(f"error: {path}: no such results file", file=sys.stderr)
            return 2
    try:
        s = summarise(args.default, args.also, args.attention, args.untimed.split(",") if args.untimed else (), args.alias)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    s["command"] = eval_retrieval.command_line("tools/roads.py", argv)
    with open(args.out, "w") as fh:
        json.dump(s, fh, indent=1)
    print(f"-> {args.out}")
    for x in s["roads"]:
        print(f"{x['name']:<28} filler " + " / ".join(f2(v) for v in x["acc_by_distance"].values()) +
              "   text " + " / ".join(f2(v) for v in x["text_acc_by_distance"].values()) +
              f"   reach {x['reach']}   short loss {x['short_text_loss']:.3f}   passkey@{x['short_len']} {x['short_passkey_acc']:.2f}")
    plot(s, os.path.splitext(args.out)[0] + ".png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
