"""
The paper's three findings (arXiv 2604.06070) at today's default, each over seeds and, where it needs one,
against a control, each with a verdict: reproduced, not reproduced or reversed.

    python tools/findings.py        # -> results/analyses/summary.json, query_updates.json/.png, perturbation.json/.png

It reads the runs that tools/ablate.py leaves in runs/roads (the same teacher out/phase0.pt and phase 1
out/phase1.pt for all):
    python tools/ablate.py --seeds 3 --out runs/roads                                   # the roads
    python tools/ablate.py --variants kd-control,ce-control --seeds 2 --out runs/roads  # the controls
    python tools/ablate.py --variants kd-phasewise,kd-fixed,kd-pi,kd-ntk,kd-yarn --seeds 2 --out runs/roads \\
        --results results/analyses/rope_schedules.json                                 # finding 1's schedules

finding 1 -- "phase-wise RoPE scaling gives the best long-context result in KD".  The KD extension under
    each base schedule, passkey exact match by key distance (seed mean, min-max).  Score: key distance
    128-512.  Reproduced when a phase-wise rule (a new base per window: bound, phasewise) scores highest
    and its worst seed beats the best seed of every other rule; reversed when another rule does so; else
    (the seed ranges overlap) not reproduced.
finding 2 -- "positional perturbations of q/k travel through the layers to the logits" (so into the soft
    targets).  analyze.py perturb on the paper's input (packed repeated text) and on the student's packed
    short documents, for the teacher, phase 1 and every road's students.  Reproduced when, for the
    teacher on packed repeated text at a shift of 16 positions, the KL at the output is >= 0.01
    nats/token and the residual change after the last layer is at least that after the first.  Beside
    it: the output's KL by the distance of a perturbed 32-token span (its keys moved 16 positions) --
    how far back the teacher's soft targets still carry position.
finding 3 -- "the extension updates the query states in a structured way".  analyze.py updates from phase
    1 to each road's student, MINUS the same from phase 1 to its control (kd-control for the KD roads,
    ce-control for the CE ones: the same steps at phase 1's window and base), seed by seed.  Reproduced
    for a road when one band of RoPE pairs moves most beyond the control in every seed, by more than
    any other band in any seed, and by > 0; reversed when every band moves less than in the control in
    every seed; else not reproduced.  The finding's verdict is the KD road's.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import analyze  # noqa: E402
import roads  # noqa: E402
from ablate import checkpoint, eval_retrieval  # noqa: E402

ROADS = ("kd", "pose-kd", "ce", "pose-ce", "ce-long")
CONTROL = {"kd": "kd-control", "pose-kd": "kd-control", "ce": "ce-control", "pose-ce": "ce-control", "ce-long": "ce-control"}
SCHEDULES = {"kd": "bound", "kd-phasewise": "phasewise", "kd-fixed": "fixed", "kd-pi": "pi", "kd-ntk": "ntk", "kd-yarn": "yarn"}
PHASEWISE = ("bound", "phasewise")  # the rules that choose a new base for every window
SCORE = ((128, 256), (256, 512))
DELTAS = (1.0, 4.0, 16.0, 64.0)
SPAN = dict(start=32, span=32, target="k", delta=16.0)


def spread(values):
    """{mean, min, max} of per-seed values (lists: element-wise)."""
    a = np.asarray(values, dtype=float)
    return {"mean": a.mean(0).tolist(), "min": a.min(0).tolist(), "max": a.max(0).tolist()}


def schedule_verdict(score):
    """(verdict of finding 1, best rule) from each rule's per-seed score spread."""
    if len(score) < 2:
        raise ValueError(f"finding 1 compares base schedules: {len(score)} found in the --schedules files")
    best = max(score, key=lambda k: score[k]["mean"])
    if not all(score[best]["min"] > s["max"] for k, s in score.items() if k != best):
        return "not reproduced", best  # the best rule's lead is within the seed spread
    return ("reproduced" if best in PHASEWISE else "reversed"), best


def band_verdict(band):
    """(verdict of finding 3 for one road, top band per seed) from the change beyond the control [seeds, bands]."""
    band = np.asarray(band)
    top = [int(np.argmax(b)) for b in band]
    others = [j for j in range(band.shape[1]) if j != top[0]]
    if len(set(top)) == 1 and band[:, top[0]].min() > max(band[:, others].max(), 0):
        return "reproduced", top
    return ("reversed" if (band < 0).all() else "not reproduced"), top


