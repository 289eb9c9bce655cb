"""
Passkey retrieval (Mohtashami & Jaggi 2023; the YaRN / LongLoRA / EasyContext eval) on one or
many checkpoints side by side.

    python eval_retrieval.py out/phase0.pt out/phase1.pt out/phase2.pt

The prompt is the classic one: an instruction, repeated filler ("The grass is green. ..."),
"The pass key is K. Remember it. K is the pass key." at an explicit depth, more filler, and
"What is the pass key? The pass key is" followed by K.  The haystack is sized in tokens, so a
prompt of length L is exactly L tokens.  Score = teacher-forced exact match: one forward pass,
and a prompt counts as retrieved only if the argmax at every answer position is the right key
token (BPE splits a 5-digit key into 2-3 pieces).  --greedy also decodes the answer.

Every model sees the very same prompts (keys drawn from --seed).  Output: a length x depth
table and a key-distance table on stdout, all records as JSON (--json), and a heatmap PNG
when matplotlib is installed (--png).
"""

import argparse
import json
import math
import os
import shlex
import sys

import numpy as np
import torch
import torch.nn.functional as F

import data

DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)


def default_lengths(window, shortest=64):
    """Powers of two from `shortest` up to twice the window."""
    return [shortest * 2 ** i for i in range(int(math.log2(2 * window / shortest)) + 1)]


def eval_prompt(length, depth, key, text=None, rng=None):
    """
    The classic passkey prompt of exactly `length` tokens (instruction, haystack, needle, question, key).
    The haystack is the repeated filler, or with `text` (a data.Corpus) a passage of its held-out documents,
    drawn with `rng`: a needle in repeated filler and one in real text can rank models differently.
    """
    key_ids, prefix = data.key_tokens(key), data.encode(data.INSTRUCTION)
    n_hay = length - len(prefix) - data.passkey_len(key_ids)
    if n_hay < 0:
        raise data.DataError(f"passkey prompt length {length} is too short; it needs at least {length - n_hay} tokens")
    hay = data.filler_haystack(n_hay) if text is None else text.snippet(rng, n_hay, "val").tolist()
    return data.passkey_doc(key_ids, hay, depth, prefix)


def _prompts(length, depths, n, seed, digits, text=None):
    """n prompts per depth, identical for every model: (tokens, answer_start, needle_key_start, depth)."""
    rng, hay_rng = np.random.default_rng([seed, length]), np.random.default_rng([seed, length, 1])  # same keys in either haystack
    out = []
    for depth in depths:
        for _ in range(n):
            tokens, answer, needle = eval_prompt(length, depth, data.random_key(rng, digits), text, hay_rng)
            out.append((tokens, answer, needle, depth))
    return out


def prompt_positions(tokens, answer, needle, span=None):
    """
    Position ids of one prompt: 0..length-1, or with `span` > length ids that cover `span` positions: the
    haystack between the needle and the question skips span - length ids at its middle (PoSE's skip, at eval
    time).  The key then sits as many positions back as in a `span`-token prompt with far fewer tokens between,
    which tells a key missed for its distance in positions from one missed for the tokens in between.
    """
    length = len(tokens)
    if span is None or span == length:
        return np.arange(length), 0
    if span < length:
        raise ValueError(f"--span {span} is shorter than a prompt of {length} tokens")
    needle_end = needle - len(data.encode(" The pass key is")) + len(data.needle_tokens(list(tokens[answer:])))
    cut = (needle_end + answer - len(data.encode(data.QUESTION))) // 2
    return np.arange(length) + np.where(np.arange(length) >= cut, span - length, 0), span - length


