"""
The headline comparison of the paper's claim, at toy scale (arXiv 2604.06070; MobileLLM-Pro's table shape):
does a student trained only on short documents packed into a long window retrieve far beyond its
documents after logit distillation -- and better than its cross-entropy twin?

    python tools/ablate.py                        # 1 seed: phase 1, ce-long, kd, ce, pose-kd, pose-ce, pose-far-ce
                                                  #   from the default teacher and phase 1
    python tools/ablate.py --seeds 3 --results results/ablation.json     # the README's 3-seed table
    python tools/ablate.py --matrix               # every variant (RoPE rules, masking, the mismatched teacher, ...)
    python tools/ablate.py --regime passkey-only  # the same comparison under one of the old defaults (REGIMES)
    python tools/ablate.py --report --results results/ablation.json      # print a results file's table

The rows, as the predecessor reports them: the lower reference (phase 1: the short phase alone), the
upper reference (ce-long: CE on real long documents, what the method avoids), KD on short packed
documents (the method) and CE on the very same short data.  From ONE teacher and ONE phase-1 student
(by default the Quickstart's out/phase0.pt and out/phase1.pt, trained by distill.py if missing), each
variant runs the extension phase and is evaluated the same way:
  * passkey retrieval (eval_retrieval.py) from the short window to twice the extended window,
    by key distance (tokens between the needle's key and the answer) in multiples of the longest
    training document, so that the distance where retrieval stops shows;
  * held-out text loss by quarter of the extended window (perplexity vs position);
  * the transfer channel: what the teacher's soft targets on this packed data carry about context
    outside the current document, by distance -- KD cannot transfer more than that.
"""

import argparse
import contextlib
import json
import os
import re
import subprocess
import sys
import time
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the core modules live one folder up

import numpy as np
import torch
from tqdm import tqdm

import checkpoint
import data
import distill
import eval_retrieval

# name: distill.py flags of the extension phase (everything else is shared)
VARIANTS = {
    "kd":           [],                                        # the method: KD, the shared RoPE rule, cross-document
    "ce":           ["--loss", "ce"],                          # its cross-entropy twin on the very same data
    "kd+ce":        ["--loss", "mix", "--mix", "0.5"],
    "kd-phasewise": ["--rope", "phasewise"],                   # a new base per window (the paper's reading)
    "kd-fixed":     ["--rope", "fixed"],                       # phase 1's base kept
    "ce-fixed":     ["--loss", "ce", "--rope", "fixed"],       # ... and its CE twin: is a fixed-base gain the loss's?
    "kd-bound":     ["--rope", "bound"],                       # the smallest base meeting Men et al.'s bound per window
    "ce-bound":     ["--loss", "ce", "--rope", "bound"],
    "kd-yarn":      ["--rope", "yarn"],                        # phase 1's base, YaRN-stretched
    "kd-pi":        ["--rope", "pi"],                          # ... position-interpolated
    "kd-ntk":       ["--rope", "ntk"],                         # ... NTK-aware
    "kd-docmask":   ["--packing", "doc_mask"],                 # attention only within each document
    "ce-docmask":   ["--loss", "ce", "--packing", "doc_mask"],
    "kd-mismatch":  [],                                        # KD from --mismatch_teacher (document-masked)
    # positional skip-wise training (PoSE): rows of the short window whose positions skip across the long one
    "pose-kd":      ["--positions", "pose"],
    "pose-ce":      ["--loss", "ce", "--positions", "pose"],
    # ... in rows of one or two short windows, drawn per step (ROWS): the long window's length as well
    "pose-rows-kd": ["--positions", "pose"],
    "pose-rows-ce": ["--loss", "ce", "--positions", "pose"],
    # ... in rows of one or four short windows whose ids reach past the window (FAR), so that a document in a row
    # of four spans it all: one-document rows train the distances, four-document ones a long prompt's worth of keys
    "pose-far-ce":  ["--loss", "ce", "--positions", "pose"],
    # controls of the mechanistic analyses: the same steps at phase 1's own window and base (no extension),
    # so that what an extension moves can be told from what any further training moves
    "kd-control":   [],
    "ce-control":   ["--loss", "ce"],
    # upper reference: long documents (what the method avoids), grown by a curriculum like the teacher's
    "ce-long":      ["--loss", "ce", "--data_mode", "long", "--curriculum", "0.6"],
}
# with phase 1, the predecessor's four rows -- and the other road from short data to the long window, PoSE, by CE and
# by KD, and by CE in rows of one or four documents (the road from short data that comes closest to long documents)
HEADLINE = ("ce-long", "kd", "ce", "pose-kd", "pose-ce", "pose-far-ce")
CONTROLS = ("kd-control", "ce-control")  # trained at the short window (variant_flags)
ROWS = ("pose-rows-kd", "pose-rows-ce")  # PoSE rows of 1 or 2 short windows (variant_flags)
FAR = ("pose-far-ce",)  # PoSE rows of 1 or 4 short windows, ids below the window + 3 short windows (variant_flags)
OPTIONAL = ("kd+ce", *CONTROLS)  # not in --matrix
# The defaults this bench had before its headline regime: each failure is a finding (README, "What we found").
REGIMES = {
    "student-2x64": "--student_embd 64 --student_heads 4",            # 16-dim heads, 0.36 M parameters
    "passkey-only": "--passkey_frac 0.5 --copy_frac 0 --filler_frac 0",  # no copy documents, no eval-format keys
    "phasewise": "--rope phasewise",                                   # the paper's phase-wise reading, below the bound
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None, help="folder of all runs (default: runs/ablation, or runs/ablation-REGIME)")
    p.add_argument("--results", default=None, help="where the summary JSON goes (default: OUT/ablation.json; "
                   "the committed headline is results/ablation.json)")
    p.add_argument("--variants", default=None, help=f"comma-separated subset of {list(VARIANTS)} (default: {','.join(HEADLINE)})")
    p.add_argument("--matrix", action="store_true", help=f"every variant but {', '.join(OPTIONAL)} and the RoPE variants "
                   "that only repeat the shared rule")
    p.add_argument("--regime", choices=REGIMES, default=None, help="add one of the old defaults' flags to every phase "
                   "(its own teacher and phase 1 in OUT/shared)")
    p.add_argument("--seeds", type=int, default=1, help="extension-phase seeds per variant")
    p.add_argument("--first_seed", type=int, default=0, help="the first of those seeds (add seeds to an earlier results "
                   "file: long_range.py pools files joined by '+')")
    p.add_argument("--teacher", default=None, help="reuse this teacher (default: out/phase0.pt, or OUT/shared/phase0.pt "
                   "when --flags/--regime/--preset/--smoke change what the phases train; trained if missing)")
    p.add_argument("--init", default=None, help="reuse this phase-1 student (default: next to the teacher, trained if missing)")
    p.add_argument("--mismatch_teacher", default=None, help="kd-mismatch's teacher, document-masked "
                   "(default: OUT/shared_docmask/phase0.pt, trained with --teacher_packing doc_mask if missing)")
    p.add_argument("--flags", default="", help="extra distill.py flags for every phase (a data design, e.g. '--snippets repeat')")
    p.add_argument("--window", type=int, default=None, help="the extension phase's window (default: the teacher's)")
    p.add_argument("--steps", type=int, default=None, help="extension-phase steps per run (default: the preset's, as distill.py)")
    p.add_argument("--batch", type=int, default=None, help="distill.py --batch (rows at the short window; default: the preset's)")
    p.add_argument("--jobs", type=int, default=2, help="runs in parallel (one CPU thread each)")
    p.add_argument("--n", type=int, default=10, help="passkey prompts per (length, depth) cell")
    p.add_argument("--preset", choices=["cpu", "gpu"], default="cpu")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, mps or auto: every run and the evaluation")
    p.add_argument("--smoke", action="store_true",
                   help="the whole path in well under a minute: distill.py --smoke, every variant, 1 seed, 1 prompt per cell")
    p.add_argument("--report", action="store_true", help="only print the table of an existing results file")
    p.add_argument("--channel", action="store_true",
                   help="only the transfer-channel diagnostic of --teacher on each data design (DESIGNS) -> --results")
    p.add_argument("--png", default=None, help="figure of the results (needs matplotlib; default: RESULTS with .png, '' = none)")
    return p.parse_args(argv)