# ---- finding 1 -------------------------------------------------------------------------------

def finding1(paths, ckpt):
    """ckpt(variant, seed): a run's checkpoint, whose RoPE (rule, base, scale) the table names."""
    r = roads.pooled_files(paths)
    rows, score = [], {}
    for variant, rule in SCHEDULES.items():
        cells = roads.ablate.seed_cells(r["cells"], variant)
        if not cells:
            continue
        row = roads.road(variant, rule, r, variant)
        per_seed = [roads.long_range.pooled([c], SCORE[0][0], SCORE[-1][1]) for c in cells]
        score[rule] = spread(per_seed)
        first = next(seed for variant_, seed in map(roads.ablate.run_key, r["cells"]) if variant_ == variant)
        rows.append({"rule": rule, "variant": variant, "seeds": row["seeds"], "rope": checkpoint.load(ckpt(variant, first))["model_config"]["rope"],
                     "acc_by_distance": row["acc_by_distance"],
                     "acc_range": row["acc_range"], "text_acc_by_distance": row["text_acc_by_distance"],
                     "reach": row["reach"], "score_128_512": score[rule]})
    ce_long = roads.road("ce-long", "bound", r, "ce-long") if roads.ablate.seed_cells(r["cells"], "ce-long") else None
    verdict, best = schedule_verdict(score)
    return {"verdict": verdict, "seeds": min(x["seeds"] for x in rows), "best_rule": best,
            "score": f"passkey exact match at key distance {SCORE[0][0]}-{SCORE[-1][1]}, per seed", "rules": rows,
            "ce_long_bound": None if ce_long is None else {"acc_by_distance": ce_long["acc_by_distance"],
                                                            "acc_range": ce_long["acc_range"], "seeds": ce_long["seeds"]},
            "files": paths}


# ---- finding 2 -------------------------------------------------------------------------------

def perturbations(model, vocab, inputs, short):
    """analyze.py perturb on each input: the q-shift trace by delta, and the span's KL by distance."""
    out = {}
    for name, ids in inputs.items():
        idx = torch.from_numpy(vocab(ids))
        trace = analyze.perturbation_trace(model, idx, list(DELTAS), target="q")
        span = analyze.perturbation_trace(model, idx, [SPAN["delta"]], target=SPAN["target"], start=SPAN["start"],
                                          span=SPAN["span"], buckets=eval_retrieval.distance_buckets(short, idx.shape[1]))[0]
        out[name] = {"kl": [r["kl"] for r in trace], "kl_by_quarter": [r["kl_by_quarter"] for r in trace],
                     "resid": [[x["resid"] for x in r["layers"]] for r in trace],
                     "kl_by_distance": span["kl_by_distance"]}
    return out


def finding2(models, corpus_dir, window, samples):
    corpus = analyze.data.load_corpus(corpus_dir)
    packed, short = analyze.packed_documents(corpus, window, samples)
    inputs = {"repeated": analyze.repeated_text(corpus, 32, window, samples), "documents": packed}
    per = {}
    for name, paths in models.items():
        runs = []
        for p in paths:
            model, vocab, _ = checkpoint.load_model(p)
            runs.append(perturbations(model, vocab, inputs, short))
        per[name] = {inp: {k: spread([run[inp][k] for run in runs]) if k != "kl_by_distance" else
                           {b: spread([run[inp][k][b] for run in runs]) for b in runs[0][inp][k]}
                           for k in runs[0][inp]} for inp in inputs}
        per[name]["seeds"] = len(paths)
    t = per["teacher"]["repeated"]
    i16 = DELTAS.index(16.0)
    kl16, resid16 = t["kl"]["mean"][i16], t["resid"]["mean"][i16]
    ok = kl16 >= 0.01 and resid16[-1] >= resid16[0]
    return {"verdict": "reproduced" if ok else "not reproduced",
            "seeds": min(x["seeds"] for k, x in per.items() if k not in ("teacher", "phase1")),
            "teacher_kl_shift16": kl16, "teacher_resid_by_layer_shift16": resid16,
            "input": {"window": window, "samples": samples, "repeated_period": 32, "documents_up_to": short},
            "deltas": list(DELTAS), "span": SPAN, "models": per}


# ---- finding 3 -------------------------------------------------------------------------------