@torch.no_grad()
def passkey(model, vocab, lengths, depths=DEPTHS, n=10, seed=1234, digits=4, greedy=False, batch_tokens=16384, device="cpu",
            text=None, span=None):
    """
    Records {length, depth, distance, correct[, greedy]} for every prompt (haystack: the filler, or the held-out
    documents of the corpus `text`; distance: positions between the needle's key and the answer; with `span`,
    prompt_positions' skip, and `tokens`: the tokens between them).  The model returns hidden
    states and only the positions that predict the answer go through the output head, so memory
    never holds [rows, T, V] logits; everything stays on `device` until the records are written.
    """
    model.eval()
    records, correct = [], []
    for length in lengths:
        prompts = _prompts(length, depths, n, seed, digits, text)
        rows = max(1, batch_tokens // length)
        for i in range(0, len(prompts), rows):
            chunk = prompts[i:i + rows]
            idx = torch.from_numpy(np.stack([vocab(p[0]) for p in chunk])).to(device)  # eval_prompt: exactly `length` tokens
            pos, skips = zip(*(prompt_positions(p[0], p[1], p[2], span) for p in chunk))
            h = model(idx, torch.from_numpy(np.stack(pos)).to(device), hidden_only=True)
            answers = [p[1] for p in chunk]
            row = torch.from_numpy(np.repeat(np.arange(len(chunk)), [length - a for a in answers])).to(device)
            at = torch.from_numpy(np.concatenate([np.arange(a - 1, length - 1) for a in answers])).to(device)  # predict the key
            pred = (h[row, at] @ model.head_weight().t()).float().argmax(-1)
            wrong = torch.zeros(len(chunk), device=device).index_add_(0, row, (pred != idx[row, at + 1]).float())
            correct.append(wrong == 0)
            for r, (tokens, answer, needle, depth) in enumerate(chunk):
                rec = {"length": length, "depth": depth, "distance": int(answer - needle + skips[r]), "correct": None}
                if span:
                    rec["tokens"] = int(answer - needle)
                if greedy:
                    rec["greedy"] = _greedy(model, idx[r:r + 1, :answer], length - answer) == idx[r, answer:].tolist()
                records.append(rec)
    for rec, ok in zip(records, torch.cat(correct).tolist() if correct else []):
        rec["correct"] = ok
    return records


def _greedy(model, prompt, steps):
    """Greedy decoding of `steps` tokens after the prompt (no KV cache: prompts are short here)."""
    seq = prompt
    for _ in range(steps):
        pos = torch.arange(seq.shape[1], device=seq.device)[None]
        nxt = (model(seq, pos, hidden_only=True)[:, -1] @ model.head_weight().t()).argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], 1)
    return seq[0, prompt.shape[1]:].tolist()


def accuracy(records, key="correct", **match):
    sel = [r[key] for r in records if all(r[k] == v for k, v in match.items())]
    return sum(sel) / len(sel) if sel else float("nan")


def distance_buckets(short_len, longest):
    """Key-distance buckets in multiples of the longest training document: 0-1x, 1-2x, 2-4x, 4-8x, ... up to
    `longest` (the last bucket ends past it), so that the distance where retrieval stops shows in the table."""
    edges = [0, short_len]
    while edges[-1] < longest:
        edges.append(2 * edges[-1])
    edges[-1] = max(edges[-1], longest + 1)
    return list(zip(edges[:-1], edges[1:]))


def by_distance(records, buckets, key="correct"):
    out = {}
    for lo, hi in buckets:
        sel = [r[key] for r in records if lo <= r["distance"] < hi]
        out[f"{lo}-{hi}"] = sum(sel) / len(sel) if sel else None
    return out


def format_table(names, results, lengths, depths):
    """One row per (model, length): accuracy at each depth and the mean."""
    head = f"{'model':<24}{'length':>7} " + " ".join(f"{'d=' + format(d, 'g'):>7}" for d in depths) + f"{'mean':>7}"
    lines = [head, "-" * len(head)]
    for name, recs in zip(names, results):
        for L in lengths:
            accs = [accuracy(recs, length=L, depth=d) for d in depths]
            lines.append(f"{name[-24:]:<24}{L:>7} " + " ".join(f"{a:>7.2f}" for a in accs) + f"{accuracy(recs, length=L):>7.2f}")
    return "\n".join(lines)


