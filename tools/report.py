"""
Every results table of the docs, rendered from the file it reports, so that no number is typed by hand.

    python tools/report.py           # rewrite every table between its markers
    python tools/report.py --check   # name the tables that differ from their files, exit 1 (tests/test_docs.py)

In a Markdown file a table stands between `<!-- table: NAME -->` and `<!-- /table -->`, NAME a key of TABLES
(a function of no arguments that returns the Markdown).  A results folder's README holds, between
`<!-- commands -->` and `<!-- /commands -->`, the stored `command` of every JSON file in that folder: its
commands of record, exactly as the file holds them.  Accuracies are passkey exact match, "mean (min-max)"
over the seeds of a variant (one number where the seeds agree); key-distance ranges are absolute tokens.
"""

import argparse
import glob
import json
import os
import re
import sys
from fractions import Fraction

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import ablate  # noqa: E402
import long_range  # noqa: E402
import roads as roads_tool  # noqa: E402  (the tool; `roads` below is its table)
from ablate import data, distill, eval_retrieval  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = ["README.md", "tools/README.md", "results/README.md", *sorted(glob.glob("results/*/README.md", root_dir=ROOT))]
BUCKETS = ("0-64", "64-128", "128-256", "256-512")
BOUNDS = [tuple(map(int, b.split("-"))) for b in BUCKETS]  # (lo, hi) of each, as eval_retrieval.by_distance takes them


def load(path, _cache={}):
    if path not in _cache:
        with open(os.path.join(ROOT, path)) as fh:
            _cache[path] = json.load(fh)
    return _cache[path]


def f2(x):
    return "-" if x is None else f"{x:.2f}"


def per_seed(path, variant, rng):
    """One accuracy per seed of `variant` in an ablate results file, over key distances rng = 'lo-hi'."""
    r = load(path)
    lo, hi = map(int, rng.split("-"))
    out = []
    for cell in ablate.seed_cells(r["cells"], variant):
        if "distance_correct" in cell:
            out.append(long_range.pooled([cell], lo, hi))
        else:  # files from before every prompt was kept: only the ranges their own buckets cover
            out.append(long_range.legacy(cell, lo, hi, r["setup"]["short_len"]))
    return out


def acc(path, variant, *ranges, bold=()):
    """'a / b / c': the seed spread of `variant` over each key-distance range; ranges in `bold` in bold."""
    parts = []
    for rng in ranges:
        s = ablate.spread(per_seed(path, variant, rng))
        parts.append(re.sub(r"^([-0-9.]+)", r"**\1**", s) if rng in bold else s)
    return " / ".join(parts)


def seeds(path, variant):
    return len(ablate.seed_cells(load(path)["cells"], variant))


def markdown(header, rows):
    return "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header), *("| " + " | ".join(r) + " |" for r in rows)])


# ---- README -----------------------------------------------------------------------------------

def quickstart():
    """The Quickstart's side-by-side eval (eval_retrieval.py --json), its prompts, machine and wall times."""
    r = load("results/default_run/quickstart.json")
    b = r["distance_buckets"]
    lines = [f"{'model':<24}" + "".join(f"{x:>12}" for x in b)]
    for name, m in r["models"].items():
        lines.append(f"{name:<24}" + "".join(f"{f2(m['acc_by_distance'][x]):>12}" for x in b))
    t = [m["train_time_s"] / 60 for m in r["models"].values()]
    on = r["evaluated_on"]
    return ("```\n" + "\n".join(lines) + "\n```\n\n" +
            f"{r['n']} prompts per (length, depth) cell; {on['cores']} cores of an {on['cpu']}, {on['threads']} threads, "
            f"torch {on['torch']}. Training wall times kept in the checkpoints: teacher {t[0]:.1f} min, phase 1 {t[1]:.1f} "
            f"min, phase 2 {t[2]:.1f} min.")


def roads(also=False, only=None):
    """The roads from short data to the long window (tools/roads.py -> results/roads/summary.json): those from the
    default teacher and phase 1 (only: those named), or (also) those of another setup, named FILE/VARIANT."""
    r = load("results/roads/summary.json")
    rows, chosen = [], [x for x in r["roads"] if not x["name"].endswith("-control") and ("/" in x["name"]) == also
                        and (only is None or x["name"] in only)]
    for road in chosen:
        def cell(key, rng):  # a bucket no prompt fell into has mean and range None
            mean, span = road[key][rng], road[key.replace("acc_by_distance", "acc_range")][rng]
            return "-" if mean is None else ablate.mean_range(mean, *span)
        rows.append([road["label"], str(road["seeds"]),
                     " / ".join(cell("acc_by_distance", b) for b in BUCKETS),
                     " / ".join(cell("text_acc_by_distance", b) for b in BUCKETS),
                     str(road["reach"]), f2(road["short_text_loss"]), f2(road["short_passkey_acc"]),
                     *(("-", "-") if road["tokens"] is None else
                       (f"{road['tokens'] / 1e6:.1f} M", f"{road['attention_gflop_per_step']:.1f}")),
                     "-" if road["wall_min"] is None else f"{road['wall_min']:.1f}"])
    return markdown(["road", "seeds", "filler haystack: 0-64 / 64-128 / 128-256 / 256-512",
                     "held-out text haystack: the same", "reach (filler)", "short text loss",
                     f"passkey at {chosen[0]['short_len']}",
                     "tokens trained", "attention GFLOP / step", "minutes per run"], rows)


