"""
Speed and memory of one distillation step, three ways, side by side in one process:

  ours          teacher forward (hidden states only) + student forward + loss.head_loss (chunked
                KD, gradients computed inside the forward) + backward + clip + AdamW: distill.py's step
  naive         the same models, but full [B, T, V] logits of both and F.kl_div on them
  transformers  LlamaForCausalLM teacher and student of the same shapes and a hand-written KD loop
                (full logits + F.kl_div): what one would otherwise write.  Optional dependency.

    python tools/bench.py --quick                 # the same own steps, shorter long windows: ~2 min on 2 idle cores
    python tools/bench.py --json bench.json       # full run (~7 min on 2 idle cores), results + headline keys to a file
    python tools/bench.py --options               # distill.py's choices: fused AdamW, torch.compile, threads
    python tools/bench.py --device cuda           # gpu preset shapes, bf16 autocast, MFU vs measured bf16 matmul

Timing: after warm-up, `steps` rounds of one step per variant, the order rotated each round, so a
change of machine load hits every variant alike; each variant reports the median step and its
min-max, and each ratio the median of its per-round ratios with their min-max.  Three ratios:
  ours/naive          the chunked loss (same layers)
  naive/transformers  the layer code (same full-logits loss)
  ours/transformers   both together
The load average (before and after, with the core count) goes into the results; a warning is
printed when other work holds more than half the cores.  Our loss runs at the preset's own chunk
(distill.PRESETS: 4096 rows on the CPU, 8192 on the GPU).

The sweep: the preset's own distillation steps (`distill.py --preset P`, phases 1 and 2: the
windows and rows per step the pipeline trains at), then longer windows at a fixed number of tokens
per step, where only the attention term grows.  Each round also times the step's attention calls
alone (attention_step): the scaled_dot_product_attention kernel all three variants share, which
bounds ours/transformers ("ceiling").
Reported per window: tokens/s, peak memory of a step, model FLOPs per token and the achieved
fraction of the machine's own matmul FLOP/s (a square matmul timed in the same run).
A separate memory point runs all variants at the longest window (8192) with the full GPT-2
vocabulary, where B*T*V logits dominate.  Headline keys of --json:
  speedup_vs_transformers  ours/transformers, geometric mean of the per-window medians over the
                           preset's own steps (over all windows when the sweep has none of them)
  speedup_long_windows     the same over the longer windows
  memory_vs_naive          our peak step memory / naive's, at the memory point
  matmul_fraction          our achieved model FLOP/s / measured matmul FLOP/s over the preset's
                           own steps run back to back (as the pipeline runs them)
"""

import argparse
import contextlib
import ctypes
import ctypes.util
import gc
import json
import math
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the core modules live one folder up

import torch
import torch.nn.functional as F

import loss
from distill import PRESETS, rows_of, window_of
from loss import head_loss
from model import GPT, GPTConfig


def preset_shape(preset, who):
    """(layers, heads, width) of distill.py's preset: the benchmark times the models the pipeline trains."""
    p = PRESETS[preset]
    return p[f"{who}_layers"], p[f"{who}_heads"], p[f"{who}_embd"]


def preset_steps(preset, phases=(1, 2)):
    """[(window, rows)] of the distillation steps `distill.py --preset P` runs in its phases 1 and 2
    (the Quickstart's): the shapes the pipeline itself spends its time on."""
    args = argparse.Namespace(**PRESETS[preset], windows=None)
    return [(window_of(args, k), rows_of(args, k)) for k in phases]


# Each sweep: the preset's own distillation steps first (the headline), then longer windows at a fixed
# number of tokens per step (rows = tokens / window), where only the attention term grows.
PRESET_OF = {"cpu": "cpu", "cuda": "gpu"}
LONG = {"cpu": dict(windows=[1024, 4096, 8192], tokens=16384), "cuda": dict(windows=[4096, 8192], tokens=32768),
        "cpu quick": dict(windows=[1024, 2048], tokens=4096), "cuda quick": dict(windows=[8192], tokens=32768)}


