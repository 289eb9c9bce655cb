"""
Speed and memory of one distillation step, three ways, side by side in one process:

  ours          teacher forward (hidden states only) + student forward + loss.head_loss (chunked
                KD, gradients computed inside the forward) + backward + clip + AdamW: distill.py's step
  naive         the same models, but full [B, T, V] logits of both and F.kl_div on them
  transformers  LlamaForCausalLM teacher and student of the same shapes and a hand-written KD loop
                (full logits + F.kl_div): what one would otherwise write.  Optional dependency.

    python tools/bench.py --quick                 # reduced run, <= 5 min on 2 CPU cores
    python tools/bench.py --json bench.json       # full run (longer), results + headline keys to a file
    python tools/bench.py --device cuda           # gpu preset shapes, bf16 autocast, MFU vs measured bf16 matmul

Reported per window: tokens/s, peak memory of a step, model FLOPs per token and the achieved
fraction of the machine's own matmul FLOP/s (a square matmul timed in the same run).
A separate memory point runs all variants at the longest window (8192) with the full GPT-2
vocabulary, where B*T*V logits dominate.  Headline keys of --json:
  speedup_vs_transformers  our tokens/s / theirs (geometric mean over the sweep's windows)
  memory_vs_naive          our peak step memory / naive's, at the memory point
  matmul_fraction          our achieved model FLOP/s / measured matmul FLOP/s, at the shortest
                           window of the sweep (the one nearest the preset's own windows)
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
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the core modules live one folder up

import torch
import torch.nn.functional as F

from distill import PRESETS
from loss import head_loss
from model import GPT, GPTConfig


def preset_shape(preset, who):
    """(layers, heads, width) of distill.py's preset: the benchmark times the models the pipeline trains."""
    p = PRESETS[preset]
    return p[f"{who}_layers"], p[f"{who}_heads"], p[f"{who}_embd"]


# "tokens" is per step (rows = tokens / window), so every window does the same work on the weights and only
# the attention term grows.
SETUPS = {
    "cpu": dict(student=preset_shape("cpu", "student"), teacher=preset_shape("cpu", "teacher"), vocab=4096,
                windows=[1024, 4096, 8192], tokens=16384, warmup=1, steps=3,
                mem_vocab=50257, mem_window=8192, mem_warmup=1, dtype="float32"),
    "cuda": dict(student=preset_shape("gpu", "student"), teacher=preset_shape("gpu", "teacher"), vocab=50257,
                 windows=[1024, 4096, 8192], tokens=32768, warmup=2, steps=5,
                 mem_vocab=50257, mem_window=8192, mem_warmup=1, dtype="bfloat16"),
}
QUICK = {"cpu": dict(windows=[512, 1024, 2048], tokens=4096, warmup=1, steps=2, mem_warmup=0),
         "cuda": dict(windows=[1024, 8192], warmup=1, steps=3)}
VARIANTS = ("ours", "naive", "transformers")
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


def build(kind, student_shape, teacher_shape, vocab, max_len, device):
    """(student, teacher, optimizer) for one variant; ours and naive get identical initial weights."""
    make = (lambda s: gpt(s, vocab)) if kind != "transformers" else (lambda s: llama(s, vocab, max_len))
    with torch.device(device):
        torch.manual_seed(0)
        student = make(student_shape)
        torch.manual_seed(1)
        teacher = make(teacher_shape).eval()
    teacher.requires_grad_(False)
    fused = True if device.startswith("cuda") else None
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


# ---- the measurements ------------------------------------------------------------------------