def roads_headline():
    """The roads `python tools/ablate.py` runs, with the teacher and phase 1."""
    return roads(only=("teacher", "phase1", *ablate.HEADLINE))


def roads_strongest():
    return roads(also=True)


def roads_price():
    """The short-context price of each road beside what the same steps without an extension do (the controls)."""
    r = load("results/roads/summary.json")
    q = lambda x: " / ".join(f"{v:.2f}" for v in x["text_loss_by_quarter"])  # noqa: E731
    return markdown(["model", "seeds", "held-out loss over 64-token windows", "passkey at length 64",
                     "held-out loss by quarter of the 512 window"],
                    [[x["label"], str(x["seeds"]), f2(x["short_text_loss"]), f2(x["short_passkey_acc"]), q(x)]
                     for x in r["roads"] if x["name"] != "teacher" and "/" not in x["name"]])


def run_of(name):
    """An eval file's model name -> (run folder, variant): OUT/VARIANT-sK/phase2.pt -> (OUT, VARIANT); the teacher's
    and phase 1's checkpoints (phase0.pt, phase1.pt) -> ("", "teacher"), ("", "phase1")."""
    base, run = os.path.basename(name), os.path.dirname(name)
    if base in ("phase0.pt", "phase1.pt"):
        return "", {"phase0.pt": "teacher", "phase1.pt": "phase1"}[base]
    return os.path.dirname(run), ablate.run_key(os.path.basename(run))[0]


def by_road(path, measure):
    """An eval_retrieval.py --json file of the roads' checkpoints, grouped by road (phase0.pt: the teacher, phase1.pt:
    phase 1, ROAD-sK/phase2.pt: seed K of ROAD): {road: [measure(records) per seed]}."""
    out = {}
    for name, m in load(path)["models"].items():
        out.setdefault(run_of(name)[1], []).append(measure(m["records"]))
    return out


def seed_spreads(per_seed, keys):
    """'a / b / ...': the seed spread of each key over a road's per-seed dicts (by_road's lists)."""
    return " / ".join(ablate.spread([x[k] for x in per_seed]) for k in keys)


def in_window(path):
    return by_road(path, lambda recs: eval_retrieval.by_distance(recs, BOUNDS))


def roads_in_window():
    """Every road at prompts of exactly its 512-token window, the needle anywhere in it, both haystacks."""
    rows = []
    for stem in ("", "strongest_"):
        filler, text = (in_window(f"results/roads/{stem}in_window_{h}.json") for h in ("filler", "text"))
        # the strongest configuration's file: its own teacher, window read from the file, and its own phase 1
        w = next(m["window"] for n, m in load(f"results/roads/{stem}in_window_filler.json")["models"].items()
                 if os.path.basename(n) == "phase0.pt")
        own = {"teacher": f"its teacher (trained at {w} tokens)", "phase1": "its phase 1 (documents <= 128 tokens)"}
        for road, seeds in filler.items():
            label = roads_tool.LABELS[road] if not stem else own.get(road, f"{roads_tool.LABELS[road]} ({w}-token teacher)")
            cells = [seed_spreads(hay[road], BUCKETS) for hay in (filler, text)]
            rows.append([label, str(len(seeds)), *cells])
    return markdown(["road", "seeds", "filler haystack: 0-64 / 64-128 / 128-256 / 256-512", "held-out text haystack: the same"], rows)


def roads_near_key():
    """The key 21-25 tokens before the question (depth 1) at every prompt length: the prompt's length alone."""
    lengths = load("results/roads/near_key_by_length_filler.json")["lengths"]
    per_hay = [by_road(f"results/roads/near_key_by_length_{h}.json",
                       lambda recs: {L: eval_retrieval.accuracy(recs, length=L) for L in lengths}) for h in ("filler", "text")]
    rows = [[roads_tool.LABELS[road], str(len(seeds)), *(seed_spreads(hay[road], lengths) for hay in per_hay)]
            for road, seeds in per_hay[0].items()]
    head = " / ".join(map(str, lengths))
    return markdown(["road", "seeds", f"filler haystack, prompt length {head}", "held-out text haystack: the same"], rows)


def roads_rows():
    """PoSE's row length, seed 0 of each: how far one document can span, and what a longer row adds."""
    rows = []
    for path, prefix in (("default_teacher_pose.json", "pose-"), ("rows_probe_128.json", "pose-"), ("rows_probe_256.json", "pose-"),
                         ("rows_probe_64_256.json", "pose-"), ("default_teacher_pose_rows.json", "pose-rows-")):
        r = load(f"results/roads/{path}")
        setup = r["setup"]
        lens = distill.pose_lens(roads_tool.extension_args(setup, f"{prefix}ce"))  # as the runs trained
        longest = max(data.pose_span(setup["short_len"], R, setup["window"]) for R in lens)
        cells = [r["cells"].get(f"{prefix}{loss}-s0") for loss in ("ce", "kd")]
        rows.append([" or ".join(map(str, lens)) + (", one per step" if len(lens) > 1 else ""), str(longest),
                     *(" / ".join(f2(long_range.pooled([c], lo, hi, src)) for lo, hi in BOUNDS) if c else "-"
                       for c in cells for src in ("distance_correct", "text_distance_correct"))])
    return markdown(["PoSE rows (tokens)", "longest distance inside a document", "CE: filler, 0-64 / 64-128 / 128-256 / 256-512",
                     "CE: held-out text", "KD: filler", "KD: held-out text"], rows)