def finding3(before, ckpts, seeds, corpus_dir, samples, n_bands):
    m0, v0, c0 = checkpoint.load_model(before)
    text = analyze.held_out_text(corpus_dir, c0["window"], samples, 0)
    bl = analyze.bands(m0.cfg.head_dim // 2, n_bands)

    def tables(path):
        m, v, _ = checkpoint.load_model(path)
        t = analyze.update_tables(analyze.update_analysis(m0, m, torch.from_numpy(v0(text)), torch.from_numpy(v(text))), bl)
        return {"band": t["band"]["q"], "per_pair": t["per_pair"]["q"], "layer_pair": t["layer_pair"]["q"],
                "W_q_per_pair": t["per_pair"]["W_q"], "W_k_per_pair": t["per_pair"]["W_k"]}

    control = {(c, s): tables(ckpts(c, s)) for c in sorted(set(CONTROL.values())) for s in seeds}
    per, profiles = {}, {}
    for road in ROADS:
        runs = [(tables(ckpts(road, s)), control[CONTROL[road], s]) for s in seeds]
        ex = {k: [a[k] - c[k] for a, c in runs] for k in ("band", "per_pair", "layer_pair", "W_q_per_pair", "W_k_per_pair")}
        verdict, top = band_verdict(ex["band"])
        mean_pair = np.mean(ex["per_pair"], 0)
        profiles[road] = mean_pair
        per[road] = {"control": CONTROL[road], "verdict": verdict, "top_band_per_seed": top,
                     "band_change": spread([a["band"] for a, _ in runs]), "band_control": spread([c["band"] for _, c in runs]),
                     "band_excess": spread(ex["band"]), "pair_excess": spread(ex["per_pair"]),
                     "layer_pair_excess": spread(ex["layer_pair"]), "W_q_pair_excess": spread(ex["W_q_per_pair"]),
                     "W_k_pair_excess": spread(ex["W_k_per_pair"]),
                     "top_pairs": [int(i) for i in np.argsort(-mean_pair)[:8]]}
    m_kd = checkpoint.load_model(ckpts("kd", seeds[0]))[0]
    wl_before, wl_after = analyze.rope.wavelengths(m0.inv_freq).tolist(), analyze.rope.wavelengths(m_kd.inv_freq).tolist()
    kd = per["kd"]
    lo, hi = bl[kd["top_band_per_seed"][0]]
    return {"verdict": kd["verdict"], "seeds": len(seeds), "control": {r: CONTROL[r] for r in ROADS},
            "bands": bl, "wavelength_before": wl_before, "wavelength_after": wl_after,
            "kd_top_band": {"pairs": [lo, hi - 1], "wavelength_before": [wl_before[lo], wl_before[hi - 1]],
                            "wavelength_after": [wl_after[lo], wl_after[hi - 1]]},
            "kd_vs_ce_long_pair_correlation": float(np.corrcoef(profiles["kd"], profiles["ce-long"])[0, 1]),
            "text": {"samples": samples, "length": c0["window"]}, "roads": per}


# ---- figures and main ------------------------------------------------------------------------

def save_updates_png(path, f3):
    plt = eval_retrieval.pyplot()
    if plt is None:
        return
    grids = {r: np.array(x["layer_pair_excess"]["mean"]) for r, x in f3["roads"].items()}
    lim = max(abs(g).max() for g in grids.values())
    fig, axes = plt.subplots(len(grids) + 1, 1, figsize=(8, 1.3 * len(grids) + 2.6), squeeze=False)
    for ax, (road, g) in zip(axes[:, 0], grids.items()):
        im = ax.imshow(g, cmap="RdBu_r", vmin=-lim, vmax=lim, aspect="auto", origin="lower")
        ax.set_yticks(range(g.shape[0]), [f"L{i}" for i in range(g.shape[0])], fontsize=7)
        ax.set_xticks([])
        ax.set_title(f"{road}: query-state change beyond {f3['control'][road]} (seed mean)", fontsize=8)
        fig.colorbar(im, ax=ax, pad=0.01)
    ax = axes[-1, 0]
    for road, x in f3["roads"].items():
        ax.plot(x["pair_excess"]["mean"], marker=".", label=road)
    ax.axhline(0, color="k", lw=0.5)
    wl = f3["wavelength_after"]
    ticks = list(range(0, len(wl), 4))
    ax.set_xticks(ticks, [f"{i}\n{wl[i]:.0f}" for i in ticks], fontsize=6)
    ax.set_xlabel("RoPE pair (fast -> slow); wavelength in tokens after the extension", fontsize=7)
    ax.set_ylabel("beyond control", fontsize=7)
    ax.legend(fontsize=6, ncol=5)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"figure -> {path}")


