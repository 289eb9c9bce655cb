"""
One prepared run for a CUDA machine (<= 9 minutes on one H200, estimated: not measured yet), every
result in one JSON:

  1. attention paths against each other, forward and backward, in bf16, on packed documents:
     model.attention (flash-attn's varlen kernel when flash_attn is installed, else SDPA with a
     boolean document-causal mask), SDPA with the mask, and SDPA run per document, each against
     an fp32 SDPA reference; plain causal too.  A path is OK when its largest error is within
     the bf16 tolerance relative to the reference's largest value.
  2. tools/bench.py --device cuda (gpu preset shapes, bf16 autocast), MFU against the GPU's own
     bf16 matmul FLOP/s measured in the same run; then the longest window again with TF32
     allowed, since our loss computes its head matmuls in fp32 (distill.py leaves TF32 off).
  3. a short full pipeline of the gpu preset (teacher, phase 1, phase 2 at reduced steps) with
     its passkey tables: the path works end to end on the GPU; at these step counts its
     accuracies are a functional check, not a result.
  4. the headline comparison (tools/ablate.py --variants ce-long,kd,ce --seeds 1: phase 1 as the
     lower reference, CE on long documents as the upper one, KD and CE on short packed documents)
     at >= 8x the CPU headline's scale (HEADLINE below): teacher 4 x 512 (8 heads of 64) trained
     at 4096, student 4 x 256 (4 heads of 64), short window 128 -> extension 1024, so the
     teacher's window is 4x the student's target; compact vocabulary of 4096 ids, bf16 autocast.
     Its summary and every model's accuracy by key distance go into the JSON under "headline",
     its runs into OUT/headline; ablate prints its report table.

Time, estimated from FLOPs (nothing here has run on an H200 yet): stages 1-3 about 6 min -- mostly
the pipeline's 16 x 1024 teacher, 300 steps x 65 k tokens x ~2.3 GFLOP per trained token = 46
PFLOP, 2-4 min at 200-400 TFLOP/s, and the benchmark's ~150 timed steps of the gpu preset's
shapes, 1.5-2 min.  Stage 4 is planned at 2.6 min by headline_seconds(): model FLOPs (6 N + 6 L C T
per trained token, a third of that per token a teacher only scores) at 100 TFLOP/s, a tenth of the
H200's dense bf16 peak -- conservative for 4-layer models of width 256-512 whose output heads run in
fp32 -- plus the CPU's packing of every batch at 1 M tokens/s (it runs between the GPU's steps;
0.5-5 M/s measured on a loaded 2-core VM, short documents the slowest), 10 s per distill.py start
(python, torch, CUDA, the vocabulary: three starts, teacher, phase 1 and the three variants side by
side) and 30 s of evaluation.  Teacher 1500 steps x 16 k tokens (~59 s), phase 1 1000 x 8 k (~13 s),
the three extension runs 600 x 16 k each, sharing the GPU (~22 s).

Time guard: stage 4 gets what is left of --budget (530 s: 9 min less the start) after stages 1-3.  When that is less than
its plan, every phase's steps (teacher, phase 1, extension) are multiplied by one factor
f = (left - fixed) / (plan - fixed), where fixed is the part that does not shrink with the steps
(process starts and evaluation); below f = 0.25 the stage is skipped (a note in the JSON), as it is
with --no_headline.  The JSON's "stage_seconds" are the measurements to replace these estimates with.

    PYTHONUNBUFFERED=1 python3 tools/gpu_check.py --json $OUT/gpu_check.json --out $OUT/pipeline
    python tools/gpu_check.py --device cpu --tiny     # dry run of the script's logic on a CPU (every stage,
                                                      # the headline under ablate --smoke)
The JSON is rewritten after every stage, so a run cut short keeps what it finished.
Exit status 1 when an attention path disagrees, or the pipeline or the headline comparison fails.
"""

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the core modules live one folder up

import torch
import torch.nn.functional as F

import ablate
import bench
import distill
import model

TOL = 3e-2  # bf16: ~0.4% per rounding, a few roundings per output; a wrong mask gives errors of order 1