ROW_MIXES = (("default_teacher_packed.json+ce_long_seed3_4.json", "ce-long"), ("default_teacher_pose.json", "pose-ce"),
             ("rows_mix_64_64_64_64_128.json", "pose-ce"), ("rows_mix_64_64_64_128.json", "pose-ce"),
             ("rows_mix_64_64_128.json", "pose-ce"), ("default_teacher_pose_rows.json", "pose-rows-ce"),
             ("rows_mix_64_96.json", "pose-ce"),
             ("rows_reach_64_64_128.json+rows_reach_64_64_128_seed3_4.json", "pose-ce"), ("rows_reach_128.json", "pose-ce"),
             ("rows_reach_64_64_256.json", "pose-ce"), ("rows_reach_64_256.json+rows_reach_64_256_seed3_4.json", "pose-ce"),
             ("rows_reach_64_256_kd.json", "pose-kd"), ("no_filler_ce_long.json", "ce-long"), ("no_filler_rows_reach.json", "pose-ce"))
WINDOW_EVALS = ("in_window", "rows_mix_in_window", "rows_reach_in_window", "seeds3_4_in_window", "no_filler_in_window",
                "rows256_in_window", "far_kd_in_window")


def row_mixes():
    """(ablate results, variant, its run folder, the extension phase's arguments) of every ROW_MIXES entry;
    "a.json+b.json": more seeds of one configuration, pooled."""
    for path, variant in ROW_MIXES:
        r = roads_tool.pooled_files([os.path.join(ROOT, "results", "roads", p) for p in path.split("+")])
        yield r, variant, re.search(r"--out (\S+)", r["command"])[1], roads_tool.extension_args(r["setup"], variant)


def rows_drawn(ext):
    """The PoSE rows drawn per step and the reach of their ids, e.g. '64 or 256; ids reach 704' (None: long documents)."""
    if ext.data_mode == "long":
        return None
    lens = distill.pose_lens(ext)
    return (", ".join(map(str, lens[:-1])) + " or " * (len(lens) > 1) + str(lens[-1]) +
            (f"; ids reach {ext.pose_reach}" if ext.pose_reach else "") + ("; KD" if distill.uses_teacher(ext, 2) else ""))


def roads_mix():
    """CE on skipped positions by how often a step draws rows of one document (only they span the far keys) rather
    than longer rows (only they hold a long prompt's worth of tokens); CE on long documents first, as the target."""
    at_window = {"filler": {}, "text": {}}  # (OUT, VARIANT) -> 256-512 per seed, from checkpoints OUT/VARIANT-sK/phase2.pt
    for hay, by_run in at_window.items():
        for f in WINDOW_EVALS:
            for name, m in load(f"results/roads/{f}_{hay}.json")["models"].items():
                by_run.setdefault(run_of(name), []).append(eval_retrieval.by_distance(m["records"], BOUNDS)[BUCKETS[-1]])
    rows = []
    for r, variant, out, ext in row_mixes():
        setup, x = r["setup"], roads_tool.road(variant, "", r, variant)
        lens = distill.pose_lens(ext)
        share = "-" if variant == "ce-long" else str(Fraction(lens.count(setup["short_len"]), len(lens)))
        window = [ablate.spread(at_window[hay].get((out, variant), [])) for hay in ("filler", "text")]
        far = lambda key: " / ".join(ablate.mean_range(x[key + "acc_by_distance"][b], *x[key + "acc_range"][b])  # noqa: E731
                                     for b in BUCKETS[2:])
        rows.append([rows_drawn(ext) or "long documents (CE on long documents)", share,
                     f"{ext.passkey_frac * ext.filler_frac:.0%}", str(x["seeds"]), far(""), far("text_"), " / ".join(window),
                     f2(x["short_text_loss"]), f2(x["short_passkey_acc"]), f2(x["text_loss_by_quarter"][-1]), f"{x['wall_min']:.1f}"])
    return markdown(["rows drawn per step (tokens)", "steps of one-document rows", "documents in the eval's filler format", "seeds", "filler: 128-256 / 256-512",
                     "held-out text: 128-256 / 256-512", f"{setup['window']}-token prompts, 256-512: filler / text", "short text loss",
                     f"passkey at {setup['short_len']}", "loss, the window's last quarter", "minutes per run"], rows)


def roads_span():
    """Keys 256-511 positions back, the question at the window's last id, behind fewer tokens: prompts of 64-512
    tokens whose ids skip the rest of the window inside the haystack (eval_retrieval.py --span)."""
    labels = {(out, variant): ("CE on long documents" if ext.data_mode == "long" else
                               f"CE with skipped positions, rows of {rows_drawn(ext)}") +
              ("; no filler-format passkeys" if ext.filler_frac == 0 else "") for _, variant, out, ext in row_mixes()}
    labels[("", "teacher")] = roads_tool.LABELS["teacher"]
    per_hay = []
    for hay in ("filler", "text"):
        f = load(f"results/roads/span_{hay}.json")
        lengths, lo, hi = f["lengths"], *BOUNDS[-1]
        runs = {}
        for name, m in f["models"].items():
            runs.setdefault(run_of(name), []).append({L: eval_retrieval.accuracy(
                [r for r in m["records"] if lo <= r["distance"] < hi], length=L) for L in lengths})
        per_hay.append(runs)
    rows = [[labels[key], str(len(seeds)), *(seed_spreads(runs[key], lengths) for runs in per_hay)]
            for key, seeds in per_hay[0].items()]
    head = " / ".join(map(str, lengths))
    return markdown(["model", "seeds", f"filler, prompt tokens {head} (ids reach {f['span']})", "held-out text: the same"], rows)