def save_perturbation_png(path, f2):
    plt = eval_retrieval.pyplot()
    if plt is None:
        return
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.2))
    i16 = f2["deltas"].index(16.0)
    for name, x in f2["models"].items():
        resid = x["repeated"]["resid"]["mean"][i16]
        a.plot(range(len(resid)), resid, marker="o", label=name)
        kd = x["documents"]["kl_by_distance"]
        b.plot([k.replace("-513", "-512") for k in kd], [v["mean"] for v in kd.values()], marker="o", label=name)
    a.set_xticks(range(len(resid)), [f"layer {i}" for i in range(len(resid))], fontsize=7)
    a.set_ylabel("rel. change of residual (q shifted 16)", fontsize=7)
    a.set_title("packed repeated text", fontsize=8)
    b.set_yscale("log")
    b.set_xlabel("distance from the perturbed span (tokens)", fontsize=7)
    b.set_ylabel("KL at the output, nats/token", fontsize=7)
    b.set_title("packed short documents: a 32-token span's keys moved 16", fontsize=8)
    b.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"figure -> {path}")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", default="runs/roads", help="folder of the roads' and controls' runs (NAME-sSEED/phase2.pt)")
    p.add_argument("--teacher", default="out/phase0.pt")
    p.add_argument("--init", default="out/phase1.pt", help="the phase-1 student every run started from")
    p.add_argument("--seeds", default="0,1", help="seeds of the roads and controls compared")
    p.add_argument("--schedules", default="results/roads/default_teacher_packed.json,results/analyses/rope_schedules.json",
                   help="ablate files with kd (the bound rule) and the kd-<rule> variants, pooled")
    p.add_argument("--data", default=None, help="folder of .txt files (default: the Shakespeare corpus)")
    p.add_argument("--samples", type=int, default=16, help="held-out texts / windows per analysis")
    p.add_argument("--bands", type=int, default=4)
    p.add_argument("--out", default="results/analyses", help="folder of summary.json and the detailed files")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    ckpt = lambda name, s: os.path.join(args.runs, f"{name}-s{s}", "phase2.pt")  # noqa: E731
    missing = [p for p in [args.teacher, args.init] + [ckpt(n, s) for n in (*ROADS, *set(CONTROL.values())) for s in seeds]
               if not os.path.exists(p)]
    if missing:
        sys.exit(f"error: {len(missing)} checkpoints missing, first {missing[0]} (train them: see --help)")
    command = eval_retrieval.command_line("tools/findings.py", argv)
    with torch.no_grad():  # a context, not a global switch: tests call main() in their own process
        return run(args, seeds, ckpt, command)


def run(args, seeds, ckpt, command):
    f1 = {**finding1(args.schedules.split(","), ckpt), "phase1_rope": checkpoint.load(args.init)["model_config"]["rope"]}
    models = {"teacher": [args.teacher], "phase1": [args.init], **{r: [ckpt(r, s) for s in seeds] for r in ROADS}}
    f2 = finding2(models, args.data, checkpoint.load(args.teacher)["window"], args.samples)
    f3 = finding3(args.init, ckpt, seeds, args.data, args.samples, args.bands)
    os.makedirs(args.out, exist_ok=True)
    analyze.write_json(os.path.join(args.out, "perturbation.json"), {"command": command, **f2})
    analyze.write_json(os.path.join(args.out, "query_updates.json"), {"command": command, **f3})
    slim = lambda f: {k: v for k, v in f.items() if k not in ("models", "roads")}  # noqa: E731
    analyze.write_json(os.path.join(args.out, "summary.json"), {
        "command": command, "machine": checkpoint.load(ckpt("kd", seeds[0])).get("machine"),
        "finding1": f1, "finding2": slim(f2), "finding3": {**slim(f3), "by_road": {
            r: {k: x[k] for k in ("control", "verdict", "top_band_per_seed", "band_excess", "top_pairs")} for r, x in f3["roads"].items()}}})
    save_updates_png(os.path.join(args.out, "query_updates.png"), f3)
    save_perturbation_png(os.path.join(args.out, "perturbation.png"), f2)
    for k, f in (("finding1", f1), ("finding2", f2), ("finding3", f3)):
        print(f"{k}: {f['verdict']} ({f['seeds']} seeds)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