def distill_args(args, phase=2):
    """The distill.py command line shared by every run (preset, consistent teacher, design flags, the two windows)."""
    flags = ["--preset", args.preset, "--teacher_packing", "cross_doc", "--device", args.device,
             *(["--smoke"] if args.smoke else []), *args.flags.split()]
    base = distill.parse_args(["--phase", "1", *flags])
    args.window = args.window or distill.window_of(base, 2)  # the preset's extension window
    return ["--phase", str(phase), *flags, "--windows", f"{base.short_len},{args.window}"]  # parse_args checks the flags


def without_theta1(cmd):
    """A command line without --theta1 (and its value)."""
    out, skip = [], False
    for a in cmd:
        if not skip and not a.startswith("--theta1"):
            out.append(a)
        skip = a == "--theta1"
    return out


def extension_flags(args, name, theta1):
    """
    A variant's extension-phase flags.  RoPE variants start from phase 1's actual base: the
    rules that keep or stretch a base (fixed, pi, ntk, yarn) get --theta1 = phase 1's base, the
    rules that choose every base (phasewise, bound) get none -- so 'fixed' means phase 1's base
    kept, whatever rule trained phase 1.
    """
    parsed = distill.parse_args(without_theta1(distill_args(args, 2) + VARIANTS[name]))
    flags = variant_flags(name, parsed.short_len, distill.window_of(parsed, 2))
    return (flags if parsed.rope in ("phasewise", "bound") else [*flags, "--theta1", repr(theta1)]), parsed.rope


def variant_flags(name, short_len, window):
    """VARIANTS[name], with what depends on the windows: the controls' windows, the PoSE rows' lengths and reach."""
    if name in CONTROLS:  # the last --windows wins: phase 2 at phase 1's window, so the same base too
        return [*VARIANTS[name], "--windows", f"{short_len},{short_len}"]
    if name in ROWS:
        return [*VARIANTS[name], "--pose_len", f"{short_len},{2 * short_len}"]
    if name in FAR:  # a row of 4 short windows skips up to window - short_len: a document in it spans the window
        return [*VARIANTS[name], "--pose_len", f"{short_len},{4 * short_len}", "--pose_reach", str(window + 3 * short_len)]
    return VARIANTS[name]