def rows_for(tokens, windows):
    """Rows per step that hold `tokens` tokens at each window (at least one)."""
    return [max(1, tokens // T) for T in windows]


def sweep_shapes(kind, quick):
    own, long = preset_steps(PRESET_OF[kind]), LONG[f"{kind} quick" if quick else kind]
    return dict(windows=[T for T, _ in own] + long["windows"],
                rows=[B for _, B in own] + rows_for(long["tokens"], long["windows"]))


SETUPS = {
    "cpu": dict(student=preset_shape("cpu", "student"), teacher=preset_shape("cpu", "teacher"), vocab=4096,
                **sweep_shapes("cpu", False), warmup=2, steps=10, chunk=PRESETS["cpu"]["chunk"],
                mem_vocab=50257, mem_window=8192, mem_warmup=1, dtype="float32"),
    "cuda": dict(student=preset_shape("gpu", "student"), teacher=preset_shape("gpu", "teacher"), vocab=50257,
                 **sweep_shapes("cuda", False), warmup=2, steps=10, chunk=PRESETS["gpu"]["chunk"],
                 mem_vocab=50257, mem_window=8192, mem_warmup=1, dtype="bfloat16"),
}
# --quick shortens the long windows and their tokens, never the preset's own steps or the number of timed steps.
QUICK = {"cpu": dict(**sweep_shapes("cpu", True), warmup=1, mem_warmup=0),
         "cuda": dict(**sweep_shapes("cuda", True), warmup=1)}
VARIANTS = ("ours", "naive", "transformers")
RATIOS = {"ours/naive": ("ours", "naive"), "naive/transformers": ("naive", "transformers"),
          "ours/transformers": ("ours", "transformers"),  # name: (faster candidate, reference)
          "ceiling": ("attention", "transformers")}  # the most ours/transformers can be (attention_step)
THETA = 1e4


# ---- FLOPs ---------------------------------------------------------------------------------

def forward_flops_per_token(layers, width, vocab, window, mlp_params=None):
    """
    Forward model FLOPs per token of one GPT (PaLM appendix B convention, multiply-add = 2 FLOPs):
      2 * (matmul weights)            weights: L * (4 C^2 attention + 8 C^2 MLP) + V * C tied head
      + 2 * L * C * T                 QK^T and AV, 2 * 2 * C FLOPs per (query, key), T/2 keys on
                                      average under the causal mask
    mlp_params: weights of one MLP (default 8 C^2, our 4C GELU MLP; Llama's SwiGLU: 3 * C * I).
    Embedding lookups, norms, softmaxes and the optimizer are not counted (the usual MFU convention).
    """
    mlp = 8 * width * width if mlp_params is None else mlp_params
    return 2 * (layers * (4 * width * width + mlp) + vocab * width) + 2 * layers * width * window


def step_flops_per_token(student, teacher, vocab, window, inter=None):
    """Student forward + backward (3x forward) + teacher forward; shapes are (layers, heads, width)."""
    def fwd(shape):
        L, _, C = shape
        return forward_flops_per_token(L, C, vocab, window, None if inter is None else 3 * C * inter(C))
    return 3 * fwd(student) + fwd(teacher)


def llama_intermediate(width):
    """SwiGLU size whose 3 matrices hold as many weights as our 2 of width x 4*width (exact when 3 | width)."""
    return round(8 * width / 3)


def matmul_flops(device, dtype, n, reps=5, inner=None):
    """The machine's own matmul FLOP/s: best of `reps` timings of `inner` square n x n products."""
    inner = inner or (20 if device.startswith("cuda") else 4)  # a GPU needs longer runs to reach its clocks
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    for _ in range(3):
        a @ b
    best = 0.0
    for _ in range(reps):
        sync(device)
        t = time.perf_counter()
        for _ in range(inner):
            a @ b
        sync(device)
        best = max(best, 2 * n ** 3 * inner / (time.perf_counter() - t))
    return best


# ---- memory --------------------------------------------------------------------------------
# CUDA: exact, from the caching allocator (max_memory_allocated after a reset).
# CPU: the kernel's resident-set high-water mark.  Before each measured step we collect garbage,
# ask glibc to return freed heap pages (malloc_trim), read VmRSS, and reset VmHWM to it (writing
# 5 to /proc/self/clear_refs); after the step, VmHWM - VmRSS_before is the step's peak.  Big
# tensors (logits) are mmapped and returned on free, and torch's CPU allocator does not cache,
# so the number is the physical memory the step touched above what was already resident
# (weights, optimizer state, batch, other variants' models).  Linux only; else reported as None.

_libc = ctypes.CDLL(ctypes.util.find_library("c")) if ctypes.util.find_library("c") else None


def _proc_kib(field):
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(field)


def mem_start(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    gc.collect()
    if _libc is not None and hasattr(_libc, "malloc_trim"):
        _libc.malloc_trim(0)
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return _proc_kib("VmRSS") * 1024
    except OSError:
        return None


def mem_peak(device, base):
    if base is None:
        return None
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() - base
    return _proc_kib("VmHWM") * 1024 - base


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


# ---- the three steps -----------------------------------------------------------------------

def load_transformers():
    """transformers is optional: imported lazily, None when absent."""
    try:
        import transformers
        return transformers
    except ImportError:
        return None


def gpt(shape, vocab):
    L, H, C = shape
    return GPT(GPTConfig(vocab_size=vocab, n_layer=L, n_head=H, n_embd=C, rope={"rule": "fixed", "theta": THETA}))


def llama(shape, vocab, max_len):
    """LlamaForCausalLM of our shapes: tied embeddings, no biases, same RoPE base, SDPA attention.
    Differences (RMSNorm, SwiGLU with matched weight count) keep FLOPs equal to within 0.2%."""
    tf = load_transformers()
    L, H, C = shape
    cfg = tf.LlamaConfig(vocab_size=vocab, hidden_size=C, intermediate_size=llama_intermediate(C), num_hidden_layers=L,
                         num_attention_heads=H, num_key_value_heads=H, max_position_embeddings=max_len,
                         tie_word_embeddings=True, attention_bias=False, mlp_bias=False, use_cache=False,
                         rope_theta=THETA, rope_parameters={"rope_type": "default", "rope_theta": THETA},  # v4 / v5 names
                         attn_implementation="sdpa")
    return tf.LlamaForCausalLM(cfg)


def build(kind, student_shape, teacher_shape, vocab, max_len, device, fused=None):
    """(student, teacher, optimizer) for one variant; ours and naive get identical initial weights.
    fused: AdamW's fused kernel (None: as distill.py, fused on CUDA only)."""
    make = (lambda s: gpt(s, vocab)) if kind != "transformers" else (lambda s: llama(s, vocab, max_len))
    with torch.device(device):
        torch.manual_seed(0)
        student = make(student_shape)
        torch.manual_seed(1)
        teacher = make(teacher_shape).eval()
    teacher.requires_grad_(False)
    fused = fused if fused is not None else (True if device.startswith("cuda") else None)
    if kind == "transformers":
        opt = torch.optim.AdamW(student.parameters(), lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95), fused=fused)
    else:
        opt = student.configure_optimizer(1e-3, 0.1, fused=fused)
    return student, teacher, opt


def naive_kd(s_logits, t_logits):
    """The textbook forward KL on full logits: mean over tokens of KL(p_teacher || p_student)."""
    s, t = s_logits.flatten(0, 1).float(), t_logits.flatten(0, 1).float()
    return F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), reduction="batchmean", log_target=True)


