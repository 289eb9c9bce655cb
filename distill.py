"""
Long-context extension by logit distillation, phase by phase (arXiv 2604.06070).

    python distill.py --phase 0   # teacher: CE at the long window, large RoPE base, long documents + passkeys
    python distill.py --phase 1   # student, short phase: short window, small base, short documents only
    python distill.py --phase 2   # student, extension: window x8 (cpu preset), new base, still only short
                                  #   documents, packed into the long window; loss = KD from the teacher

Each phase starts from the previous phase's checkpoint (OUT/phaseN.pt) and trains missing
prerequisites first (the teacher when this phase or the next distils from it), so `python distill.py
--phase 1` works on a fresh clone and leaves what --phase 2 needs.  A finished phase is never
overwritten unless --force is given; a killed phase continues with --resume.
Multi-GPU (or multi-process CPU): torchrun --nproc_per_node=N distill.py --phase K.
--smoke runs a preset's whole path (every phase, window, vocabulary, eval) with tiny models
and 2 steps per phase, on any machine: a check that the path works, not a result.
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
from config import PRESETS, TEACHER_DATA, UsageError, parse_args, per_phase, window_of  # noqa: F401 (PRESETS: read by the tools)
from loss import free_buffers, head_loss
from model import GPT, GPTConfig

# ---- what each phase trains --------------------------------------------------------------

def pose_lens(args):
    """PoSE's row lengths: the short window unless --pose_len packs several documents into a row."""
    return args.pose_len or [args.short_len]