def default_variants(args):
    """Every variant but the optional ones and the RoPE variants whose rule is the shared one (= kd / ce)."""
    shared = distill.parse_args(distill_args(args, 1)).rope
    def repeats(flags):
        return "--rope" in flags and flags[flags.index("--rope") + 1] == shared
    return [n for n, f in VARIANTS.items() if n not in OPTIONAL and not repeats(f)]


def distill_cmd(args, out, phase, extra=()):
    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "distill.py")
    base = distill_args(args, phase)
    return [sys.executable, script, *(without_theta1(base) if "--theta1" in extra else base), "--out", out, *extra]


class Finished:
    """A distill.py run already done in this process (--smoke), with the interface of a Popen."""
    def __init__(self, returncode):
        self.returncode = returncode

    def poll(self):
        return self.returncode

    wait = poll


def run(cmd, log, threads, inline=False):
    """distill.py in a subprocess with `threads` CPU threads; inline (--smoke): in this process, which
    saves the interpreter and torch start-up that dominates a tiny run."""
    if inline:
        with open(log, "w") as fh, contextlib.redirect_stdout(fh), contextlib.redirect_stderr(fh):
            try:
                return Finished(distill.main(cmd[2:]))
            except SystemExit as e:
                return Finished(e.code if isinstance(e.code, int) else 1)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    with open(log, "w") as fh:
        return subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env)


def shared_dir(args):
    """Where the shared teacher and phase 1 live: the Quickstart's out/ when every phase trains the preset's
    defaults (so `python distill.py --phase 1` and this tool share them), else a folder of this ablation."""
    preset_window = distill.window_of(distill.parse_args(["--phase", "2"]), 2)
    default = not args.flags.strip() and args.preset == "cpu" and not args.smoke and args.window == preset_window
    return "out" if default else os.path.join(args.out, "shared")


def run_progress(folder, phase, steps):
    """Fraction of a distill.py run done, from the last line of its loss log (1 once its checkpoint exists)."""
    if os.path.exists(os.path.join(folder, f"phase{phase}.pt")):
        return 1.0
    try:
        with open(os.path.join(folder, f"phase{phase}.jsonl"), "rb") as fh:
            lines = fh.read().splitlines()
        return min(1.0, json.loads(lines[-1])["step"] / steps) if lines else 0.0
    except (OSError, ValueError, KeyError):
        return 0.0


def train_all(args, names):
    """Teacher and phase 1 (both threads), then the document-masked teacher if needed and every variant x seed
    (`jobs` at a time; kd-mismatch waits for its teacher), under one progress bar with an ETA."""
    shared = shared_dir(args)
    teacher = args.teacher or os.path.join(shared, "phase0.pt")
    init = args.init or os.path.join(shared, "phase1.pt")
    mismatch = args.mismatch_teacher or os.path.join(args.out, "shared_docmask", "phase0.pt")
    for phase, path, given in ((0, teacher, args.teacher), (1, init, args.init)):
        if os.path.exists(path):
            continue
        if given:
            sys.exit(f"error: --{'init' if phase else 'teacher'} {path}: no such checkpoint")
        os.makedirs(shared, exist_ok=True)
        log = os.path.join(shared, f"train{phase}.log")
        print(f"training the shared {'phase-1 student' if phase else 'teacher'} into {path} (log: {log})", flush=True)
        if run(distill_cmd(args, shared, phase, ["--teacher", teacher] if phase else []), log, 2, args.smoke).wait():
            sys.exit(f"error: the shared phase {phase} failed, see {log}")
    theta1 = checkpoint.load(init)["model_config"]["rope"]["theta"]
    # seed-major: every variant has its first seed before any has its second (a cut-short run still compares)
    queue = [(name, seed) for seed in range(args.first_seed, args.first_seed + args.seeds) for name in names]
    if "kd-mismatch" in names and not os.path.exists(mismatch):
        queue.insert(0, ("teacher-docmask", 0))
    running, done, rules, finished = [], [], {}, []
    teacher_steps = distill.parse_args(distill_args(args, 0)).teacher_steps
    bar = tqdm(total=len(queue), unit="run", desc="ablation", dynamic_ncols=True, disable=args.smoke,
               bar_format="{desc}: {n:.1f}/{total} runs |{bar}| {elapsed} elapsed, ETA {remaining} {postfix}")
    while queue or running:
        ready = [q for q in queue if q[0] != "kd-mismatch" or os.path.exists(mismatch)]
        if queue and not ready and not running:
            sys.exit(f"error: kd-mismatch needs its teacher at {mismatch} (a phase0.pt), which was not written")
        while ready and len(running) < args.jobs:
            name, seed = ready.pop(0)
            queue.remove((name, seed))
            if name == "teacher-docmask":
                out = os.path.dirname(mismatch) or "."
                os.makedirs(out, exist_ok=True)
                cmd = distill_cmd(args, out, 0, ["--teacher_packing", "doc_mask"])
                running.append((name, seed, mismatch, run(cmd, os.path.join(out, "train.log"), 1, args.smoke), 0, teacher_steps))
                continue
            out = os.path.join(args.out, f"{name}-s{seed}")
            ckpt = os.path.join(out, "phase2.pt")
            flags, rules[name] = extension_flags(args, name, theta1)
            if os.path.exists(ckpt):
                done.append((name, seed, ckpt))
                bar.total -= 1  # reused, not trained: not part of this invocation's ETA
                continue
            os.makedirs(out, exist_ok=True)
            cmd = distill_cmd(args, out, 2, ["--init", init, "--seed", str(seed), "--eval_n", "1" if args.smoke else "2",
                                             "--steps", str(args.steps), "--batch", str(args.batch), *flags,
                                             # a run cut short by a killed invocation continues where it stopped
                                             *(["--resume"] if os.path.exists(os.path.join(out, "phase2.partial.pt")) else [])])
            if distill.uses_teacher(distill.parse_args(cmd[2:]), 2):  # a CE run needs no teacher
                cmd += ["--teacher", mismatch if name == "kd-mismatch" else teacher]
            running.append((name, seed, ckpt, run(cmd, os.path.join(out, "train.log"), 1, args.smoke), 2, args.steps))
        time.sleep(0.2 if args.smoke else 2)
        for item in [r for r in running if r[3].poll() is not None]:
            running.remove(item)
            name, seed, ckpt, proc = item[:4]
            if proc.returncode:
                bar.close()
                sys.exit(f"error: {name} seed {seed} failed, see {os.path.dirname(ckpt)}/train.log")
            if name != "teacher-docmask":
                done.append((name, seed, ckpt))
            finished.append(f"{name}-s{seed}")
        bar.n = len(finished) + sum(run_progress(os.path.dirname(r[2]), r[4], r[5]) for r in running)
        bar.set_postfix_str(("running " + ", ".join(f"{r[0]}-s{r[1]}" for r in running)) if running else "", refresh=False)
        bar.refresh()
    bar.close()
    return teacher, init, done, rules