def train_step(kind, student, teacher, opt, idx, pos, amp, chunk):
    """One KD step (pure forward KL, tau 1, every token weighted 1); returns the detached loss."""
    with amp:
        if kind == "ours":
            h = student(idx, pos, hidden_only=True)
            with torch.no_grad():
                h_t = teacher(idx, pos, hidden_only=True)
        elif kind == "naive":
            s_logits = student(idx, pos)
            with torch.no_grad():
                t_logits = teacher(idx, pos)
            loss = naive_kd(s_logits, t_logits)
        else:
            s_logits = student(input_ids=idx, position_ids=pos).logits
            with torch.no_grad():
                t_logits = teacher(input_ids=idx, position_ids=pos).logits
            loss = naive_kd(s_logits, t_logits)
    if kind == "ours":  # as in distill.py: the loss outside autocast, log-softmaxes in fp32
        n = h.shape[0] * h.shape[1]
        ones = torch.ones(n, device=idx.device)
        loss = head_loss(h.flatten(0, 1), student.head_weight(), idx.flatten(), ones, h_t.flatten(0, 1),  # targets unused
                         teacher.head_weight(), 1.0, 1.0, chunk)[0]
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
    opt.step()
    return loss.detach()


# ---- interleaved timing and its statistics ---------------------------------------------------

def interleave(steps, warmup, rounds, sync_fn=lambda: None):
    """
    Time `rounds` rounds of one call per entry of `steps` (name -> callable), after `warmup`
    untimed rounds.  Round r starts at entry r (mod n) and goes round, so that no variant always
    runs first (after the others' frees) or last.  Returns {name: [seconds per round]} and the
    order in which the calls were made.
    """
    names = list(steps)
    times, order = {k: [] for k in names}, []
    for r in range(warmup + rounds):
        for k in names[r % len(names):] + names[:r % len(names)]:
            t0 = time.perf_counter()
            steps[k]()
            sync_fn()
            order.append(k)
            if r >= warmup:
                times[k].append(time.perf_counter() - t0)
    return times, order


def spread(xs):
    """{median, min, max} of a list of numbers."""
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs)}


def round_ratios(times, fast, ref):
    """Per-round speedups of `fast` over `ref` (ref's step time / fast's, within the same round)."""
    return [r / f for f, r in zip(times[fast], times[ref])]


def ratio_table(times):
    """{ratio name: spread of its per-round values} for the ratios whose variants both ran."""
    return {name: spread(round_ratios(times, f, r)) for name, (f, r) in RATIOS.items()
            if times.get(f) and times.get(r)}


def geomean(xs):
    return math.exp(statistics.fmean(map(math.log, xs))) if xs else None


def load_state():
    """1-, 5- and 15-minute load averages (None where the OS has none)."""
    return list(os.getloadavg()) if hasattr(os, "getloadavg") else None


def busy_warning(load, cores, own_threads=0):
    """A one-line warning when other work holds more than half the cores, else None."""
    if load is None or load[0] - own_threads <= 0.5 * cores:
        return None
    return (f"warning: load average {load[0]:.2f} on {cores} cores"
            f"{f' ({own_threads} of it this benchmark)' if own_threads else ''}: other work competes, timings are noisy")


# ---- the measurements ------------------------------------------------------------------------

def amp_context(device, dtype):
    return (torch.autocast(device.split(":")[0], dtype=getattr(torch, dtype)) if dtype != "float32"
            else contextlib.nullcontext())


def make_batch(T, B, vocab, device):
    g = torch.Generator().manual_seed(T)
    idx = torch.randint(0, vocab, (B, T), generator=g).to(device)
    return idx, torch.arange(T, device=device).expand(B, T)