@torch.no_grad()
def text_loss_by_position(model, vocab, corpus, window, n_windows=16, buckets=4, seed=0, device="cpu", chunk=4096):
    """
    Mean next-token loss on held-out contiguous text, per quarter (bucket) of the window.  The head and
    the cross-entropy see at most `chunk` rows of hidden states at a time: never [rows, T, V] logits.
    (Where no val document is window + 1 tokens long, the text spans documents: data.Corpus.snippet.)
    """
    model.eval()
    rng = np.random.default_rng(seed)
    toks = np.stack([data.text_doc(corpus, rng, window + 1, "val") for _ in range(n_windows)])
    idx = torch.from_numpy(vocab(toks)).to(device)
    pos = torch.arange(window, device=device).expand(n_windows, window)
    h, tgt, W = model(idx[:, :-1], pos, hidden_only=True).flatten(0, 1), idx[:, 1:].flatten(), model.head_weight()
    nll = torch.cat([F.cross_entropy((h[i:i + chunk] @ W.t()).float(), tgt[i:i + chunk], reduction="none")
                     for i in range(0, len(tgt), chunk)])
    nll = nll.view(n_windows, window)[:, 1:].cpu()  # skip predicting from BOS alone
    return [float(c.mean()) for c in nll.chunk(buckets, dim=1)]


def command_line(script, argv=None):
    """The command that reruns a script, as a shell reads it: an argument with spaces (--flags '--x 1') or an
    empty one stays one argument."""
    return shlex.join(["python", script, *(sys.argv[1:] if argv is None else argv)])


def machine():
    """What a number was measured on: CPU model, cores, torch threads and version (results differ in the last
    floating-point bits across machines and thread counts, and trained models with them)."""
    cpu = None
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), None)
    except OSError:
        pass
    import platform
    return {"cpu": cpu or platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "threads": torch.get_num_threads(), "torch": str(torch.__version__)}