def roads_attention():
    """What each road's student does at each distance: retrieval-head attention on the needle (one seed)."""
    r = load("results/roads/summary.json")
    rows = [[x["label"], *(f"{x['needle_attention_by_distance'][b]:.2f}" for b in BUCKETS),
             " / ".join(f2(x["acc_by_distance"][b]) for b in BUCKETS)]
            for x in r["roads"] if x.get("needle_attention_by_distance")]
    return markdown(["model (seed 0)", *BUCKETS, "its passkey exact match (filler, seed mean)"], rows)


def spread():
    """The Quickstart's numbers over runs of other seeds, thread counts and machines (tools/spread.py)."""
    r = load("results/default_run/spread.json")
    sm = r["summary"]
    rows = [[f"seed {x['seed']}, {x['threads']} thread{'s' * (x['threads'] != 1)}, {x['cpu']}", x["scope"].split(":")[0],
             *(f2(x["acc_by_distance"][b]) for b in BUCKETS), "-" if x["reach"] is None else str(x["reach"]),
             "-" if x.get("minutes") is None else f"{x['minutes']:.1f}"] for x in r["runs"]]
    rows.append([f"**all {sm['runs']} runs: mean (min-max)**", "",
                 *(f"{sm[b]['mean']:.2f} ({sm[b]['min']:.2f}-{sm[b]['max']:.2f})" for b in BUCKETS),
                 f"{sm['reach']['min']}-{sm['reach']['max']}", ""])
    return markdown(["run", "what was rerun", *(f"phase 2 at {b}" for b in BUCKETS), "reach", "minutes trained"], rows)


def spread_summary():
    """The spread in one paragraph: phase 2's range per bucket over every run, and where each conclusion holds."""
    r = load("results/default_run/spread.json")
    sm, runs = r["summary"], r["runs"]
    whole = [x for x in runs if x["scope"].startswith("whole")]
    rng = lambda x: f"{x['mean']:.2f} ({x['min']:.2f}-{x['max']:.2f})" if "mean" in x else f"{x['min']:.2f}-{x['max']:.2f}"  # noqa: E731
    def join(xs):  # "0", "0 and 1", "0, 1 and 2"
        xs = [str(x) for x in sorted(set(xs))]
        return xs[0] if len(xs) == 1 else ", ".join(xs[:-1]) + " and " + xs[-1]
    claims = "; ".join(f"{c['claim']}: {c['holds']} of {c['runs']}" for c in sm["claims"])
    return (f"Over {sm['runs']} runs ([spread.json](results/default_run/spread.json): {len(whole)} whole "
            f"runs (seeds {join(x['seed'] for x in whole)} at {join(x['threads'] for x in whole)} threads, "
            f"{len(set(x['cpu'] for x in whole))} machines) and {len(runs) - len(whole)} of the second command alone) phase 2 "
            f"retrieves {rng(sm['0-64'])} inside a document, {rng(sm['64-128'])} one document back, {rng(sm['128-256'])} at "
            f"128-256 and {rng(sm['256-512'])} at 256-512, reach {sm['reach']['min']}-{sm['reach']['max']} tokens; the teacher "
            f"{rng(sm['teacher_256-512'])} at 256-512. Runs where each conclusion holds: {claims}.")


# ---- results/<question>/README ------------------------------------------------------------------

def headline():
    h = "results/headline/"
    rows = [("phase-wise within the bound (`--rope bound`, today's default): 168 → 3,444", "[`../ablation.json`](../ablation.json)",
             "results/ablation.json"),
            ("fixed (`--rope fixed --theta1 1e4`)", "`fixed_base.json`", h + "fixed_base.json"),
            ("the paper's phase-wise reading (`--rope phasewise`): 11 → 94", "`phasewise_paper_reading.json`",
             h + "phasewise_paper_reading.json")]
    return markdown(["RoPE base, phase 1 → extension", "file", "seeds", "`ce-long` (upper reference) at 256-512",
                     "`kd` / `ce` at 256-512", "`kd` / `ce` at 64-256"],
                    [[label, link, str(seeds(p, "kd")), acc(p, "ce-long", "256-512", bold=("256-512",)),
                      acc(p, "kd", "256-512", bold=("256-512",)) + " / " + acc(p, "ce", "256-512"),
                      acc(p, "kd", "64-256", bold=("64-256",)) + " / " + acc(p, "ce", "64-256")] for label, link, p in rows])


def rope_rules():
    rows = [("fixed: 1e4 kept", "kd", "results/headline/fixed_base.json", "`../headline/fixed_base.json`"),
            ("bound: the smallest base meeting the RoPE-base bound per window, 168 → 3,444", "kd", "results/ablation.json",
             "`../ablation.json`"),
            ("YaRN: 1e4 stretched 8x for the 512 window (`kd-yarn`)", "kd-yarn", "results/rope_rules/kd_yarn.json",
             "`kd_yarn.json` / `.png`"),
            ("the paper's phase-wise reading, 11 → 94 (below the bound)", "kd", "results/headline/phasewise_paper_reading.json",
             "`../headline/phasewise_paper_reading.json`")]
    out = []
    for label, kd, p, link in rows:
        ref = acc(p, "ce-long", "64-256", "256-512", bold=("256-512",)) if seeds(p, "ce-long") else "-"
        out.append([label, acc(p, kd, "64-256", "256-512"), ref, f"{link} ({seeds(p, kd)} seeds)"])
    return markdown(["rule, phase 1 → extension", "`kd`", "`ce-long` (upper reference)", "file"], out)