def rows_of(args, phase):
    """Rows per step: the teacher's as given; a student's shrink with its window (the same tokens per step)."""
    return args.teacher_batch if phase == 0 else max(1, per_phase(args.batch, phase) * args.short_len // window_of(args, phase))


def uses_teacher(args, phase):
    """Only KD needs the teacher: a CE phase builds the same vocabulary from the corpus itself."""
    return phase >= 1 and per_phase(args.loss, phase) != "ce"


def vocab_for(args, corpus):
    """The one vocabulary of teacher and students: derived from the corpus and the key digits alone."""
    return data.Vocab.compact(corpus, args.key_digits, args.vocab_size) if args.vocab == "compact" else data.Vocab.gpt2()


def model_config(args, phase, vocab_size):
    who = "teacher" if phase == 0 else "student"
    cfg = GPTConfig(vocab_size=vocab_size, n_layer=getattr(args, f"{who}_layers"),
                    n_head=getattr(args, f"{who}_heads"), n_embd=getattr(args, f"{who}_embd"))
    if phase == 0:
        cfg.rope = {"rule": "fixed", "theta": args.teacher_theta}
    else:
        theta1 = args.theta1 or rope.phasewise_theta(cfg.head_dim, args.short_len)
        cfg.rope = rope.schedule(args.rope, cfg.head_dim, window_of(args, phase), args.short_len, theta1)
    return cfg


def sampler_for(args, corpus, phase, split="train"):
    """(sampler, longest document): the teacher (and --data_mode long) gets documents up to the whole window."""
    window = window_of(args, phase)
    pk, cp, fill = TEACHER_DATA.values() if phase == 0 else (args.passkey_frac, args.copy_frac, args.filler_frac)
    if phase == 0 or args.data_mode == "long":
        shortest = min(window, data.passkey_len([0] * data.max_key_len(args.key_digits)) + 4 if pk > 0 else 16)
        return data.DocSampler(corpus, shortest, window, pk, args.key_digits, args.answer_weight, split, cp,
                               args.teacher_curriculum if phase == 0 else args.curriculum, fill), None
    return (data.DocSampler(corpus, max(2, args.short_len // 4), args.short_len, pk, args.key_digits,
                            args.answer_weight, split, cp, filler_frac=fill, snippets=args.snippets), args.short_len)


def ckpt_path(args, phase, partial=False):
    return os.path.join(args.out, f"phase{phase}{'.partial' if partial else ''}.pt")


def lr_at(step, steps, peak, warmup):
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def step_shape(sampler, window, batch):
    """
    (rows length, number of rows) of one step.  While a curriculum keeps documents short, the
    rows shrink with them (halving down to 64 tokens) and their number grows, so every step
    holds the same number of tokens but costs far less attention (sequence-length warm-up).
    """
    T = window
    while sampler.curriculum > 0 and T % 2 == 0 and T // 2 >= max(64, sampler.longest()):
        T //= 2
    return T, batch * (window // T)


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
    if args.dtype != "float32" and dev == "cpu" and not args.smoke:
        print(f"note: --dtype {args.dtype} on CPU is slow; float32 recommended")
    world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
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


# ---- the models of a phase -----------------------------------------------------------------

def init_student(args, phase, vocab, device):
    """Phase 1: fresh weights (seed --seed).  Phase k>1: phase k-1's weights with phase k's RoPE."""
    cfg = model_config(args, phase, len(vocab))
    if phase == 1 and args.init is None:
        torch.manual_seed(args.seed)
        return GPT(cfg).to(device), f"scratch(seed={args.seed})"
    path = args.init or ckpt_path(args, phase - 1)
    return checkpoint.load_student(path, cfg, vocab, args.short_len, args.key_digits, window_of(args, phase), device), path


def setup_phase(args, phase, corpus, device, rank, world):
    """Everything one phase needs, as a namespace: models, vocabulary, data, optimizer, where to resume."""
    s = argparse.Namespace(phase=phase, window=window_of(args, phase), teacher=None, mix=0.0, pose=False)
    s.batch = rows_of(args, phase)
    if s.batch % world:  # checked before any model is built or loaded
        raise UsageError(f"{s.batch} rows per step at window {s.window} cannot be split over {world} processes; change --batch")
    if phase == 0:
        s.steps, s.lr, s.packing = args.teacher_steps, args.teacher_lr, args.teacher_packing
        s.vocab = vocab_for(args, corpus)
        torch.manual_seed(args.seed + 1_000_003)  # the teacher's own stream: never the student's init
        s.model, s.lineage = GPT(model_config(args, 0, len(s.vocab))).to(device), f"scratch(seed={args.seed}+1000003)"
        s.positions = {"doc_mask": "reset", "cross_doc": "continuous"}[args.teacher_packing]
    else:
        s.steps, s.lr, s.packing = per_phase(args.steps, phase), per_phase(args.lr, phase), args.packing
        # PoSE only where the window outgrows the rows: phase 1 trains its own window with plain positions
        s.pose = args.positions == "pose" and s.window > max(pose_lens(args))
        s.positions = "continuous" if args.positions == "pose" else args.positions
        s.mix = {"kd": 1.0, "ce": 0.0, "mix": args.mix}[per_phase(args.loss, phase)]
        s.vocab = vocab_for(args, corpus)
        if uses_teacher(args, phase):
            teacher_path = args.teacher or ckpt_path(args, 0)
            s.teacher, teacher_vocab, teacher_window = checkpoint.load_teacher(teacher_path, args.key_digits, device)
            if teacher_vocab != s.vocab:
                raise checkpoint.CheckpointError(f"teacher {teacher_path} uses another vocabulary than this corpus gives "
                                                 f"(--data / --vocab / --vocab_size differ from the teacher's run)")
            if s.window > teacher_window:
                say(rank, f"warning: phase {phase} window {s.window} exceeds the teacher's training window {teacher_window}")
        s.model, s.lineage = init_student(args, phase, s.vocab, device)
    s.sampler, s.max_doc = sampler_for(args, corpus, phase)
    too_many_epochs = data.epoch_warning(corpus, s.steps * s.batch * s.window)
    if too_many_epochs:
        say(rank, too_many_epochs)
    s.optimizer = s.model.configure_optimizer(s.lr, args.weight_decay, fused=True if device.startswith("cuda") else None)
    s.rng = np.random.default_rng([args.seed, phase, 7])
    s.partial, s.start, s.time_before = ckpt_path(args, phase, partial=True), 0, 0.0
    if args.resume and os.path.exists(s.partial):
        ck = checkpoint.load(s.partial)
        s.model.load_state_dict(ck["model"])
        s.optimizer.load_state_dict(ck["optimizer"])
        s.rng.bit_generator.state, s.start = ck["rng"], ck["step"]
        s.time_before = ck.get("train_time_s")  # training time before the kill (None: a partial file that did not keep it)
        say(rank, f"resuming phase {phase} at step {s.start} from {s.partial}")
    return s


# ---- one phase: setup, loop, finish ----------------------------------------------------------

def run_phase(args, phase, corpus, device, rank, world):
    s = setup_phase(args, phase, corpus, device, rank, world)
    rows = " or ".join(map(str, pose_lens(args)))
    say(rank, f"phase {phase} ({'teacher' if phase == 0 else 'student'}): {s.model.num_params() / 1e6:.2f}M params, "
              f"window {s.window}, RoPE {rope.describe(s.model.cfg.rope)}, loss "
              f"{'CE' if s.mix == 0 else 'KD' if s.mix == 1 else f'{s.mix}*KD+{1 - s.mix:g}*CE'}, data "
              f"{'long documents' if s.max_doc is None else f'documents <= {s.max_doc} tokens'} ({s.packing}, "
              f"{f'PoSE: rows of {rows} in {args.pose_chunks} chunks, ids < {args.pose_reach or s.window}' if s.pose else s.positions}), "
              f"vocab {len(s.vocab)}, {s.steps} steps x {s.batch} x {s.window} tokens, init {s.lineage}")
    t0 = time.time()
    stats = train_loop(args, s, device, rank, world)
    free_buffers()  # the loss's reusable [chunk, V] scratch: not needed by the eval or the next phase
    elapsed = time.time() - t0
    if rank == 0:
        final = {**record(args, s, s.model), "step": s.steps, "train_time_s": round(elapsed + (s.time_before or 0.0), 1),
                 "train_time_complete": s.time_before is not None, "final_loss": stats.tolist()}
        checkpoint.save(ckpt_path(args, phase), final)
        if os.path.exists(s.partial):
            os.remove(s.partial)
        say(rank, f"phase {phase} done in {elapsed / 60:.1f} min -> {ckpt_path(args, phase)}")
        end_of_phase_eval(args, s, corpus, device, elapsed, stats)
    if world > 1:
        dist.barrier()


def train_loop(args, s, device, rank, world):
    """The optimizer steps of one phase; returns the last step's [loss, kd, ce]."""
    model, teacher = s.model, s.teacher
    train_model = torch.compile(model) if args.compile else model
    teacher_fwd = torch.compile(teacher) if (args.compile and teacher is not None) else teacher
    if world > 1:
        train_model = torch.nn.parallel.DistributedDataParallel(train_model)
    amp = (torch.autocast(device.split(":")[0], dtype=getattr(torch, args.dtype))
           if args.dtype != "float32" else contextlib.nullcontext())
    log = open_log(os.path.join(args.out, f"phase{s.phase}.jsonl"), s.start) if rank == 0 else None
    bar = tqdm(range(s.start, s.steps), initial=s.start, total=s.steps, desc=f"phase {s.phase}", disable=rank != 0,
               dynamic_ncols=True, mininterval=1.0)
    t0, tokens_seen, stats = time.time(), 0, torch.zeros(3)
    model.train()
    for step in bar:
        lr = lr_at(step, s.steps, s.lr, args.warmup)
        for group in s.optimizer.param_groups:
            group["lr"] = lr
        s.sampler.progress = step / s.steps
        full = draw_batch(args, s)  # every rank draws the global batch
        T, n_rows = full["idx"].shape[1], len(full["idx"])
        total = float(full["weights"].sum())  # normaliser over the global batch (exact DDP == 1 process)
        b = {k: v[rank::world].to(device) for k, v in full.items()}
        pos = b["pos"]
        attn_doc = b["doc"] if s.packing == "doc_mask" else None
        with amp:
            h = train_model(b["idx"], pos, attn_doc, hidden_only=True)
            h_t = None
            if teacher_fwd is not None:
                # The teacher sees exactly what the student sees: the same packed window, positions and
                # mask.  Whatever its soft targets carry about other documents (cross-document packing)
                # is what KD can transfer; the results turn on this line (README, "the teacher's view").
                with torch.no_grad():
                    h_t = teacher_fwd(b["idx"], pos, attn_doc, hidden_only=True)
        out = head_loss(h.flatten(0, 1), model.head_weight(), b["targets"].flatten(), b["weights"].flatten(),
                        None if h_t is None else h_t.flatten(0, 1), None if teacher is None else teacher.head_weight(),
                        s.mix, args.temperature, args.chunk, total / world)
        s.optimizer.zero_grad(set_to_none=True)
        out[0].backward()
        if world > 1:
            dist.all_reduce(out, op=dist.ReduceOp.SUM)
            out /= world
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        s.optimizer.step()
        tokens_seen += n_rows * T
        stats = out.detach().cpu()
        if rank == 0:
            tok_s = tokens_seen / (time.time() - t0)
            bar.set_postfix(loss=f"{stats[0]:.3f}", tok_s=f"{tok_s:,.0f}", refresh=False)
            if (step + 1) % args.log_every == 0 or step + 1 == s.steps:
                log.write(json.dumps({"step": step + 1, "loss": float(stats[0]), "kd": float(stats[1]), "ce": float(stats[2]),
                                      "lr": lr, "grad_norm": float(grad_norm), "tok_s": round(tok_s),
                                      "time_s": round(time.time() - t0, 2)}) + "\n")
                log.flush()
            if (step + 1) % args.ckpt_every == 0 and step + 1 < s.steps:
                checkpoint.save(s.partial, {**record(args, s, model), "step": step + 1,
                                            "optimizer": s.optimizer.state_dict(), "rng": s.rng.bit_generator.state,
                                            "train_time_s": None if s.time_before is None else s.time_before + time.time() - t0})
    bar.close()
    if log is not None:
        log.close()
    return stats


def draw_batch(args, s):
    """
    One step's rows, their tensors and position ids, from the phase's random stream.  Packed: rows of the
    window (shorter under a length curriculum), positions from the document ids.  PoSE: as many tokens in
    rows of --pose_len (the short window by default; one of a list, drawn per step), each with skipped
    positions that reach across the phase's window.
    """
    if s.pose:
        lens = pose_lens(args)
        T = lens[0] if len(lens) == 1 else lens[int(s.rng.integers(len(lens)))]
        n_rows = s.batch * s.window // T
    else:
        T, n_rows = step_shape(s.sampler, s.window, s.batch)
    full = data.make_batch([data.pack(s.sampler, s.rng, T, s.max_doc) for _ in range(n_rows)], s.vocab)
    full["pos"] = (data.pose_positions(s.rng, n_rows, T, args.pose_reach or s.window, args.pose_chunks) if s.pose
                   else data.positions_from_docs(full["doc"], s.positions))
    return full


def open_log(path, start):
    """The phase's JSONL loss log; on resume, keep only the lines up to the checkpointed step."""
    kept = []
    if start > 0 and os.path.exists(path):
        with open(path) as fh:
            kept = [line for line in fh if line.strip() and json.loads(line)["step"] <= start]
    log = open(path, "w")
    log.writelines(kept)
    return log


def record(args, s, model):
    """Everything a later phase, the eval or tools/analyze.py needs to rebuild and check this model."""
    return {"phase": s.phase, "model": model.state_dict(), "model_config": model.cfg.as_dict(), "vocab": s.vocab.state(),
            "window": s.window, "short_len": args.short_len, "key_digits": args.key_digits, "lineage": s.lineage,
            "machine": eval_retrieval.machine(),
            "args": {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool, type(None)))}}


def end_of_phase_eval(args, s, corpus, device, elapsed, stats):
    lengths = eval_retrieval.default_lengths(s.window)
    records = eval_retrieval.passkey(s.model, s.vocab, lengths, n=args.eval_n, digits=args.key_digits, device=device)
    text = eval_retrieval.text_loss_by_position(s.model, s.vocab, corpus, s.window, n_windows=2 * args.eval_n, device=device)
    print(f"\npasskey retrieval after phase {s.phase} (teacher-forced exact match, {args.eval_n} prompts per cell):")
    print(eval_retrieval.format_table([f"phase{s.phase}"], [records], lengths, eval_retrieval.DEPTHS))
    print(f"held-out text loss by quarter of the {s.window}-token window: " + " ".join(f"{x:.3f}" for x in text))
    summary = {"phase": s.phase, "window": s.window, "train_time_s": round(elapsed, 1), "final_loss": stats.tolist(),
               "machine": eval_retrieval.machine(), "prompts_per_cell": args.eval_n,
               "passkey_by_length": {L: eval_retrieval.accuracy(records, length=L) for L in lengths},
               "text_loss_by_quarter": text, "records": records}
    with open(os.path.join(args.out, f"phase{s.phase}.eval.json"), "w") as fh:
        json.dump(summary, fh)


def main(argv=None):
    try:
        args = parse_args(argv)
        preflight(args)
        device, rank, world = setup_runtime(args)
        corpus = data.load_corpus(args.data)
        target = ckpt_path(args, args.phase)
        if os.path.exists(target) and not args.force:
            say(rank, f"phase {args.phase} is already finished: {target} (use --force to retrain it, or --out for a new run)")
            return 0
        for phase in phases_to_train(args):
            if phase != args.phase:
                say(rank, f"phase {phase} checkpoint {ckpt_path(args, phase)} not found: training phase {phase} first")
            check_unfinished(args, phase)
            run_phase(args, phase, corpus, device, rank, world)
    except (UsageError, checkpoint.CheckpointError, data.DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


def preflight(args):
    """Bad paths are one-line errors before anything trains (a missing teacher must not train for minutes
    before a truncated --init is noticed)."""
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise UsageError(f"--out {args.out} is a file; give a folder for the run's checkpoints and logs")
    if args.init and args.phase < 2:
        raise UsageError(f"--init starts an extension phase (2, 3, ...) from a student checkpoint; phase {args.phase} starts from scratch")
    for flag, path, check in (("--teacher", args.teacher, lambda p: checkpoint.load_teacher(p, args.key_digits)),
                              ("--init", args.init, lambda p: checkpoint.check_student(
                                  checkpoint.load(p), p, (args.student_layers, args.student_heads, args.student_embd),
                                  args.short_len, args.key_digits))):
        try:
            if path:
                check(path)
        except checkpoint.CheckpointError as e:
            raise checkpoint.CheckpointError(f"{flag}: {e}") from None
    try:  # last: a bad command line leaves no new folder behind
        os.makedirs(args.out, exist_ok=True)
    except OSError as e:
        raise UsageError(f"--out {args.out} cannot be created ({e.strerror})") from None


def phases_to_train(args):
    """The requested phase and its missing prerequisites, in order: the students before it (none with --init),
    and the teacher when a phase to train or the next one distils from it -- so the Quickstart's CE phase 1
    leaves everything its KD phase 2 needs, and each of the two commands stays near half the pipeline's time."""
    students = [k for k in range(1, args.phase) if not args.init and not os.path.exists(ckpt_path(args, k))] + \
               ([args.phase] if args.phase >= 1 else [])
    need_teacher = args.phase == 0 or any(uses_teacher(args, k) for k in students + [args.phase + 1])
    teacher_missing = not os.path.exists(args.teacher or ckpt_path(args, 0))  # a given --teacher exists (preflight)
    return ([0] if need_teacher and (args.phase == 0 or teacher_missing) else []) + students


def check_unfinished(args, phase):
    partial = ckpt_path(args, phase, partial=True)
    if os.path.exists(partial) and not (args.resume or args.force):
        raise UsageError(f"an unfinished phase {phase} run is in {partial}: add --resume to continue it or --force to start over")


if __name__ == "__main__":
    sys.exit(main())