@torch.no_grad()
def transfer_channel(teacher, vocab, sampler, window, short, rows=16, seed=0, device="cpu"):
    """
    What KD can carry beyond a document, per quarter of the window: for the teacher on packed
    short-document windows (continuous positions), compare its next-token distribution with
    the full window (cross-document, what KD shows the student) against
      doc  attention restricted to the current document (what the labels alone imply), and
      near attention restricted to the last `short` tokens (any document).
    KL(full || doc) is the whole channel; KL(full || near) is the part from far context.
    Also: how often the top-1 token changes, and the teacher's NLL of the true token.
    """
    rng = np.random.default_rng(seed)
    b = data.make_batch([data.pack(sampler, rng, window) for _ in range(rows)], vocab)
    pos = data.positions_from_docs(b["doc"], "continuous")
    T = window
    t = torch.arange(T)
    edges = [lo for lo, _ in eval_retrieval.distance_buckets(short, window) if lo > 0]  # 1x, 2x, 4x, ... the document

    def last(k):  # attention to the last k tokens only, whichever documents they belong to
        return ((t[:, None] - t[None, :] < k) & (t[None, :] <= t[:, None]))[None, None].expand(rows, 1, T, T)
    views = [("full", None), ("doc", b["doc"]), ("near", last(short))] + [(f"last{k}", last(k)) for k in edges if k != short]
    logp = {name: torch.log_softmax(teacher(b["idx"].to(device), pos.to(device), m if m is None else m.to(device)).float(), -1).cpu()
            for name, m in views}
    logp.update({f"last{short}": logp["near"]})
    valid = b["targets"] >= 0
    tgt = b["targets"].clamp_min(0)[..., None]
    quarters = torch.arange(T) * 4 // T
    out = {}
    for q in range(4):
        sel = valid & (quarters == q)
        kl = {k: float((logp["full"].exp() * (logp["full"] - logp[k])).sum(-1)[sel].mean()) for k in ("doc", "near")}
        top1 = float((logp["full"].argmax(-1) != logp["doc"].argmax(-1))[sel].float().mean())
        nll = {k: float(-logp[k].gather(-1, tgt)[..., 0][sel].mean()) for k in ("full", "doc")}
        out[f"q{q + 1}"] = {"kl_full_doc": kl["doc"], "kl_full_near": kl["near"], "top1_changed": top1,
                            "nll_full": nll["full"], "nll_doc": nll["doc"]}
    out["answers"] = answer_targets(logp, b, eval_retrieval.distance_buckets(short, window))
    # By distance: what the context further back than k tokens moves in the teacher's distribution, at the
    # positions that have such context (KL(full || last k)), and its mass on other documents' keys at a
    # passkey answer by how far back that key stands.  This is the most KD could carry at each distance.
    full_p = logp["full"].exp()
    out["by_distance"] = {
        "kl_full_last_k": {str(k): float((full_p * (logp["full"] - logp[f"last{k}"])).sum(-1)[valid & (t >= k)].mean())
                           for k in edges},
        "other_keys_by_key_distance": out["answers"]["by_key_distance"]}
    return out