def budget():
    b = "results/budget/"
    rows = [("`kd`, the teacher's mix", "kd", "results/headline/fixed_base.json", b + "kd_3x_steps.json"),
            ("`ce`, the teacher's mix", "ce", "results/headline/fixed_base.json", b + "ce_3x_steps.json"),
            ("`ce-long`, passkey only", "ce-long", "results/data_mix/passkey_only_fixed_base.json",
             b + "ce_long_3x_steps_passkey_only.json")]
    ranges = ("0-64", "64-256", "256-512")
    return markdown(["variant, data", "1,200 steps", "3,600 steps", "file (3,600 steps)"],
                    [[label, f"{acc(p1, v, *ranges)} ({seeds(p1, v)} seeds)", acc(p3, v, *ranges),
                      f"`{os.path.basename(p3)}` ({seeds(p3, v)} seeds)"] for label, v, p1, p3 in rows])


def head_dim():
    rows = [("8 x 16 dims (`--student_heads 8`)", "results/head_dim/ce_long_16dim_heads.json"),
            ("4 x 32 dims (`--student_heads 4`)", "results/head_dim/ce_long_32dim_heads.json"),
            ("2 x 64 dims (`--student_heads 2`, the headline)", "results/headline/fixed_base.json")]
    link = lambda p: f"`{os.path.relpath(p, 'results/head_dim')}`"  # noqa: E731
    return markdown(["heads", "phase 1 in its window", "`ce-long` at 0-64 / 64-256 / 256-512", "file"],
                    [[label, f2(load(p)["summary"]["phase1_window_acc"]),
                      acc(p, "ce-long", "0-64", "64-256", "256-512", bold=("256-512",)),
                      f"{link(p)} ({seeds(p, 'ce-long')} seeds)"] for label, p in rows])


def data_mix():
    d = "results/data_mix/"
    rows = [("passkey only / passkey only, 1e4, 6e-3", d + "passkey_only_fixed_base.json"),
            ("passkey only / passkey only, bound 168 → 3,444", d + "passkey_only_bound_base.json"),
            ("passkey only / teacher's mix, 1e4, 6e-3", d + "ce_long_teacher_mix.json"),
            ("passkey only / teacher's mix, 1e4, 3e-3", d + "ce_long_teacher_mix_lr3e-3.json"),
            ("teacher's mix / teacher's mix, 1e4, 3e-3", "results/headline/fixed_base.json")]
    out = []
    for label, p in rows:
        ref = acc(p, "ce-long", "256-512", bold=("256-512",) if "headline" in p else ()) if seeds(p, "ce-long") else "-"
        kd = f"{acc(p, 'kd', '64-256')} / {acc(p, 'ce', '64-256')}" if seeds(p, "kd") else "-"
        n = max(seeds(p, v) for v in ("kd", "ce-long"))
        out.append([label, f2(load(p)["summary"]["phase1_window_acc"]), ref, kd,
                    f"`{os.path.relpath(p, 'results/data_mix')}` ({n} seed{'s' * (n > 1)})"])
    return markdown(["data (phase 1 / extension), base, lr", "phase 1 in window", "`ce-long` at 256-512", "`kd` / `ce` at 64-256",
                     "file"], out)


def designs():
    rows = [("random.json", "random snippets (none)"), ("same_source.json", "snippets from one play (`--snippets same_source`)"),
            ("repeat.json", "repeated snippets (`--snippets repeat`)"),
            ("consecutive.json", "consecutive pieces of one play (`--snippets consecutive`)"),
            ("text_only.json", "no passkey documents (`--passkey_frac 0`)"), ("tau2.json", "KD temperature 2 (`--temperature 2`)"),
            ("teacher_cross_doc.json", "a teacher trained across packed documents (`--teacher_packing cross_doc`)")]
    out = []
    for f, label in rows:
        png = " / `.png`" if os.path.exists(os.path.join(ROOT, "results/designs", f[:-5] + ".png")) else ""
        out.append([f"`{f}`{png}", label, *(acc("results/designs/" + f, k, "64-256") for k in ("kd", "ce"))])
    return markdown(["file", "design (`--flags`)", "`kd`", "`ce`"], out)


def predecessor_rows(path, labels):
    """The predecessor's rows of one ablate file at key distance 0-64 / 64-256 / 256-512 (tools/README)."""
    bold = {"kd": ("64-256", "256-512"), "ce": ("256-512",), "ce-long": ("256-512",)}
    return markdown(["variant", "key distance 0-64", "64-256", "256-512"],
                    [[label, *acc(path, v, "0-64", "64-256", "256-512", bold=bold.get(v, ())).split(" / ")]
                     for v, label in labels.items()])


def fixed_base_rows():
    return predecessor_rows("results/headline/fixed_base.json", {
        "teacher": "teacher (2x192, base 1e4, window 512)", "phase1": "phase 1 (lower reference)", "kd": "kd (short packed)",
        "ce": "ce (short packed)", "ce-long": "ce-long (upper reference)"})


def bound_base_rows():
    return predecessor_rows("results/ablation.json", {"phase1": "phase 1 (base 168)", "kd": "kd (base 3,444)", "ce": "ce",
                                                      "ce-long": "ce-long"})