def pyplot():
    """matplotlib.pyplot (file output only), or None with a hint: figures are optional everywhere."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        return plt
    except ImportError:
        print("(no figure: pip install matplotlib to get a PNG)")
        return None


def save_heatmap(path, names, results, lengths, depths):
    plt = pyplot()
    if plt is None:
        return
    fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names), 3), squeeze=False)
    for ax, name, recs in zip(axes[0], names, results):
        grid = np.array([[accuracy(recs, length=L, depth=d) for L in lengths] for d in depths])
        ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto", origin="lower")
        for (i, j), a in np.ndenumerate(grid):  # the numbers too: a course projects these
            ax.text(j, i, f"{a:.2f}", ha="center", va="center", fontsize=6)
        ax.set_xticks(range(len(lengths)), [str(L) for L in lengths], fontsize=7)
        ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths], fontsize=7)
        ax.set_title(os.path.basename(name), fontsize=8)
        ax.set_xlabel("prompt length (tokens)", fontsize=7)
    axes[0][0].set_ylabel("needle depth", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"heatmap -> {path}")


def main(argv=None):
    import checkpoint  # local import: keeps this module importable without the training code
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("ckpts", nargs="+", help="checkpoint files (phaseN.pt) to compare")
    p.add_argument("--lengths", type=str, default=None, help="comma-separated prompt lengths in tokens (default: 64 .. 2x the largest window)")
    p.add_argument("--depths", type=str, default=",".join(map(str, DEPTHS)), help="comma-separated needle depths in [0, 1]")
    p.add_argument("--n", type=int, default=20, help="prompts per (length, depth) cell")
    p.add_argument("--seed", type=int, default=1234, help="seed of the keys (same prompts for every model)")
    p.add_argument("--greedy", action="store_true", help="also score greedy decoding of the answer")
    p.add_argument("--json", type=str, default=None, help="write all records here")
    p.add_argument("--png", type=str, default=None, help="write a heatmap here (needs matplotlib)")
    p.add_argument("--haystack", choices=["filler", "text"], default="filler",
                   help="hide the needle in the repeated filler, or in held-out documents of --data")
    p.add_argument("--data", default=None, help="the corpus of --haystack text (default: Shakespeare, as distill.py)")
    p.add_argument("--span", type=int, default=None,
                   help="ids of every prompt cover this many positions: the haystack after the needle skips the rest "
                        "(a far key behind few tokens; see prompt_positions)")
    p.add_argument("--device", type=str, default="cpu")
    args = p.parse_args(argv)
    for flag, path in (("--json", args.json), ("--png", args.png)):  # before any prompt is evaluated
        if path and not os.path.isdir(os.path.dirname(os.path.abspath(path))):
            sys.exit(_fail(f"{flag} {path}: its folder does not exist"))
    try:
        depths = [float(x) for x in args.depths.split(",")]
        if not all(0 <= d <= 1 for d in depths) or args.n < 1:
            raise ValueError
    except ValueError:
        sys.exit(_fail("--depths must be numbers in [0, 1] and --n >= 1"))
    if args.span is not None and args.greedy:
        sys.exit(_fail("--greedy decodes at consecutive positions; it cannot be combined with --span"))
    loaded = []
    for path in args.ckpts:
        try:
            loaded.append(checkpoint.load_model(path, args.device))
        except checkpoint.CheckpointError as e:
            sys.exit(_fail(str(e)))
    windows = [ck["window"] for _, _, ck in loaded]
    digits = loaded[0][2]["key_digits"]
    try:
        lengths = parse_lengths(args.lengths) if args.lengths else default_lengths(max(windows))
        if args.span is not None and args.span < max(lengths):
            raise ValueError(f"--span {args.span} is shorter than the longest prompt, {max(lengths)} tokens")
        text = data.load_corpus(args.data) if args.haystack == "text" else None
        results = [passkey(m, v, lengths, depths, args.n, args.seed, digits, args.greedy, device=args.device, text=text,
                           span=args.span)
                   for m, v, _ in loaded]
    except (ValueError, data.DataError) as e:
        sys.exit(_fail(str(e)))
    names = [os.path.relpath(p) for p in args.ckpts]
    print(f"passkey retrieval, teacher-forced exact match ({args.n} prompts per cell, haystack: {args.haystack})")
    print(format_table(names, results, lengths, depths))
    short = min(ck["short_len"] for _, _, ck in loaded)
    buckets = distance_buckets(short, max(lengths + [args.span or 0]))
    print(f"\nby key distance (tokens between the needle's key and the answer):")
    print(f"{'model':<24}" + "".join(f"{f'{lo}-{hi}':>12}" for lo, hi in buckets))
    for name, recs in zip(names, results):
        accs = by_distance(recs, buckets)
        print(f"{name[-24:]:<24}" + "".join(f"{'-' if a is None else format(a, '.2f'):>12}" for a in accs.values()))
    if args.greedy:
        for name, recs in zip(names, results):
            print(f"{name}: greedy decoding accuracy {accuracy(recs, 'greedy'):.2f}")
    if args.json:
        # the table as printed, each model's own training record (wall time, threads, machine) and every prompt
        models = {n: {"window": w, "acc_by_distance": by_distance(r, buckets), "acc_by_length":
                      {L: accuracy(r, length=L) for L in lengths}, "train_time_s": ck.get("train_time_s"),
                      "trained_on": ck.get("machine"), "seed": ck.get("args", {}).get("seed"), "records": r}
                  for n, w, r, (_, _, ck) in zip(names, windows, results, loaded)}
        with open(args.json, "w") as fh:
            json.dump({"command": command_line("eval_retrieval.py", argv),
                       "lengths": lengths, "depths": depths, "n": args.n, "seed": args.seed, "haystack": args.haystack,
                       "span": args.span, "prompts_per_cell": args.n, "distance_buckets": [f"{lo}-{hi}" for lo, hi in buckets],
                       "evaluated_on": machine(), "models": models}, fh, indent=1)
        print(f"records -> {args.json}")
    if args.png:
        save_heatmap(args.png, names, results, lengths, depths)


def parse_lengths(text):
    try:
        lengths = [int(x) for x in text.split(",")]
    except ValueError:
        raise ValueError(f"--lengths must be comma-separated prompt lengths in tokens, got {text!r}") from None
    if min(lengths) < 1:
        raise ValueError(f"--lengths must be positive, got {text!r}")
    return lengths


def _fail(msg):
    print(f"error: {msg}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    main()