def answer_targets(logp, b, buckets=()):
    """
    What the teacher's soft target says at each passkey answer (first key piece) that has other
    passkey documents before it in the window: the probability of the document's own key, and the
    total probability of the OTHER documents' keys -- far keys that the labels never point at.
    With the full window vs the current document only; with `buckets`, the other keys' probability
    also by how far back each key stands (mean over the answers with an other key in that bucket).
    """
    ans = b["weights"] > 1
    first = ans & ~torch.cat([torch.zeros_like(ans[:, :1]), ans[:, :-1]], 1)
    own, other = {"full": [], "doc": []}, {"full": [], "doc": []}
    by_dist = {f"{lo}-{hi}": [] for lo, hi in buckets}
    for r, t in first.nonzero().tolist():
        key = int(b["targets"][r, t])
        earlier = [(u, int(b["targets"][r, u])) for u in first[r, :t].nonzero()[:, 0].tolist()]
        others = {k for _, k in earlier} - {key}
        if not others:
            continue
        p = {k: logp[k][r, t].exp() for k in own}
        for k in own:
            own[k].append(float(p[k][key]))
            other[k].append(float(p[k][sorted(others)].sum()))
        for lo, hi in buckets:  # a key piece repeated at several distances counts in each of its buckets
            ks = {k for u, k in earlier if lo <= t - u < hi} - {key}
            if ks:
                by_dist[f"{lo}-{hi}"].append(float(p["full"][sorted(ks)].sum()))
    mean = lambda xs: float(np.mean(xs)) if xs else None  # noqa: E731
    return {"n": len(own["full"]), "own_key_full": mean(own["full"]), "own_key_doc": mean(own["doc"]),
            "other_keys_full": mean(other["full"]), "other_keys_doc": mean(other["doc"]),
            "by_key_distance": {k: {"n": len(v), "other_keys_full": mean(v)} for k, v in by_dist.items()}}


# Data designs of results/NOTES.md section 3 (distill.py flags of the extension phase's data).
DESIGNS = {"random": [], "same_source": ["--snippets", "same_source"], "repeat": ["--snippets", "repeat"],
           "consecutive": ["--snippets", "consecutive"], "text_only": ["--passkey_frac", "0"]}


def channel_by_design(args):
    """The diagnostic of one teacher on every data design (32 packed validation windows each)."""
    teacher, vocab, _ = checkpoint.load_model(args.teacher, args.dev)
    corpus, out = None, {}
    for name, flags in DESIGNS.items():
        dargs = distill.parse_args(distill_args(args) + flags)
        corpus = corpus or data.load_corpus(dargs.data)
        sampler, _ = distill.sampler_for(dargs, corpus, 2, split="val")
        out[name] = ch = transfer_channel(teacher, vocab, sampler, args.window, dargs.short_len, rows=32, device=args.dev)
        q = [ch[f"q{i}"] for i in range(1, 5)]
        a = ch["answers"]
        print(f"{name:12s} KL(full||doc) " + " ".join(f"{x['kl_full_doc']:.3f}" for x in q) +
              " | KL(full||near) " + " ".join(f"{x['kl_full_near']:.3f}" for x in q) +
              " | NLL full-doc " + " ".join(f"{x['nll_full'] - x['nll_doc']:+.3f}" for x in q) +
              (f" | answers: own key {a['own_key_full']:.2f} full / {a['own_key_doc']:.2f} doc, other keys "
               f"{a['other_keys_full']:.2f} / {a['other_keys_doc']:.3f}" if a["n"] else ""), flush=True)
    with open(args.results, "w") as fh:
        json.dump({"command": eval_retrieval.command_line("tools/ablate.py"), "teacher": args.teacher, **out}, fh, indent=1)
    print(f"-> {args.results}")
    return 0


def evaluate(model, vocab, corpus, lengths, args, digits, device):
    """Passkey records in the filler and in held-out text, text loss by quarter of the long window, and the
    short-context price: held-out text loss over windows of the short length (the predecessor's second column)."""
    recs = eval_retrieval.passkey(model, vocab, lengths, n=args.n, digits=digits, device=device)
    text_recs = eval_retrieval.passkey(model, vocab, lengths, n=args.n, digits=digits, device=device, text=corpus)
    n_windows = 4 if args.smoke else 16
    loss = eval_retrieval.text_loss_by_position(model, vocab, corpus, args.window, n_windows=n_windows, device=device)
    short = eval_retrieval.text_loss_by_position(model, vocab, corpus, args.short, n_windows=8 * n_windows, device=device)
    return {"records": recs, "text_records": text_recs, "text_loss_by_quarter": loss, "short_text_loss": float(np.mean(short))}