# Stage 4: the headline comparison at >= 8x the CPU headline (config.PRESETS["cpu"]: teacher 2 x 192 at 512,
# student 2 x 128 with 64-dim heads, 64 -> 512).  Non-embedding parameters 14x (teacher) and 8x (student), the
# teacher's window 8x and 4x the student's extension window (on the CPU the two are equal): the teacher has
# trained on every key distance the student is asked to reach, and on four times longer ones.  Tokens per step
# 4x the CPU's in every phase.  Phase 1 learns by CE, as the presets have it.  The teacher reads
# 14 epochs of the default corpus's 1.7 M training tokens (distill.py warns); its passkeys are drawn afresh.
HEADLINE = dict(teacher_layers=4, teacher_heads=8, teacher_embd=512, teacher_window=4096, teacher_steps=1500,
                teacher_batch=4, teacher_lr=2e-3,                        # 4 rows x 4096 = 16 k tokens per step
                student_layers=4, student_heads=4, student_embd=256, short_len=128, window=1024,
                phase1_steps=1000, phase1_batch=64,                      # 64 rows x 128 = 8 k tokens
                steps=600, batch=128,                                    # extension: 16 rows x 1024 = 16 k tokens
                lr=3e-3, vocab_size=4096, n=20)                          # n: passkey prompts per (length, depth)
# --tiny: the same command under ablate --smoke (tiny models, 2 steps per phase, 1 prompt per cell), the CPU's
# windows (still 8x from short to extension, so that the long range 4x-8x holds prompts, and a 4x teacher).
HEADLINE_TINY = {**HEADLINE, "teacher_window": 2048, "short_len": 64, "window": 512}
HEADLINE_VARIANTS = ("ce-long", "kd", "ce")
SUMMARY_KEYS = ("phase1_window_acc", "ref_long_acc", "kd_long_acc", "ce_long_acc", "kd_mid_acc", "ce_mid_acc",
                "ref_mid_acc", "kd_reach")
BUDGET_S = 530      # the whole gpu_check: 9 minutes, less the interpreter's and torch's start before its clock
MODEL_FLOPS = 100e12  # FLOP/s assumed for these small models: ~10% of an H200's dense bf16 peak
PACK_TOKENS = 1e6   # tokens/s data.pack builds on one CPU core, synchronous with the GPU's steps
START_S = 10        # one distill.py process: python, torch, the CUDA context, corpus and vocabulary
EVAL_S = 30         # ablate's evaluation of five models and the transfer channel, plus three end-of-phase evals
MIN_FRACTION = 0.25  # fewer steps than this share of the plan: no comparison worth its minutes