def factors():
    """What holds the upper reference back: `ce-long` at key distance 256-512 (seed mean) at a weaker and a stronger
    point of each factor, each point from its own file."""
    def far(label, path):
        s = per_seed(path, "ce-long", "256-512")
        return f"{label}: {sum(s) / len(s):.2f} ({len(s)} seeds)"
    mix, lr3 = "results/headline/fixed_base.json", "results/data_mix/ce_long_teacher_mix_lr3e-3.json"
    text_only = "results/data_mix/passkey_only_fixed_base.json"
    w1, w2 = (f2(load(p)["summary"]["phase1_window_acc"]) for p in (lr3, mix))
    rows = [("data mix", far("passkeys in text only", text_only), far("the teacher's mix", mix),
             "the main one ([results/data_mix/](../results/data_mix/))"),
            ("pre-existing circuit", far(f"phase 1 at {w1} in its window", lr3), far(f"phase 1 at {w2}", mix), "helps"),
            ("head dimension (width 128)", far("8 heads of 16", "results/head_dim/ce_long_16dim_heads.json") + "; "
             + far("4 of 32", "results/head_dim/ce_long_32dim_heads.json"), far("2 heads of 64", mix),
             "does not order the results; the 32-dim phase 1 was the weakest ([results/head_dim/](../results/head_dim/))"),
            ("budget (passkeys only)", far("1200 steps", text_only),
             far("3600 steps", "results/budget/ce_long_3x_steps_passkey_only.json"),
             "more steps do not help ([results/budget/](../results/budget/))"),
            ("RoPE base", far("the paper's phase-wise reading", "results/headline/phasewise_paper_reading.json"),
             far("bound", "results/ablation.json") + "; " + far("fixed 1e4", mix),
             "the base must meet the bound ([results/rope_rules/](../results/rope_rules/))")]
    return markdown(["factor", "weaker point", "stronger point", "reading"], rows)


def teacher_view():
    """What each teacher's soft targets carry on packed data (ablate.transfer_channel): KL of the full window's
    prediction from a document-only one and from the last 64 tokens', by quarter of the window; key probabilities."""
    rows = [("trained document-masked (the old default), old defaults' student data",
             load("results/teacher_view/channel_doc_masked_teacher.json")["random"]),
            ("trained across packed documents (today's default), same data",
             load("results/teacher_view/channel_cross_doc_teacher.json")["random"]),
            ("the headline's teacher, on the headline's student data", load("results/headline/fixed_base.json")["transfer_channel"])]
    out = []
    for label, c in rows:
        a = c["answers"]
        other = f"{a['other_keys_full']:.3f}"
        out.append([label, *(" ".join(f"{c[q][k]:.3f}" for q in ("q1", "q2", "q3", "q4")) for k in ("kl_full_doc", "kl_full_near")),
                    f"{a['own_key_full']:.2f} / {a['own_key_doc']:.2f}",
                    f"{'**' + other + '**' if a['other_keys_full'] > 0.5 else other} / {a['other_keys_doc']:.3f}"])
    return markdown(["teacher", "KL(full ‖ doc)", "KL(full ‖ last 64 tokens)", "p(own key), full / doc",
                     "p(other documents' keys), full / doc"], out)


def bench_cpu():
    """tools/bench.py's sweep: tokens/s of our step and the median [min-max] of the per-round ratios, per window."""
    r = load("results/bench/kd_step_cpu.json")
    ratio = lambda x, bold=False: (f"**{x['median']:.2f}x**" if bold else f"{x['median']:.2f}x") + f" [{x['min']:.2f}-{x['max']:.2f}]"  # noqa: E731
    rows = []
    for w, n in zip(r["config"]["windows"], r["config"]["rows"]):
        x = r["ratios_by_window"][str(w)]
        tok = next(s["tok_s"] for s in r["sweep"] if s["window"] == w and s["variant"] == "ours")
        name = f"{w} x {n}" + {64: " (phase 1)", 256: " (phase 2)"}.get(w, "")
        head = w in r["headline_windows"]
        rows.append([name, f"{tok:,.0f}", ratio(x["ours/naive"]), ratio(x["naive/transformers"]),
                     ratio(x["ours/transformers"], head), f"{x['ceiling']['median']:.2f}x"])
    return markdown(["window x rows", "ours tokens/s", "ours/naive", "naive/transformers", "ours/transformers", "ceiling"], rows)


# ---- results/analyses: the paper's three findings (tools/findings.py) -------------------------

RULES = {"bound": "bound: a new base per window, the smallest meeting the RoPE-base bound",
         "phasewise": "the paper's phase-wise formula as we read it (one turn of the slowest pair per window)",
         "fixed": "fixed: phase 1's base kept", "pi": "PI: phase 1's base, positions interpolated",
         "ntk": "NTK-aware: phase 1's base stretched", "yarn": "YaRN: phase 1's base stretched per band"}


def spread3(x, bold=False):
    """'mean (min-max)' of a findings.spread dict, 2 decimals: one number where min and max print alike."""
    m = f"**{x['mean']:.2f}**" if bold else f"{x['mean']:.2f}"
    return m if f"{x['min']:.2f}" == f"{x['max']:.2f}" else f"{m} ({x['min']:.2f}-{x['max']:.2f})"


def bucket(x, k):
    """A roads-style entry's seed mean (min-max) in key-distance bucket k; '-' without prompts there."""
    r = x["acc_range"][k]
    return "-" if r is None else spread3({"mean": x["acc_by_distance"][k], "min": r[0], "max": r[1]})