def memory_step(kind, model, idx, pos, amp, chunk, device):
    """(seconds, peak bytes or None, loss) of one step measured from a clean baseline: weights, optimizer
    state and batch, without last step's gradients and without the loss's reusable buffers (the step
    allocates them again, so they count)."""
    model[2].zero_grad(set_to_none=True)
    loss.free_buffers()
    base = mem_start(device)
    t0 = time.perf_counter()
    out = train_step(kind, *model, idx, pos, amp, chunk)
    sync(device)
    dt = time.perf_counter() - t0
    return dt, mem_peak(device, base), float(out)


def row(kind, T, B, step_s, mem, first_loss, student_shape, teacher_shape, vocab, peak):
    fpt = step_flops_per_token(student_shape, teacher_shape, vocab, T,
                               llama_intermediate if kind == "transformers" else None)
    achieved = fpt * B * T / step_s
    return {"window": T, "rows": B, "variant": kind, "step_s": step_s, "tok_s": B * T / step_s,
            "peak_mib": None if mem is None else mem / 2 ** 20, "gflop_per_token": fpt / 1e9,
            "achieved_gflops": achieved / 1e9, "matmul_fraction": achieved / peak, "first_loss": first_loss}


def attention_step(student_shape, teacher_shape, B, T, device, dtype):
    """
    Only the scaled_dot_product_attention calls of one step, on random q, k, v of its shapes: the
    student's layers forward and backward, the teacher's forward.  On the CPU all three variants make
    exactly these calls (the same kernel), so transformers' step / this time bounds ours/transformers:
    the speedup ours would reach if everything else in its step cost nothing.  (On a GPU with flash-attn
    installed ours calls flash_attn_func instead, and the bound is approximate.)
    """
    dt = getattr(torch, dtype)
    qkv = lambda shape, grad: [torch.randn(B, shape[1], T, shape[2] // shape[1], device=device, dtype=dt,  # noqa: E731
                                           requires_grad=grad) for _ in range(3)]
    student, teacher = qkv(student_shape, True), qkv(teacher_shape, False)
    grad_out = torch.randn_like(student[0])

    def run():
        for _ in range(student_shape[0]):
            F.scaled_dot_product_attention(*student, is_causal=True).backward(grad_out)
        with torch.no_grad():
            for _ in range(teacher_shape[0]):
                F.scaled_dot_product_attention(*teacher, is_causal=True)
        for x in student:
            x.grad = None
    return run


def measure(kinds, student_shape, teacher_shape, vocab, windows, rows_per_step, warmup, steps, device, dtype, chunk,
            peak):
    """
    Per window: `warmup` + `steps` interleaved rounds (interleave()) of every variant and of the step's
    attention alone (attention_step), then one step per variant whose peak memory is measured
    (untimed: resetting the memory counters makes it fault its pages in afresh).
    Returns (rows, {window: {variant or "attention": [step seconds]}}).
    """
    amp = amp_context(device, dtype)
    models = {k: build(k, student_shape, teacher_shape, vocab, max(windows), device) for k in kinds}
    rows, all_times = [], {}
    for T, B in zip(windows, rows_per_step):
        idx, pos = make_batch(T, B, vocab, device)
        first = {}

        def step_fn(k):
            def run():
                out = train_step(k, *models[k], idx, pos, amp, chunk)
                first.setdefault(k, float(out))  # the first step's loss: ours and naive must agree
            return run

        calls = {**{k: step_fn(k) for k in kinds},
                 "attention": attention_step(student_shape, teacher_shape, B, T, device, dtype)}
        times, _ = interleave(calls, warmup, steps, lambda: sync(device))
        all_times[T] = times
        for k in kinds:
            mem = memory_step(k, models[k], idx, pos, amp, chunk, device)[1]
            rows.append({**row(k, T, idx.shape[0], statistics.median(times[k]), mem, first[k],
                               student_shape, teacher_shape, vocab, peak),
                         "step_min_s": min(times[k]), "step_max_s": max(times[k])})
    return rows, all_times


def measure_memory(kinds, student_shape, teacher_shape, vocab, T, warmup, device, dtype, chunk, peak):
    """The memory point: one row of T tokens, each variant alone (its models built, warmed, measured, freed);
    an out-of-memory variant gets an error row."""
    amp, rows = amp_context(device, dtype), []
    idx, pos = make_batch(T, 1, vocab, device)
    for k in kinds:
        model = build(k, student_shape, teacher_shape, vocab, T, device)
        try:
            for _ in range(warmup):
                train_step(k, *model, idx, pos, amp, chunk)
            dt, mem, first = memory_step(k, model, idx, pos, amp, chunk, device)
            rows.append(row(k, T, 1, dt, mem, first, student_shape, teacher_shape, vocab, peak))
        except torch.OutOfMemoryError:
            rows.append({"window": T, "rows": 1, "variant": k, "error": "out of memory"})
        del model
        loss.free_buffers()
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    return rows


def fmt(x, spec):
    return "-" if x is None else format(x, spec)