def packed_docs(B, T, g, device):
    """Document ids [B, T] of documents of 1..T/4 tokens packed back to back (last one cut)."""
    doc = torch.empty(B, T, dtype=torch.long)
    for b in range(B):
        t, d = 0, 0
        while t < T:
            n = int(torch.randint(1, max(2, T // 4), (1,), generator=g))
            doc[b, t:t + n] = d
            t, d = t + n, d + 1
    return doc.to(device)


def per_document(q, k, v, doc):
    """SDPA run separately on every document (causal within it): the definition of document masking."""
    out = torch.empty_like(q)
    for b in range(q.shape[0]):
        change = torch.nonzero(doc[b, 1:] != doc[b, :-1]).flatten() + 1
        bounds = [0] + change.tolist() + [q.shape[2]]
        for s, e in zip(bounds, bounds[1:]):
            out[b:b + 1, :, s:e] = F.scaled_dot_product_attention(q[b:b + 1, :, s:e], k[b:b + 1, :, s:e],
                                                                  v[b:b + 1, :, s:e], is_causal=True)
    return out


def run_path(fn, q, k, v, grad_out):
    """Output and (dq, dk, dv) of one attention path for the same inputs and output gradient."""
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    out = fn(*leaves)
    out.backward(grad_out.to(out.dtype))
    return [out.detach().float()] + [x.grad.float() for x in leaves]


def check_attention(device, B=2, H=8, T=2048, D=64, dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, T, D, generator=g).to(device) for _ in range(3))
    grad_out = torch.randn(B, H, T, D, generator=g).to(device)
    doc = packed_docs(B, T, g, device)
    mask = model.doc_causal_mask(doc)
    fa = model._flash_attn() if device.startswith("cuda") else None
    print(f"attention check: B={B} H={H} T={T} D={D}, {int(doc.max()) + 1} documents in row 0, {dtype}; "
          f"flash_attn {'installed: model.attention uses it' if fa else 'absent: model.attention uses SDPA'}")
    ok, rows = True, []
    for masked in (True, False):
        ref = run_path((lambda a, b, c: F.scaled_dot_product_attention(a, b, c, attn_mask=mask)) if masked else
                       (lambda a, b, c: F.scaled_dot_product_attention(a, b, c, is_causal=True)), q, k, v, grad_out)
        lo = [x.to(dtype) for x in (q, k, v)]
        paths = {"model.attention": lambda a, b, c: model.attention(a, b, c, doc if masked else None)}
        if masked:
            paths["SDPA + mask"] = lambda a, b, c: F.scaled_dot_product_attention(a, b, c, attn_mask=mask)
            paths["SDPA per document"] = lambda a, b, c: per_document(a, b, c, doc)
        for name, fn in paths.items():
            got = run_path(fn, *lo, grad_out)
            errs = [float((x - r).abs().max() / r.abs().max()) for x, r in zip(got, ref)]
            good = max(errs) <= TOL
            ok &= good
            rows.append({"mask": "document" if masked else "causal", "path": name, "max_rel_err": dict(zip(("out", "dq", "dk", "dv"), errs)),
                         "ok": good})
            print(f"  {'document-masked' if masked else 'plain causal':<16} {name:<18} vs fp32 SDPA: relative max error "
                  f"out {errs[0]:.1e}  dq {errs[1]:.1e}  dk {errs[2]:.1e}  dv {errs[3]:.1e}  {'OK' if good else 'MISMATCH'}")
    return ok, rows


def short_pipeline(device, out, tiny):
    """distill.py --phase 2 --preset gpu at reduced steps (--smoke on a CPU dry run); the three passkey tables."""
    flags = ["--phase", "2", "--preset", "gpu", "--out", out, "--device", device]  # finished phases in OUT are kept
    flags += ["--smoke"] if tiny else ["--teacher_steps", "300", "--steps", "200", "--eval_n", "4", "--ckpt_every", "1000"]
    t0 = time.time()
    code = distill.main(flags)
    result = {"command": ablate.eval_retrieval.command_line("distill.py", flags), "exit": code, "seconds": round(time.time() - t0, 1)}
    for k in range(3):
        path = os.path.join(out, f"phase{k}.eval.json")
        if os.path.exists(path):
            with open(path) as fh:
                ev = json.load(fh)
            result[f"phase{k}"] = {key: ev[key] for key in ("window", "train_time_s", "passkey_by_length", "text_loss_by_quarter")}
    return result


def headline_seconds(cfg):
    """
    Planned wall seconds of stage 4 on one H200, by part.  Per token, a trained model costs
    3 x bench.forward_flops_per_token (forward + backward), a teacher that only gives soft targets
    1 x; the three extension runs share the GPU (their FLOPs add up) but pack their data on
    separate cores (one run's packing counts).
    """
    V = cfg["vocab_size"]
    def fwd(who, T):
        return bench.forward_flops_per_token(cfg[f"{who}_layers"], cfg[f"{who}_embd"], V, T)
    S, W = cfg["short_len"], cfg["window"]
    teacher_tok = cfg["teacher_steps"] * cfg["teacher_batch"] * cfg["teacher_window"]
    phase1_tok = cfg["phase1_steps"] * cfg["phase1_batch"] * S
    ext_tok = cfg["steps"] * cfg["batch"] * S  # --batch counts rows of the short window, whatever the window
    flops = {"teacher": teacher_tok * 3 * fwd("teacher", cfg["teacher_window"]),
             "phase1": phase1_tok * (3 * fwd("student", S) + fwd("teacher", S)),  # counted as if phase 1 distilled: an upper bound
             "extension": ext_tok * (3 * 3 * fwd("student", W) + fwd("teacher", W))}  # ce-long, kd, ce; kd's teacher
    tokens = {"teacher": teacher_tok, "phase1": phase1_tok, "extension": ext_tok}
    parts = {k: flops[k] / MODEL_FLOPS + tokens[k] / PACK_TOKENS for k in flops}
    parts["fixed"] = 3 * START_S + EVAL_S
    return {**{k: round(v, 1) for k, v in parts.items()}, "total": round(sum(parts.values()), 1)}


def fit_budget(cfg, left_s):
    """(cfg with every phase's steps scaled to fit left_s, factor), or (None, factor) below MIN_FRACTION."""
    plan = headline_seconds(cfg)
    if left_s >= plan["total"]:
        return dict(cfg), 1.0
    f = max(0.0, (left_s - plan["fixed"]) / (plan["total"] - plan["fixed"]))
    if f < MIN_FRACTION:
        return None, round(f, 3)
    return {**cfg, **{k: max(1, round(cfg[k] * f)) for k in ("teacher_steps", "phase1_steps", "steps")}}, round(f, 3)


def headline_argv(cfg, device, out, tiny):
    """The tools/ablate.py command line of stage 4: --flags holds every phase's distill.py flags (phase 1's
    steps and batch; ablate's own --steps / --batch come later on the extension's command line and win)."""
    flags = ["--vocab", "compact", "--vocab_size", cfg["vocab_size"], "--dtype", "bfloat16", "--eval_n", 2,
             "--ckpt_every", 100000, "--short_len", cfg["short_len"],
             *[x for k in ("layers", "heads", "embd") for who in ("teacher", "student") for x in (f"--{who}_{k}", cfg[f"{who}_{k}"])],
             *[x for k in ("window", "steps", "batch", "lr") for x in (f"--teacher_{k}", cfg[f"teacher_{k}"])],
             "--steps", cfg["phase1_steps"], "--batch", cfg["phase1_batch"], "--lr", cfg["lr"]]
    argv = ["--preset", "gpu", "--flags", " ".join(map(str, flags)), "--window", cfg["window"], "--steps", cfg["steps"],
            "--batch", cfg["batch"], "--seeds", 1, "--variants", ",".join(HEADLINE_VARIANTS), "--n", cfg["n"],
            "--jobs", len(HEADLINE_VARIANTS), "--device", device, "--out", out,
            "--results", os.path.join(out, "ablation.json"), "--png", "", *(["--smoke"] if tiny else [])]
    return [str(a) for a in argv]


def headline(device, out, tiny, left_s):
    """Stage 4: tools/ablate.py's headline comparison in this process (it prints its report table); its
    summary and every model's accuracy by key distance, or why it was skipped."""
    cfg0 = HEADLINE_TINY if tiny else HEADLINE
    plan = headline_seconds(cfg0)
    cfg, factor = fit_budget(cfg0, left_s)
    result = {"planned_s": plan, "left_s": round(left_s, 1), "step_factor": factor}
    if cfg is None:
        result["skipped"] = (f"{left_s:.0f} s left of the budget, the plan needs {plan['total']:.0f} s: "
                             f"fewer than {MIN_FRACTION:.0%} of its steps would fit")
        print(f"headline comparison skipped: {result['skipped']}")
        return result
    if factor < 1:
        print(f"headline comparison: {left_s:.0f} s left of the budget, planned {plan['total']:.0f} s: "
              f"every phase's steps x {factor:.2f}")
    argv = headline_argv(cfg, device, out, tiny)
    result.update(command="python tools/ablate.py " + " ".join(a if " " not in a else repr(a) for a in argv),
                  config=dict(cfg))
    if tiny:
        result["note"] = "ablate --smoke: distill.py's tiny models and 2 steps per phase replace config's, 1 prompt per cell"
    if device.startswith("cuda"):
        torch.cuda.empty_cache()  # the pipeline's cached blocks, for ablate's distill.py processes
    t0, own_argv = time.time(), sys.argv
    sys.argv = ["tools/ablate.py", *argv]  # ablate's results and report name the command from sys.argv
    try:
        code = ablate.main(argv)
    except SystemExit as e:  # a failed run: ablate names its log
        code = e.code if isinstance(e.code, int) else 1
        result["error"] = str(e.code)
    finally:
        sys.argv = own_argv
    result.update(exit=code, seconds=round(time.time() - t0, 1))
    path = os.path.join(out, "ablation.json")
    if code == 0 and os.path.exists(path):
        with open(path) as fh:
            r = json.load(fh)
        result.update(results=path, summary={k: r["summary"][k] for k in SUMMARY_KEYS},
                      mid_distance=[r["summary"]["mid_distance_from"], r["summary"]["mid_distance_to"]],
                      long_distance=[r["summary"]["long_distance_from"], r["summary"]["long_distance_to"]],
                      distance_buckets=r["setup"]["distance_buckets"],
                      # one seed: cell "kd-s0" is variant "kd"
                      by_distance={k.removesuffix("-s0"): c["by_distance"] for k, c in r["cells"].items()},
                      minutes=r["minutes"])
    return result


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--json", default=None, help="every result of the run, rewritten after each stage (e.g. $OUT/gpu_check.json)")
    p.add_argument("--out", default=None, help="folder of the short pipeline's checkpoints, and of the headline "
                   "comparison's runs in OUT/headline (default: a temporary folder)")
    p.add_argument("--tiny", action="store_true", help="tiny shapes: check this script's logic on a CPU")
    p.add_argument("--budget", type=float, default=BUDGET_S, help="seconds for the whole run: the headline "
                   "comparison's steps shrink to what the earlier stages left of it")
    p.add_argument("--no_headline", action="store_true", help="skip stage 4, the headline comparison")
    args = p.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu_check: CUDA is not available here (use --device cpu --tiny for a dry run)")
        return 2
    t0 = time.time()
    report = {"device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
              "torch": torch.__version__, "cuda": torch.version.cuda}

    def save():
        if args.json:
            os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
            with open(args.json, "w") as fh:
                json.dump(report, fh, indent=1)
    print(f"gpu_check: {report['device']}, torch {torch.__version__}, CUDA {torch.version.cuda}")
    ok, report["attention"] = check_attention(args.device, **(dict(B=2, H=2, T=64, D=16) if args.tiny else {}))
    save()
    tiny = (["--student", "1,2,16", "--teacher", "1,2,32", "--vocab", "64", "--windows", "32,64", "--tokens", "128",
             "--mem_vocab", "256", "--mem_window", "128", "--matmul_n", "256", "--steps", "2", "--warmup", "0"]
            if args.tiny else [])
    common = ["--device", args.device] + tiny
    longest = ["--windows", "64" if args.tiny else "8192", "--no_memory_point", "--variants", "ours"]
    with tempfile.TemporaryDirectory() as tmp:
        for key, extra in (("bench", []), ("bench_tf32", longest + ["--tf32"])):
            print(f"\n==== tools/bench.py {' '.join(common + extra)} ====", flush=True)
            path = os.path.join(tmp, f"{key}.json")
            bench.main(common + extra + ["--json", path])
            with open(path) as fh:
                report[key] = json.load(fh)
            save()
    report["stage_seconds"] = {"attention+bench": round(time.time() - t0, 1)}
    out = args.out or tempfile.mkdtemp(prefix="gpu_check_pipeline_")
    print(f"\n==== short pipeline of the gpu preset -> {out} ====", flush=True)
    report["pipeline"] = short_pipeline(args.device, out, args.tiny)
    report["stage_seconds"]["pipeline"] = report["pipeline"]["seconds"]
    report["seconds"] = round(time.time() - t0, 1)
    save()
    good = ok and report["pipeline"]["exit"] == 0
    if args.no_headline:
        report["headline"] = {"skipped": "--no_headline"}
    else:
        where = os.path.join(out, "headline")
        print(f"\n==== headline comparison (tools/ablate.py: phase 1, {', '.join(HEADLINE_VARIANTS)}) -> {where} ====",
              flush=True)
        report["headline"] = headline(args.device, where, args.tiny, args.budget - (time.time() - t0))
        report["stage_seconds"]["headline"] = report["headline"].get("seconds", 0.0)
        good &= report["headline"].get("exit", 0) == 0
    report["seconds"] = round(time.time() - t0, 1)
    save()
    hl = report["headline"]
    acc = {k: "-" if v is None else f"{v:.2f}" for k, v in hl.get("summary", {}).items()}
    hl_line = (f"skipped ({hl['skipped']})" if "skipped" in hl else f"exit {hl['exit']}" +
               (f", long range {hl['long_distance'][0]}-{hl['long_distance'][1]}: kd {acc['kd_long_acc']}, ce "
                f"{acc['ce_long_acc']}, ce-long {acc['ref_long_acc']}" if acc else ""))
    print(f"\ngpu_check: attention paths {'all OK' if ok else 'MISMATCH (see above)'}; pipeline exit "
          f"{report['pipeline']['exit']}; headline {hl_line}; {report['seconds']:.0f} s"
          f"{f'; -> {args.json}' if args.json else ''}")
    return 0 if good else 1


if __name__ == "__main__":
    sys.exit(main())