def resolve_device(name):
    """'auto' -> cuda, mps or cpu (as distill.py); an unavailable device is a usage error."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if (name.startswith("cuda") and not torch.cuda.is_available()) or (name == "mps" and not torch.backends.mps.is_available()):
        raise distill.UsageError(f"--device {name} is not available here (use --device cpu)")
    return name


def buckets_for(args):
    """0-1x, 1-2x, 2-4x, 4-8x, ... the longest training document, up to twice the extension window."""
    return eval_retrieval.distance_buckets(args.short, 2 * args.window)


def acc_between(records, lo, hi):
    sel = [r["correct"] for r in records if lo <= r["distance"] < hi]
    return sum(sel) / len(sel) if sel else None


def long_acc(records, args):
    """Mean exact match at key distances from 4x the longest training document up to the extension window
    (the summary metric; keys beyond the window trained on ask for length extrapolation, another question,
    and are reported in the last distance bucket only)."""
    return acc_between(records, 4 * args.short, args.window)


def mid_acc(records, args):
    """Mean exact match one to four documents back (key distance 1x-4x the longest training document)."""
    return acc_between(records, args.short, 4 * args.short)


def fine_bins(args):
    """Half-document-wide key-distance bins up to the extension window: where a cliff sits, to 32 tokens."""
    w = max(1, args.short // 2)
    return [(lo, lo + w) for lo in range(0, args.window, w)]


def reach(by_bin, level=0.5):
    """The largest key distance (a bin's upper edge) at which the accuracy is still >= level; 0 if none."""
    return max((int(k.split("-")[1]) for k, v in by_bin.items() if v is not None and v >= level), default=0)


def main(argv=None):
    args = parse_args(argv)
    args.out = args.out or ("runs/ablation" + (f"-{args.regime}" if args.regime else ""))
    args.results = args.results or os.path.join(args.out, "ablation.json")
    if args.png is None:
        args.png = os.path.splitext(args.results)[0] + ".png"
    if args.report:
        return report(args.results, args.png)
    if args.regime:
        args.flags = f"{REGIMES[args.regime]} {args.flags}"
    if args.smoke:
        args.seeds, args.n, args.variants = 1, 1, args.variants or ",".join(VARIANTS)
    try:
        dev = resolve_device(args.device)
        names = args.variants.split(",") if args.variants else default_variants(args) if args.matrix else list(HEADLINE)
        unknown = [n for n in names if n not in VARIANTS]
        if unknown:
            raise distill.UsageError(f"unknown variants {unknown} (choose from {list(VARIANTS)})")
        for flag, value, least in (("--seeds", args.seeds, 1), ("--jobs", args.jobs, 1), ("--first_seed", args.first_seed, 0),
                                   ("--n", args.n, 1)):
            if value < least:
                raise distill.UsageError(f"{flag} must be >= {least}, got {value}")
        dargs = distill.parse_args(distill_args(args))
    except distill.UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    args.short = dargs.short_len
    args.steps, args.batch = args.steps or distill.per_phase(dargs.steps, 2), args.batch or distill.per_phase(dargs.batch, 2)
    if args.channel:
        if not args.teacher:
            print("error: --channel needs --teacher CKPT", file=sys.stderr)
            return 2
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", 2)))  # both cores, unless told otherwise
        try:
            args.dev = dev
            return channel_by_design(args)
        except (checkpoint.CheckpointError, data.DataError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    t0 = time.time()
    teacher_path, init_path, done, rules = train_all(args, names)
    train_min = (time.time() - t0) / 60
    print(f"training done in {train_min:.1f} min; evaluating", flush=True)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", 2)))
    corpus = data.load_corpus(dargs.data)
    lengths = [args.short, args.window] if args.smoke else eval_retrieval.default_lengths(args.window, shortest=args.short)
    teacher, vocab, tck = checkpoint.load_model(teacher_path, dev)
    student1, _, s1ck = checkpoint.load_model(init_path, dev)
    digits = tck["key_digits"]
    cells = {"teacher": evaluate(teacher, vocab, corpus, lengths, args, digits, dev),
             "phase1": evaluate(student1, vocab, corpus, lengths, args, digits, dev)}
    for name, seed, ckpt in done:
        model, _, ck = checkpoint.load_model(ckpt, dev)
        cells[f"{name}-s{seed}"] = {**evaluate(model, vocab, corpus, lengths, args, digits, dev),
                                    "final_loss": ck["final_loss"], "train_minutes": round(ck["train_time_s"] / 60, 2)
                                    if ck.get("train_time_complete", True) else None}  # None: resumed, time before unknown
    sampler, _ = distill.sampler_for(dargs, corpus, 2, split="val")
    channel = transfer_channel(teacher, vocab, sampler, args.window, args.short, rows=2 if args.smoke else 16, device=dev)
    results = summarise(args, names, rules, cells, channel, lengths, tck, s1ck, train_min, (time.time() - t0) / 60)
    os.makedirs(os.path.dirname(args.results) or ".", exist_ok=True)
    with open(args.results, "w") as fh:
        json.dump(results, fh, indent=1)
    print(f"-> {args.results}")
    report(args.results, args.png)
    return 0


def run_key(key):
    """A run's name 'VARIANT-sK' -> (VARIANT, K); a name without a seed ('teacher', 'phase1') -> (key, None)."""
    m = re.fullmatch(r"(.+)-s(\d+)", key)
    return (m[1], int(m[2])) if m else (key, None)


def seed_cells(cells, name):
    """The cells of one variant: 'teacher' / 'phase1' themselves, or every seed 'name-sK'."""
    return [c for k, c in cells.items() if run_key(k)[0] == name]


def summarise(args, names, rules, cells, channel, lengths, tck, s1ck, train_min, total_min):
    buckets = buckets_for(args)
    table = {}
    for key, cell in cells.items():
        text_recs = cell["text_records"]
        table[key] = {"by_distance": eval_retrieval.by_distance(cell["records"], buckets),
                      "by_distance_fine": eval_retrieval.by_distance(cell["records"], fine_bins(args)),
                      # the same prompts' keys with held-out text as the haystack instead of the filler
                      "text_by_distance": eval_retrieval.by_distance(text_recs, buckets),
                      "text_by_distance_fine": eval_retrieval.by_distance(text_recs, fine_bins(args)),
                      "text_distance_correct": [[r["distance"], int(r["correct"])] for r in text_recs],
                      "short_text_loss": cell["short_text_loss"],
                      "short_passkey_acc": eval_retrieval.accuracy(cell["records"], length=args.short),
                      "long_acc": long_acc(cell["records"], args), "mid_acc": mid_acc(cell["records"], args),
                      "by_length": {L: eval_retrieval.accuracy(cell["records"], length=L) for L in lengths},
                      "text_loss_by_quarter": cell["text_loss_by_quarter"],
                      "final_loss_kd_ce": cell.get("final_loss"), "train_minutes": cell.get("train_minutes"),
                      # every prompt's (key distance, exact match): any distance range can be summarised later
                      "distance_correct": [[r["distance"], int(r["correct"])] for r in cell["records"]]}

    def long_accs(name, key="long_acc"):
        return [c[key] for c in seed_cells(table, name) if c[key] is not None]

    def mean_of(name, key="long_acc"):
        accs = long_accs(name, key)
        return float(np.mean(accs)) if accs else None

    def kd_reach():  # over the seed-mean of every fine bin
        cells_kd = seed_cells(table, "kd")
        if not cells_kd:
            return None
        bins = cells_kd[0]["by_distance_fine"]
        return reach({k: (None if any(c["by_distance_fine"][k] is None for c in cells_kd)
                          else float(np.mean([c["by_distance_fine"][k] for c in cells_kd]))) for k in bins})

    def under(loss, rule):  # the variant of this loss whose extension phase used this RoPE rule (kd, or kd-RULE)
        return next((mean_of(n) for n in (loss, f"{loss}-{rule}") if n in names and rules.get(n) == rule), None)

    variants = {}
    for name in ["teacher", "phase1"] + names:
        accs = long_accs(name)
        variants[name] = {"long_acc_mean": mean_of(name), "long_acc_min": min(accs, default=None),
                          "long_acc_max": max(accs, default=None), "flags": VARIANTS.get(name, []),
                          "rope": rules.get(name), "seeds": len(seed_cells(table, name))}
    phase1_window = eval_retrieval.accuracy(cells["phase1"]["records"], length=args.short)
    return {
        "command": eval_retrieval.command_line("tools/ablate.py"),
        "machine": f"{os.cpu_count()} CPU cores, torch {torch.__version__}", "cpu": eval_retrieval.machine()["cpu"],
        # this invocation (finished runs are reused, not retrained) and every run's own training time
        "minutes": {"training": round(train_min, 1), "total": round(total_min, 1),
                    "runs_sum": round(sum(c.get("train_minutes") or 0 for c in cells.values()), 1), "jobs": args.jobs},
        "setup": {"short_len": args.short, "window": args.window, "steps": args.steps, "batch": args.batch,
                  "seeds": args.seeds, "first_seed": args.first_seed, "flags": args.flags, "lengths": lengths,
                  "prompts_per_cell": args.n,
                  "teacher": {"window": tck["window"], "config": tck["model_config"], "lineage": tck["lineage"]},
                  "phase1": {"lineage": s1ck["lineage"], "final_loss_kd_ce": s1ck["final_loss"]},
                  "distance_buckets": [f"{lo}-{hi}" for lo, hi in buckets]},
        "summary": {"phase1_window_acc": phase1_window, "phase1_long_acc": mean_of("phase1"),
                    "ref_long_acc": mean_of("ce-long"), "kd_long_acc": mean_of("kd"), "ce_long_acc": mean_of("ce"),
                    "phase1_mid_acc": mean_of("phase1", "mid_acc"), "ref_mid_acc": mean_of("ce-long", "mid_acc"), "kd_mid_acc": mean_of("kd", "mid_acc"),
                    "ce_mid_acc": mean_of("ce", "mid_acc"), "kd_reach": kd_reach(),
                    "mid_distance_from": args.short, "mid_distance_to": 4 * args.short,
                    "phasewise_long_acc": under("kd", "phasewise"), "fixed_long_acc": under("kd", "fixed"),
                    "bound_long_acc": under("kd", "bound"), "ce_fixed_long_acc": under("ce", "fixed"),
                    "kd_mismatch_long_acc": mean_of("kd-mismatch"), "seeds": args.seeds,
                    "rope": rules.get("kd"), "long_distance_from": 4 * args.short, "long_distance_to": args.window},
        "variants": variants,
        "transfer_channel": channel,
        "cells": table,
    }


def plot(r, png):
    """Left: passkey accuracy by key distance (mean over seeds, bars = min..max); right: text loss by quarter."""
    plt = eval_retrieval.pyplot()
    if plt is None:
        return
    buckets = r["setup"]["distance_buckets"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for name in r["variants"]:
        cells = seed_cells(r["cells"], name)
        acc = np.array([[np.nan if v is None else v for v in c["by_distance"].values()] for c in cells])
        loss = np.array([c["text_loss_by_quarter"] for c in cells])
        with warnings.catch_warnings():  # a distance bucket no prompt fell into is simply not drawn
            warnings.simplefilter("ignore", RuntimeWarning)
            mean, lo, hi = np.nanmean(acc, 0), np.nanmin(acc, 0), np.nanmax(acc, 0)
        # clipped: the mean of equal seeds can sit one rounding step outside their min-max
        ax1.errorbar(range(len(buckets)), mean, yerr=np.clip([mean - lo, hi - mean], 0, None), marker="o", capsize=3,
                     label=name)
        ax2.plot(range(1, 5), loss.mean(0), marker="o", label=name)
    ax1.set_xticks(range(len(buckets)), buckets)
    ax1.set(xlabel="key distance (tokens)", ylabel="passkey exact match", ylim=(-0.05, 1.05))
    ax2.set_xticks(range(1, 5), [f"q{q}" for q in range(1, 5)])
    ax2.set(xlabel=f"quarter of the {r['setup']['window']}-token window", ylabel="held-out text loss (nats)")
    ax1.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    print(f"figure -> {png}")


def mean_range(mean, lo, hi):
    """'mean (lo-hi)' to 2 decimals, the mean alone where the seeds agree."""
    return f"{mean:.2f}" if hi - lo < 0.005 else f"{mean:.2f} ({lo:.2f}-{hi:.2f})"


def spread(values):
    vals = [v for v in values if v is not None]
    return mean_range(sum(vals) / len(vals), min(vals), max(vals)) if vals else "-"


def report(path, png=""):
    """The README table: per variant, mean (min-max over seeds) passkey accuracy by key distance."""
    with open(path) as fh:
        r = json.load(fh)
    b, sm = r["setup"]["distance_buckets"], r["summary"]
    # files written before the long range stopped at the window counted every key >= long_distance_from
    long_range = f"{sm['long_distance_from']}-{sm['long_distance_to']}" if "long_distance_to" in sm else f">= {sm['long_distance_from']}"
    print(f"\n{r['command']}  ({r['machine']}, {r['minutes']['total']} min)")
    print("| variant | seeds | " + " | ".join(f"key distance {x}" for x in b) +
          f" | long ({long_range}) | text loss by quarter | final KD / CE loss |")
    print("|---" * (len(b) + 5) + "|")
    for name, v in r["variants"].items():
        cells = seed_cells(r["cells"], name)
        accs = " | ".join(spread([c["by_distance"][x] for c in cells]) for x in b)
        text = " ".join(f"{np.mean([c['text_loss_by_quarter'][q] for c in cells]):.2f}" for q in range(4))
        final = [c["final_loss_kd_ce"] for c in cells if c["final_loss_kd_ce"]]
        mean_of = [float(np.mean([f[i] for f in final])) if final else 0.0 for i in (1, 2)]
        fl = " / ".join(f"{m:.3f}" if m else "-" for m in mean_of)  # 0 = that loss was not computed
        print(f"| {name} | {len(cells)} | {accs} | {spread([c['long_acc'] for c in cells])} | {text} | {fl} |")
    print("\nsummary:", json.dumps(r["summary"]))
    fmt = lambda x: "-" if x is None else f"{x:.2f}"  # noqa: E731
    if "ref_long_acc" in sm:  # results files of this layout
        mid = f"{sm['mid_distance_from']}-{sm['mid_distance_to']}" if "mid_distance_from" in sm else None
        print(f"\n| model (key distance: {mid or '-'} / {long_range}) | {mid or '-'} | {long_range} |\n|---|---|---|")
        for label, key in (("lower reference: phase 1 (" + fmt(sm["phase1_window_acc"]) + f" inside its "
                            f"{r['setup']['short_len']}-token window)", "phase1"), ("upper reference: CE on long documents (ce-long)", "ref"),
                           ("KD on short packed documents (kd)", "kd"), ("CE on short packed documents (ce)", "ce")):
            print(f"| {label} | {fmt(sm.get(f'{key}_mid_acc'))} | {fmt(sm.get(f'{key}_long_acc'))} |")
        if sm.get("kd_reach") is not None:
            print(f"KD's reach (largest key distance still retrieved >= 0.5, seed mean): {sm['kd_reach']} tokens")
    print("transfer channel (teacher, packed short documents):")
    for q, v in r["transfer_channel"].items():
        if q == "by_distance":
            print("  by distance: KL(full || last k tokens) " + ", ".join(f"k={k}: {x:.4f}" for k, x in v["kl_full_last_k"].items()) +
                  "; p(other documents' keys) at a passkey answer, by the key's distance: " +
                  ", ".join(f"{k}: {'-' if x['other_keys_full'] is None else format(x['other_keys_full'], '.4f')} (n={x['n']})"
                            for k, x in v["other_keys_by_key_distance"].items()))
            continue
        if q == "answers":
            if v["n"]:
                print(f"  at {v['n']} passkey answers with other keys earlier in the window: p(own key) "
                      f"{v['own_key_full']:.3f} full vs {v['own_key_doc']:.3f} doc-only; p(other documents' keys) "
                      f"{v['other_keys_full']:.3f} full vs {v['other_keys_doc']:.3f} doc-only")
            continue
        print(f"  {q}: KL(full||doc) {v['kl_full_doc']:.4f}  KL(full||near) {v['kl_full_near']:.4f}  "
              f"top-1 changed {v['top1_changed']:.3f}  NLL full {v['nll_full']:.3f} vs doc-only {v['nll_doc']:.3f}")
    if png:
        plot(r, png)
    return 0


if __name__ == "__main__":
    sys.exit(main())