def print_table(title, rows):
    print(f"\n{title}")
    print(f"{'window':>7} {'rows':>4}  {'variant':<13}{'tokens/s':>10} {'step s':>8} {'min-max s':>13} {'peak MiB':>9} "
          f"{'GFLOP/tok':>10} {'GFLOP/s':>9} {'of matmul':>9} {'1st loss':>9}")
    for r in rows:
        head = f"{r['window']:>7} {r['rows']:>4}  {r['variant']:<13}"
        if "error" in r:
            print(head + f"  ({r['error']})")
            continue
        mm = f"{r['step_min_s']:.3f}-{r['step_max_s']:.3f}" if "step_min_s" in r else "(one step)"
        print(head + f"{r['tok_s']:>10,.0f} {r['step_s']:>8.3f} {mm:>13} {fmt(r['peak_mib'], '>9,.0f')} "
              f"{r['gflop_per_token']:>10.4f} {r['achieved_gflops']:>9.1f} {r['matmul_fraction']:>9.1%} "
              f"{r['first_loss']:>9.4f}")


def print_ratios(by_window, groups, own):
    print("\nspeedups, median of per-round ratios [min-max over rounds]; ceiling = transformers' step / its attention "
          "calls alone (attention_step): the most ours/transformers can be while all three share that kernel")
    names = [n for n in RATIOS if any(n in g for g in groups.values())]
    cell = lambda r: f"{r['median']:>8.2f}x [{r['min']:.2f}-{r['max']:.2f}]"  # noqa: E731
    print(f"{'window':>22}  " + "  ".join(f"{n:>22}" for n in names))
    for T, rt in by_window.items():
        label = f"{T} (phase {own[T]})" if T in own else str(T)
        print(f"{label:>22}  " + "  ".join(cell(rt[n]) if n in rt else f"{'-':>22}" for n in names))
    for title, g in groups.items():
        if g:
            print(f"{title:>22}  " + "  ".join(cell(g[n]) if n in g else f"{'-':>22}" for n in names))


def pick(rows, variant, window=None):
    for r in rows:
        if r["variant"] == variant and (window is None or r["window"] == window) and "error" not in r:
            return r
    return None


def overall_ratios(all_times, windows=None):
    """Per ratio: geometric mean over windows (default: all) of the per-window medians, min-max over all rounds."""
    out = {}
    for name, (f, r) in RATIOS.items():
        per = [round_ratios(t, f, r) for T, t in all_times.items()
               if (windows is None or T in windows) and t.get(f) and t.get(r)]
        if per:
            out[name] = {"median": geomean([statistics.median(p) for p in per]),
                         "min": min(map(min, per)), "max": max(map(max, per))}
    return out


def own_windows(args):
    """{window: phase} of the sweep's windows that are the preset's own distillation steps (its models,
    window and rows per step)."""
    preset = PRESET_OF["cuda" if args.device.startswith("cuda") else "cpu"]
    if (args.student, args.teacher) != (preset_shape(preset, "student"), preset_shape(preset, "teacher")):
        return {}
    own = preset_steps(preset)
    return {T: own.index((T, B)) + 1 for T, B in zip(args.windows, args.rows) if (T, B) in own}


def headlines(sweep, mem_rows, all_times, own, mem_window, peak):
    """
    speedup_vs_transformers and matmul_fraction over the preset's own steps (all windows when the sweep
    has none of them), speedup_long_windows over the other windows, memory_vs_naive at the memory point.
    """
    head_windows = list(own) or list(all_times)
    rest = [T for T in all_times if T not in head_windows]
    ratios, long = overall_ratios(all_times, head_windows), overall_ratios(all_times, rest)
    ours = [r for r in sweep if r["variant"] == "ours" and r["window"] in head_windows]
    ours_m, naive_m = pick(mem_rows, "ours", mem_window), pick(mem_rows, "naive", mem_window)
    return {
        "speedup_vs_transformers": ratios.get("ours/transformers", {}).get("median"),
        "speedup_long_windows": long.get("ours/transformers", {}).get("median"),
        "memory_vs_naive": (ours_m["peak_mib"] / naive_m["peak_mib"]
                            if ours_m and naive_m and ours_m["peak_mib"] and naive_m["peak_mib"] else None),
        # the model FLOP/s of these steps run back to back (both phases run the same number of steps)
        "matmul_fraction": (sum(r["achieved_gflops"] * r["step_s"] for r in ours) * 1e9
                            / sum(r["step_s"] for r in ours) / peak if ours else None),
    }, ratios, long, head_windows


# ---- distill.py's own choices (--options) ----------------------------------------------------

OPTIONS = ("ours", "fused AdamW", "compiled", "fresh buffers")
THREADS = {"1 run x 2 threads": (1, 2), "2 runs x 1 thread": (2, 1), "2 runs x 2 threads": (2, 2)}