def rope_schedules():
    """Finding 1: the KD extension under each base schedule, by key distance; ce-long under the bound beside it."""
    f = load("results/analyses/summary.json")["finding1"]
    rows = []
    for x in f["rules"]:
        base = x["rope"]["theta"] if x["rule"] in ("bound", "phasewise", "fixed") else None
        name = RULES[x["rule"]] + (f", {base:,.0f}" if base else f" x{x['rope']['scale']:g}")
        rows.append([name + f" (`{x['variant']}`)", str(x["seeds"]), *(bucket(x, k) for k in BUCKETS),
                     spread3(x["score_128_512"], bold=x["rule"] == f["best_rule"])])
    c = f["ce_long_bound"]
    if c:
        rows.append(["`ce-long` under the bound (upper reference)", str(c["seeds"]), *(bucket(c, k) for k in BUCKETS), "-"])
    return markdown(["extension schedule (phase 1: bound, base " + f"{f['phase1_rope']['theta']:,.0f})", "seeds", *BUCKETS, "128-512 (score)"], rows)


def query_updates():
    """Finding 3: the query states' change per band beyond the control, per road, with the verdict."""
    f = load("results/analyses/query_updates.json")
    wl0, wl1 = f["wavelength_before"], f["wavelength_after"]
    head = ["road (control)", "verdict"] + [f"pairs {lo}-{hi - 1} ({wl0[lo]:,.0f}-{wl0[hi - 1]:,.0f} → {wl1[lo]:,.0f}-{wl1[hi - 1]:,.0f} tokens)"
                                            for lo, hi in f["bands"]]
    rows = []
    for road, x in f["roads"].items():
        ex, raw = x["band_excess"], x["band_change"]["mean"]
        top = x["top_band_per_seed"][0] if x["verdict"] == "reproduced" else None
        j_raw = int(max(range(len(raw)), key=raw.__getitem__))
        lo, hi = f["bands"][j_raw]
        rows.append([f"`{road}` (`{x['control']}`)", x["verdict"],
                     *(spread3({k: ex[k][j] for k in ex}, bold=j == top) for j in range(len(f["bands"]))),
                     f"pairs {lo}-{hi - 1}: {raw[j_raw]:.2f}"])
    return markdown(head + ["largest change without the control"], rows)


def perturbation():
    """Finding 2: where a positional perturbation reaches, per model (students: seed mean)."""
    f = load("results/analyses/perturbation.json")
    i1, i16 = f["deltas"].index(1.0), f["deltas"].index(16.0)
    rows = []
    for name, x in f["models"].items():
        kl = lambda inp, i: f"{x[inp]['kl']['mean'][i]:.3f}"  # noqa: E731
        resid = x["repeated"]["resid"]["mean"][i16]
        dist = x["documents"]["kl_by_distance"]
        rows.append([f"`{name}`" + (f" ({x['seeds']} seeds)" if x["seeds"] > 1 else ""), f"{kl('repeated', i1)} / {kl('repeated', i16)}",
                     f"{kl('documents', i1)} / {kl('documents', i16)}", " → ".join(f"{v:.2f}" for v in resid),
                     " / ".join(f"{v['mean']:.1e}" for v in dist.values())])
    d = " / ".join(k.replace("-513", "-512") for k in next(iter(f["models"].values()))["documents"]["kl_by_distance"])
    return markdown(["model", "KL, q shifted 1 / 16: repeated text", "packed documents", "residual change by layer (repeated, 16)",
                     f"KL by distance from a moved span, {d}"], rows)


def findings():
    """The three verdicts and the numbers behind each."""
    s = load("results/analyses/summary.json")
    f1, f2, f3 = s["finding1"], s["finding2"], s["finding3"]
    score = {x["rule"]: x["score_128_512"] for x in f1["rules"]}
    runner = max((r for r in score if r != f1["best_rule"]), key=lambda r: score[r]["mean"])
    kd = f3["by_road"]["kd"]
    lo, hi = f3["kd_top_band"]["pairs"]
    wl0, wl1 = f3["kd_top_band"]["wavelength_before"], f3["kd_top_band"]["wavelength_after"]
    ex = kd["band_excess"]
    j = kd["top_band_per_seed"][0]
    others = [m for i, m in enumerate(ex["mean"]) if i != j]
    rows = [["1: phase-wise RoPE scaling is best for KD", f"**{f1['verdict']}**", str(f1["seeds"]),
             f"best at 128-512: {f1['best_rule']} {spread3(score[f1['best_rule']])}, next {runner} {spread3(score[runner])}"],
            ["2: q/k perturbations reach the logits", f"**{f2['verdict']}**", str(f2["seeds"]),
             f"teacher, q shifted 16 on packed repeated text: KL {f2['teacher_kl_shift16']:.3f} nats/token, residual change "
             + " → ".join(f"{v:.2f}" for v in f2["teacher_resid_by_layer_shift16"])],
            ["3: the extension updates the query states in a structured way", f"**{f3['verdict']}**", str(f3["seeds"]),
             f"`kd` beyond `{kd['control']}`: pairs {lo}-{hi} (wavelength {wl0[0]:,.0f}-{wl0[1]:,.0f} → {wl1[0]:,.0f}-{wl1[1]:,.0f} "
             f"tokens) in every seed, {spread3({k: ex[k][j] for k in ex})} against {min(others):.2f}-{max(others):.2f}; the other roads: "
             + ", ".join(f"`{r}` {x['verdict']}" for r, x in f3["by_road"].items() if r != "kd")
             + f"; `kd` vs `ce-long` pair by pair: r = {f3['kd_vs_ce_long_pair_correlation']:.2f}"]]
    return markdown(["the paper's finding", "at toy scale", "seeds", "the numbers behind it"], rows)