def measure(kinds, student_shape, teacher_shape, vocab, windows, tokens, warmup, steps, device, dtype, chunk, peak):
    """Rows of results for each window x variant: `warmup` untimed steps, `steps` timed steps (their
    median), then one step whose peak memory is measured (untimed: resetting the memory counters
    makes the step fault its pages in afresh; when steps == 0 its time is reported instead).
    Variants alternate step by step so that a change of machine load slows all of them alike."""
    amp = (torch.autocast(device.split(":")[0], dtype=getattr(torch, dtype)) if dtype != "float32"
           else contextlib.nullcontext())
    models = {k: build(k, student_shape, teacher_shape, vocab, max(windows), device) for k in kinds}
    rows = []
    for T in windows:
        B = max(1, tokens // T)
        g = torch.Generator().manual_seed(T)
        idx = torch.randint(0, vocab, (B, T), generator=g).to(device)
        pos = torch.arange(T, device=device).expand(B, T)
        times, mems, losses, failed = {k: [] for k in kinds}, {}, {}, {}
        for i in range(warmup + steps + 1):
            memory_step = i == warmup + steps
            for k in kinds:
                if k in failed:
                    continue
                if memory_step:  # the baseline: weights, optimizer state and batch, without last step's gradients
                    models[k][2].zero_grad(set_to_none=True)
                base = mem_start(device) if memory_step else None
                t0 = time.perf_counter()
                try:
                    loss = train_step(k, *models[k], idx, pos, amp, chunk)
                except torch.OutOfMemoryError:
                    failed[k] = "out of memory"
                    models[k][2].zero_grad(set_to_none=True)
                    if device.startswith("cuda"):
                        torch.cuda.empty_cache()
                    continue
                sync(device)
                dt = time.perf_counter() - t0
                losses.setdefault(k, float(loss))  # the first step's loss: ours and naive must agree
                if memory_step:
                    mems[k] = mem_peak(device, base)
                if i >= warmup and (steps == 0 or not memory_step):
                    times[k].append(dt)
        for k in kinds:
            row = {"window": T, "rows": B, "variant": k}
            if k in failed:
                rows.append({**row, "error": failed[k]})
                continue
            step_s = statistics.median(times[k])
            fpt = step_flops_per_token(student_shape, teacher_shape, vocab, T,
                                       llama_intermediate if k == "transformers" else None)
            achieved = fpt * B * T / step_s
            rows.append({**row, "step_s": step_s, "tok_s": B * T / step_s,
                         "peak_mib": None if mems[k] is None else mems[k] / 2 ** 20,
                         "gflop_per_token": fpt / 1e9, "achieved_gflops": achieved / 1e9,
                         "matmul_fraction": achieved / peak, "first_loss": losses[k]})
    return rows


def fmt(x, spec):
    return "-" if x is None else format(x, spec)


def print_table(title, rows):
    print(f"\n{title}")
    print(f"{'window':>7} {'rows':>4}  {'variant':<13}{'tokens/s':>10} {'step s':>8} {'peak MiB':>9} "
          f"{'GFLOP/tok':>10} {'GFLOP/s':>9} {'of matmul':>9} {'1st loss':>9}")
    for r in rows:
        head = f"{r['window']:>7} {r['rows']:>4}  {r['variant']:<13}"
        if "error" in r:
            print(head + f"  ({r['error']})")
            continue
        print(head + f"{r['tok_s']:>10,.0f} {r['step_s']:>8.3f} {fmt(r['peak_mib'], '>9,.0f')} "
              f"{r['gflop_per_token']:>10.4f} {r['achieved_gflops']:>9.1f} {r['matmul_fraction']:>9.1%} "
              f"{r['first_loss']:>9.4f}")


def pick(rows, variant, window=None):
    for r in rows:
        if r["variant"] == variant and (window is None or r["window"] == window) and "error" not in r:
            return r
    return None


def headlines(sweep, mem_rows, windows, mem_window):
    ratios = [pick(sweep, "ours", T)["tok_s"] / pick(sweep, "transformers", T)["tok_s"] for T in windows
              if pick(sweep, "ours", T) and pick(sweep, "transformers", T)]
    ours_m, naive_m = pick(mem_rows, "ours", mem_window), pick(mem_rows, "naive", mem_window)
    first = pick(sweep, "ours", windows[0])
    return {
        "speedup_vs_transformers": math.exp(statistics.fmean(map(math.log, ratios))) if ratios else None,
        "memory_vs_naive": (ours_m["peak_mib"] / naive_m["peak_mib"]
                            if ours_m and naive_m and ours_m["peak_mib"] and naive_m["peak_mib"] else None),
        "matmul_fraction": first["matmul_fraction"] if first else None,
    }


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto (cuda uses the gpu preset shapes and bf16)")
    p.add_argument("--quick", action="store_true", help="reduced run (CPU: <= 5 min on 2 cores)")
    p.add_argument("--json", default=None, help="write all results and the headline keys to this file")
    p.add_argument("--variants", type=lambda s: s.split(","), default=list(VARIANTS),
                   help="comma-separated subset of ours,naive,transformers")
    p.add_argument("--tf32", action="store_true",
                   help="CUDA: allow TF32 for fp32 matmuls (our loss's head matmuls run in fp32; distill.py leaves TF32 off)")
    p.add_argument("--no_memory_point", action="store_true", help="skip the full-vocabulary memory point")
    shape = lambda s: tuple(int(x) for x in s.split(","))  # noqa: E731
    g = p.add_argument_group("overrides of the setup (default: the device's setup, reduced by --quick)")
    g.add_argument("--student", type=shape, help="layers,heads,width")
    g.add_argument("--teacher", type=shape, help="layers,heads,width")
    g.add_argument("--vocab", type=int, help="vocabulary of the sweep (CPU default: distill.py's compact 4096)")
    g.add_argument("--windows", type=lambda s: [int(x) for x in s.split(",")], help="comma-separated windows")
    g.add_argument("--tokens", type=int, help="tokens per step (rows = tokens / window, at least 1)")
    g.add_argument("--warmup", type=int, help="untimed steps per variant and window")
    g.add_argument("--steps", type=int, help="timed steps per variant and window")
    g.add_argument("--mem_vocab", type=int, help="vocabulary of the memory point (GPT-2: 50257)")
    g.add_argument("--mem_window", type=int, help="window of the memory point (one row)")
    g.add_argument("--mem_warmup", type=int, help="steps before the memory point's one measured step")
    g.add_argument("--dtype", choices=["float32", "bfloat16"], help="autocast dtype (weights stay fp32)")
    g.add_argument("--chunk", type=int, default=2048, help="rows per chunk of our loss (head_loss)")
    g.add_argument("--matmul_n", type=int, help="size of the square reference matmul (CPU 1024, CUDA 8192)")
    args = p.parse_args(argv)
    if not args.variants or set(args.variants) - set(VARIANTS):
        p.error(f"--variants must name some of {','.join(VARIANTS)}")
    if (args.steps or 1) < 1 or (args.tokens or 1) < 1 or (args.chunk or 1) < 1:
        p.error("--steps, --tokens and --chunk must be positive")
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda: CUDA is not available here")
    kind = "cuda" if args.device.startswith("cuda") else "cpu"
    setup = {**SETUPS[kind], **(QUICK[kind] if args.quick else {})}
    for k, v in setup.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    return args


def main(argv=None):
    args = parse_args(argv)
    t0 = time.time()
    dev, kind = args.device, "cuda" if args.device.startswith("cuda") else "cpu"
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    where = torch.cuda.get_device_name(dev) if kind == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"bench: torch {torch.__version__}, {where}, {args.dtype}, load average {load:.2f} before start "
          f"(timings are noisy when other work runs)")
    if args.tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
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
          f"{args.tokens} tokens/step, {args.warmup} warm-up + {args.steps} timed + 1 memory step;\n"
          f"model FLOPs/token = 3 x fwd(student) + fwd(teacher), fwd = 2*(12*L*C^2 + V*C) + 2*L*C*T "
          f"({fpt / 1e6:.2f} MFLOP at T={args.windows[0]})")

    sweep = measure(kinds, args.student, args.teacher, args.vocab, args.windows, args.tokens, args.warmup,
                    args.steps, dev, args.dtype, args.chunk, peak)
    mem_rows = []
    if not args.no_memory_point:
        # One row of mem_window tokens at the full vocabulary: B*T*V logits dominate the naive step.
        mem_kinds = kinds
        need = 8 * args.mem_window * args.mem_vocab * 4  # measured here: naive holds ~7 fp32 [T, V] tensors at its peak
        if kind == "cpu" and hasattr(os, "sysconf") and need > os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"):
            mem_kinds = ["ours"]
            print(f"memory point: the full-logits variants need ~{need / 2 ** 30:.0f} GiB, more than is free: only ours runs")
        mem_rows = measure(mem_kinds, args.student, args.teacher, args.mem_vocab, [args.mem_window], args.mem_window,
                           args.mem_warmup, 0, dev, args.dtype, args.chunk, peak)
    peak = max(peak, matmul_flops(dev, mm_dtype, n))  # again at the end: the better of the two readings
    for r in sweep + mem_rows:
        if "error" not in r:
            r["matmul_fraction"] = r["achieved_gflops"] * 1e9 / peak

    print(f"\nmeasured {args.dtype} matmul ({n}^3, best of start and end): {peak / 1e9:,.1f} GFLOP/s")
    print_table(f"speed: vocab {args.vocab}, {args.tokens} tokens per step", sweep)
    if mem_rows:
        print_table(f"memory point: vocab {args.mem_vocab}, one row of {args.mem_window} tokens, one step after "
                    f"{args.mem_warmup} warm-up (peak = memory a step adds above weights, optimizer state, batch)",
                    mem_rows)
    head = headlines(sweep, mem_rows, args.windows, args.mem_window)
    print(f"\nspeedup_vs_transformers {fmt(head['speedup_vs_transformers'], '.2f')} "
          f"(our tokens/s / theirs, geometric mean over windows {args.windows})")
    print(f"memory_vs_naive         {fmt(head['memory_vs_naive'], '.3f')} "
          f"(our peak / naive peak, T={args.mem_window}, vocab {args.mem_vocab})")
    print(f"matmul_fraction         {fmt(head['matmul_fraction'], '.1%')} "
          f"(our model FLOP/s / measured matmul FLOP/s, T={args.windows[0]}, vocab {args.vocab})")
    print(f"bench took {time.time() - t0:.0f} s")
    if args.json:
        out = {**head, "device": where, "torch": torch.__version__, "dtype": args.dtype, "quick": args.quick,
               "tf32": args.tf32, "transformers": tf.__version__ if tf is not None else None, "matmul_gflops": peak / 1e9,
               "load_average_before": load,
               "config": {k: getattr(args, k) for k in ("student", "teacher", "vocab", "windows", "tokens", "warmup",
                                                        "steps", "mem_vocab", "mem_window", "chunk")},
               "sweep": sweep, "memory_point": mem_rows}
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=1)
        print(f"results -> {args.json}")
    return head


if __name__ == "__main__":
    main()
    sys.exit(0)