def option_steps(args, idx, pos):
    """Our step as distill.py runs it on the CPU ("ours": foreach AdamW, eager, reused loss buffers) and
    with one choice changed each."""
    amp, dev = amp_context(args.device, args.dtype), args.device
    made = {k: build("ours", args.student, args.teacher, args.vocab, idx.shape[1], dev,
                     fused=True if k == "fused AdamW" else None) for k in OPTIONS}
    s, t, o = made["compiled"]
    made["compiled"] = torch.compile(s), torch.compile(t), o  # what distill.py --compile does

    def step(k):
        def run():
            loss.reuse_buffers = k != "fresh buffers"
            try:
                train_step("ours", *made[k], idx, pos, amp, args.chunk)
            finally:
                loss.reuse_buffers = True
        return run
    return {k: step(k) for k in OPTIONS}


def worker(args):
    """--worker N: N threads, `steps` timed steps of ours after warm-up; prints their times as JSON."""
    torch.set_num_threads(args.worker)
    model = build("ours", args.student, args.teacher, args.vocab, args.windows[0], args.device)
    idx, pos = make_batch(args.windows[0], args.rows[0], args.vocab, args.device)
    amp = amp_context(args.device, args.dtype)
    step = lambda: train_step("ours", *model, idx, pos, amp, args.chunk)  # noqa: E731
    times = interleave({"ours": step}, args.warmup, args.steps)[0]["ours"]
    print(json.dumps({"times": times}))


def thread_runs(args, rounds=2):
    """Aggregate tokens/s of 1 or 2 simultaneous runs (separate processes) at 1 or 2 threads each; the
    configurations alternate, `rounds` times each.  tools/ablate.py runs its jobs 2 at a time."""
    common = [a for k in ("student", "teacher") for a in (f"--{k}", ",".join(map(str, getattr(args, k))))]
    common += ["--vocab", str(args.vocab), "--windows", str(args.windows[0]), "--rows", str(args.rows[0]),
               "--warmup", str(args.warmup), "--steps", str(args.steps), "--chunk", str(args.chunk)]
    tokens = args.rows[0] * args.windows[0]
    res = {k: [] for k in THREADS}
    for r in range(rounds):
        names = list(THREADS)
        for name in names[r % len(names):] + names[:r % len(names)]:
            runs, threads = THREADS[name]
            procs = [subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker", str(threads)] + common,
                                      stdout=subprocess.PIPE, text=True) for _ in range(runs)]
            outs = [p.communicate()[0] for p in procs]
            if any(p.returncode for p in procs):
                raise RuntimeError(f"a benchmark worker failed ({name})")
            res[name].append(sum(tokens / statistics.median(json.loads(o.splitlines()[-1])["times"]) for o in outs))
    return {k: spread(v) for k, v in res.items()}