HYPOTHESES = {  # what each configuration of results/long_range/summary.json tried
    "baseline": "baseline: today's defaults, the one command",
    "headline-3-seeds": "the headline, 3 seeds (`../ablation.json`; a teacher of the same recipe from another machine)",
    "kd-phase-1": "H1: phase 1 by KD too (that teacher)",
    "teacher-1024": "H2: a teacher trained at 1,024 tokens",
    "teacher-2048": "**H2: a teacher trained at 2,048 tokens**",
    "repeat-design": "H3: repeated documents (`--snippets repeat`)",
    "consecutive-design": "H3: consecutive pieces (`--snippets consecutive`)",
    "documents-128": "H5: documents <= 128 tokens (phase 1 at window 128)",
    "teacher-1024+documents-128": "the combination: teacher at 1,024 + documents <= 128",
    "teacher-2048+documents-128": "**the combination: teacher at 2,048 + documents <= 128**",
    "teacher-2048+documents-128+3x-steps": "the same with 3x the extension steps (3,600; ce 1 seed, ce-long not rerun)"}


def long_range_hypotheses():
    s = load("results/long_range/summary.json")
    out = []
    for c in s["configurations"]:
        bold = c["name"] in ("teacher-2048", "teacher-2048+documents-128")
        pair = lambda k: f"{f2(c[k + '_mid_acc'])} / {f2(c[k + '_long_acc'])}" if c.get(k + "_mid_acc") is not None or c.get(k + "_long_acc") is not None else "-"  # noqa: E731
        kd = pair("kd")
        borrowed = "; ".join(f"{k} from {v}" for k, v in c["borrowed"].items())
        out.append([HYPOTHESES.get(c["name"], c["name"]) + f" (`{c['name']}`{'; ' + borrowed if borrowed else ''})",
                    str(c["seeds"]), str(c["teacher_window"]), f"<= {c['document_length']}", pair("phase1"), pair("ref"),
                    f"**{kd}**" if bold else kd, pair("ce"), "-" if c["kd_reach"] is None else str(c["kd_reach"])])
    return markdown(["configuration", "kd runs", "teacher window", "documents", "phase 1", "ce-long", "kd", "ce",
                     "KD's reach"], out)


TABLES = {"quickstart": quickstart, "spread": spread, "spread_summary": spread_summary, "roads": roads, "roads_headline": roads_headline, "roads_strongest": roads_strongest, "roads_price": roads_price, "roads_attention": roads_attention, "roads_in_window": roads_in_window, "roads_near_key": roads_near_key, "roads_rows": roads_rows, "roads_mix": roads_mix, "roads_span": roads_span, "headline": headline, "rope_rules": rope_rules,
          "budget": budget, "head_dim": head_dim, "data_mix": data_mix, "designs": designs,
          "long_range_hypotheses": long_range_hypotheses, "fixed_base_rows": fixed_base_rows, "bound_base_rows": bound_base_rows,
          "bench_cpu": bench_cpu, "factors": factors, "teacher_view": teacher_view, "findings": findings, "rope_schedules": rope_schedules, "query_updates": query_updates,
          "perturbation": perturbation}
TABLE = re.compile(r"(<!-- table: (\S+) -->\n)(.*?)(<!-- /table -->)", re.S)
COMMANDS = re.compile(r"(<!-- commands -->\n)(.*?)(<!-- /commands -->)", re.S)


def stored_command(path):
    """A results file's `command` (a string, or a list for a summary of several runs); None if it has none."""
    with open(path) as fh:
        r = json.load(fh)
    return r.get("command") if isinstance(r, dict) else None


def commands(folder):
    """The stored command of every JSON file of a results folder, as a code block."""
    lines = []
    for path in sorted(glob.glob(os.path.join(ROOT, folder, "*.json"))):
        cmd = stored_command(path)
        for c in (cmd if isinstance(cmd, list) else [cmd] if cmd else []):
            lines.append(f"# {os.path.basename(path)}\n{c}")
    return "```\n" + "\n".join(lines) + "\n```\n"


def render(doc):
    """The document with every marked region rendered afresh."""
    with open(os.path.join(ROOT, doc)) as fh:
        text = fh.read()
    text = TABLE.sub(lambda m: m[1] + TABLES[m[2]]() + "\n" + m[4], text)
    return COMMANDS.sub(lambda m: m[1] + commands(os.path.dirname(doc)) + m[3], text)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", action="store_true", help="only report the regions that differ from their files (exit 1)")
    args = p.parse_args(argv)
    stale = []
    for doc in DOCS:
        with open(os.path.join(ROOT, doc)) as fh:
            old = fh.read()
        unknown = [m[2] for m in TABLE.finditer(old) if m[2] not in TABLES]
        if unknown:
            print(f"error: {doc}: unknown table {unknown[0]!r} (known: {', '.join(TABLES)})", file=sys.stderr)
            return 2
        new = render(doc)
        if new != old:
            stale.append(doc)
            if not args.check:
                with open(os.path.join(ROOT, doc), "w") as fh:
                    fh.write(new)
    verb = "differ from their files" if args.check else "rewritten"
    print(f"{len(stale)} document(s) {verb}" + (": " + ", ".join(stale) if stale else ""))
    return 1 if (args.check and stale) else 0


if __name__ == "__main__":
    sys.exit(main())