def run_options(args, head_line):
    idx, pos = make_batch(args.windows[0], args.rows[0], args.vocab, args.device)
    print(f"{head_line}\noptions of our step: student {args.student}, teacher {args.teacher}, vocab {args.vocab}, "
          f"{idx.shape[0]} x {idx.shape[1]} tokens, chunk {args.chunk}, {args.warmup} warm-up + {args.steps} rounds")
    steps = option_steps(args, idx, pos)
    t0 = time.perf_counter()
    steps["compiled"]()  # its first call compiles (from inductor's cache when it has these graphs)
    sync(args.device)
    first_compiled = time.perf_counter() - t0
    times, _ = interleave(steps, args.warmup, args.steps, lambda: sync(args.device))
    table = {k: {**spread(v), "speedup": spread(round_ratios(times, k, "ours"))} for k, v in times.items()}
    print(f"\n{'variant':<16}{'step s':>8} {'min-max s':>13}   speedup vs ours [min-max over rounds]")
    for k, t in table.items():
        s = t["speedup"]
        print(f"{k:<16}{t['median']:>8.3f} {t['min']:>6.3f}-{t['max']:.3f}   {s['median']:.2f}x [{s['min']:.2f}-{s['max']:.2f}]")
    print(f"compiled: its first step, which compiles, took {first_compiled:.1f} s")
    threads = None
    if args.device == "cpu":
        threads = thread_runs(args)
        print("\nsimultaneous runs (separate processes), aggregate tokens/s [min-max over rounds]")
        for k, t in threads.items():
            print(f"{k:<20}{t['median']:>10,.0f} [{t['min']:,.0f}-{t['max']:,.0f}]")
    return {"options": table, "first_compiled_step_s": first_compiled, "threads": threads}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto (cuda uses the gpu preset shapes and bf16)")
    p.add_argument("--quick", action="store_true",
                   help="the preset's own steps, shorter long windows, same step count (CPU: ~2 min on 2 idle cores)")
    p.add_argument("--json", default=None, help="write all results and the headline keys to this file")
    p.add_argument("--variants", type=lambda s: s.split(","), default=list(VARIANTS),
                   help="comma-separated subset of ours,naive,transformers")
    p.add_argument("--options", action="store_true",
                   help="instead: our step with fused AdamW / torch.compile / fresh loss buffers, and 1 or 2 runs at "
                        "once at 1 or 2 threads each (CPU)")
    p.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)  # a thread_runs() child: its thread count
    p.add_argument("--tf32", action="store_true",
                   help="CUDA: allow TF32 for fp32 matmuls (our loss's head matmuls run in fp32; distill.py leaves TF32 off)")
    p.add_argument("--no_memory_point", action="store_true", help="skip the full-vocabulary memory point")
    shape = lambda s: tuple(int(x) for x in s.split(","))  # noqa: E731
    g = p.add_argument_group("overrides of the setup (default: the device's setup, reduced by --quick)")
    g.add_argument("--student", type=shape, help="layers,heads,width")
    g.add_argument("--teacher", type=shape, help="layers,heads,width")
    g.add_argument("--vocab", type=int, help="vocabulary of the sweep (CPU default: distill.py's compact 4096)")
    g.add_argument("--windows", type=lambda s: [int(x) for x in s.split(",")], help="comma-separated windows")
    g.add_argument("--rows", type=lambda s: [int(x) for x in s.split(",")],
                   help="rows per step: one number, or one per window")
    g.add_argument("--tokens", type=int, help="instead of --rows: tokens per step (rows = tokens / window, at least 1)")
    g.add_argument("--warmup", type=int, help="untimed rounds per window")
    g.add_argument("--steps", type=int, help="timed rounds (one step per variant each) per window")
    g.add_argument("--mem_vocab", type=int, help="vocabulary of the memory point (GPT-2: 50257)")
    g.add_argument("--mem_window", type=int, help="window of the memory point (one row)")
    g.add_argument("--mem_warmup", type=int, help="steps before the memory point's one measured step")
    g.add_argument("--dtype", choices=["float32", "bfloat16"], help="autocast dtype (weights stay fp32)")
    g.add_argument("--chunk", type=int, help="rows per chunk of our loss (default: the preset's, 4096 CPU / 8192 GPU)")
    g.add_argument("--matmul_n", type=int, help="size of the square reference matmul (CPU 1024, CUDA 8192)")
    args = p.parse_args(argv)
    if not args.variants or set(args.variants) - set(VARIANTS):
        p.error(f"--variants must name some of {','.join(VARIANTS)}")
    if any(getattr(args, k) is not None and getattr(args, k) < 1 for k in ("steps", "tokens", "chunk", "worker")) \
            or (args.warmup or 0) < 0 or min(args.rows or [1]) < 1 or min(args.windows or [1]) < 1:
        p.error("--steps, --windows, --rows, --tokens and --chunk must be positive, --warmup not negative")
    if args.rows and args.tokens:
        p.error("give --rows or --tokens, not both")
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda: CUDA is not available here")
    kind = "cuda" if args.device.startswith("cuda") else "cpu"
    setup = {**SETUPS[kind], **(QUICK[kind] if args.quick else {})}
    if args.windows or args.tokens:  # own windows: rows from --rows, or from the tokens per step
        args.windows = args.windows or setup["windows"]
        args.rows = args.rows or rows_for(args.tokens or LONG[kind]["tokens"], args.windows)
    for k, v in setup.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if len(args.rows) == 1:
        args.rows = args.rows * len(args.windows)
    if len(args.rows) != len(args.windows):
        p.error(f"--rows has {len(args.rows)} numbers for {len(args.windows)} windows")
    return args


def write_json(path, out):
    with open(path, "w") as fh:
        json.dump(out, fh, indent=1)
    print(f"results -> {path}")


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        return worker(args)
    t0 = time.time()
    dev, kind = args.device, "cuda" if args.device.startswith("cuda") else "cpu"
    cores, threads = os.cpu_count(), torch.get_num_threads()
    load = {"before": load_state(), "cores": cores, "threads": threads}
    where = torch.cuda.get_device_name(dev) if kind == "cuda" else f"CPU, {threads} threads"
    head_line = (f"bench: torch {torch.__version__}, {where}, {args.dtype}, load average "
                 f"{fmt(load['before'] and load['before'][0], '.2f')} on {cores} cores before start")
    warn = busy_warning(load["before"], cores)
    if warn:
        print(warn)
    if args.tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
    if args.options:
        out = run_options(args, head_line)
        load["after"] = load_state()
        print(f"bench took {time.time() - t0:.0f} s")
        if args.json:
            write_json(args.json, {**out, "device": where, "torch": torch.__version__, "load": load,
                                   "config": {k: getattr(args, k) for k in ("student", "teacher", "vocab", "windows",
                                                                            "rows", "warmup", "steps", "chunk")}})
        return out
    print(head_line)
    kinds = [k for k in VARIANTS if k in args.variants]
    tf = load_transformers() if "transformers" in kinds else None
    if tf is not None:
        print(f"transformers {tf.__version__}: LlamaForCausalLM of the same shapes (RMSNorm, SwiGLU of matched "
              f"weight count: FLOPs match to within 0.2%), hand-written KD loop with full logits")
    elif "transformers" in kinds:
        kinds.remove("transformers")
        print("transformers is not installed: its variant is skipped (pip install transformers to include it)")

    mm_dtype = getattr(torch, args.dtype)
    n = args.matmul_n or (8192 if kind == "cuda" else 1024)
    peak = matmul_flops(dev, mm_dtype, n)
    fpt = step_flops_per_token(args.student, args.teacher, args.vocab, args.windows[0])
    print(f"student {args.student}, teacher {args.teacher} (layers, heads, width), vocab {args.vocab}, "
          f"windows {args.windows} x rows {args.rows} per step, chunk {args.chunk}, {args.warmup} warm-up + {args.steps} timed rounds "
          f"(one step per variant, order rotated) + 1 memory step;\n"
          f"model FLOPs/token = 3 x fwd(student) + fwd(teacher), fwd = 2*(12*L*C^2 + V*C) + 2*L*C*T "
          f"({fpt / 1e6:.2f} MFLOP at T={args.windows[0]})")

    sweep, all_times = measure(kinds, args.student, args.teacher, args.vocab, args.windows, args.rows, args.warmup,
                               args.steps, dev, args.dtype, args.chunk, peak)
    load["after_timing"] = load_state()
    warn = busy_warning(load["after_timing"], cores, threads)
    if warn:
        print(warn.replace("warning:", "warning: during timing,"))
    mem_rows = []
    if not args.no_memory_point:
        # One row of mem_window tokens at the full vocabulary: B*T*V logits dominate the naive step.
        mem_kinds = kinds
        need = 8 * args.mem_window * args.mem_vocab * 4  # measured here: naive holds ~7 fp32 [T, V] tensors at its peak
        if kind == "cpu" and hasattr(os, "sysconf") and need > os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"):
            mem_kinds = ["ours"]
            print(f"memory point: the full-logits variants need ~{need / 2 ** 30:.0f} GiB, more than is free: only ours runs")
        mem_rows = measure_memory(mem_kinds, args.student, args.teacher, args.mem_vocab, args.mem_window,
                                  args.mem_warmup, dev, args.dtype, args.chunk, peak)
    peak = max(peak, matmul_flops(dev, mm_dtype, n))  # again at the end: the better of the two readings
    load["after"] = load_state()
    for r in sweep + mem_rows:
        if "error" not in r:
            r["matmul_fraction"] = r["achieved_gflops"] * 1e9 / peak

    print(f"\nmeasured {args.dtype} matmul ({n}^3, best of start and end): {peak / 1e9:,.1f} GFLOP/s")
    print_table(f"speed: vocab {args.vocab}, median of {args.steps} steps", sweep)
    if mem_rows:
        print_table(f"memory point: vocab {args.mem_vocab}, one row of {args.mem_window} tokens, chunk {args.chunk}, "
                    f"one step after {args.mem_warmup} warm-up (peak = memory a step adds above weights, optimizer "
                    f"state, batch)", mem_rows)
    by_window = {T: ratio_table(t) for T, t in all_times.items()}
    own = own_windows(args)
    head, ratios, long, head_windows = headlines(sweep, mem_rows, all_times, own, args.mem_window, peak)
    what = "the preset's own steps" if own else "all windows"
    if ratios:
        print_ratios(by_window, {what: ratios, "longer windows": long}, own)
    print(f"\nspeedup_vs_transformers {fmt(head['speedup_vs_transformers'], '.2f')} "
          f"(ours/transformers, geometric mean of per-window medians over {what}: windows {head_windows})")
    print(f"speedup_long_windows    {fmt(head['speedup_long_windows'], '.2f')} "
          f"(the same over the other windows: {[T for T in args.windows if T not in head_windows]})")
    print(f"memory_vs_naive         {fmt(head['memory_vs_naive'], '.3f')} "
          f"(our peak / naive peak, T={args.mem_window}, vocab {args.mem_vocab}, chunk {args.chunk})")
    print(f"matmul_fraction         {fmt(head['matmul_fraction'], '.1%')} "
          f"(our model FLOP/s / measured matmul FLOP/s over {what}, run back to back, vocab {args.vocab})")
    print(f"load average (1 min) {fmt(load['before'] and load['before'][0], '.2f')} before, "
          f"{fmt(load['after'] and load['after'][0], '.2f')} after ({threads} threads of it this benchmark's), "
          f"{cores} cores; bench took {time.time() - t0:.0f} s")
    if args.json:
        write_json(args.json, {
            **head, "device": where, "torch": torch.__version__, "dtype": args.dtype, "quick": args.quick,
            "tf32": args.tf32, "transformers": tf.__version__ if tf is not None else None, "matmul_gflops": peak / 1e9,
            "timed_steps": args.steps, "chunk": args.chunk, "load": load, "headline_windows": head_windows,
            "ratios": ratios, "ratios_long_windows": long,
            "ratios_by_window": {str(T): r for T, r in by_window.items()},
            "config": {k: getattr(args, k) for k in ("student", "teacher", "vocab", "windows", "rows", "warmup",
                                                     "steps", "mem_vocab", "mem_window", "chunk")},
            "sweep": sweep, "memory_point": mem_rows,
            "step_times": {str(T): t for T, t in all_times.items()}})
    return head


if __name__ == "__main__":
    main()
    sys.exit(0)
