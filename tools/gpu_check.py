"""
One prepared run for a CUDA machine (<= 8 minutes on one H200), every result in one JSON:

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

    PYTHONUNBUFFERED=1 python3 tools/gpu_check.py --json $OUT/gpu_check.json --out $OUT/pipeline
    python tools/gpu_check.py --device cpu --tiny     # dry run of the script's logic on a CPU
The JSON is rewritten after every stage, so a run cut short keeps what it finished.
Exit status 1 when an attention path disagrees or the pipeline fails.
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

import bench
import distill
import model

TOL = 3e-2  # bf16: ~0.4% per rounding, a few roundings per output; a wrong mask gives errors of order 1


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
    result = {"command": "python distill.py " + " ".join(flags), "exit": code, "seconds": round(time.time() - t0, 1)}
    for k in range(3):
        path = os.path.join(out, f"phase{k}.eval.json")
        if os.path.exists(path):
            with open(path) as fh:
                ev = json.load(fh)
            result[f"phase{k}"] = {key: ev[key] for key in ("window", "train_time_s", "passkey_by_length", "text_loss_by_quarter")}
    return result


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--json", default=None, help="every result of the run, rewritten after each stage (e.g. $OUT/gpu_check.json)")
    p.add_argument("--out", default=None, help="folder of the short pipeline's checkpoints (default: a temporary folder)")
    p.add_argument("--tiny", action="store_true", help="tiny shapes: check this script's logic on a CPU")
    args = p.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu_check: CUDA is not available here (use --device cpu --tiny for a dry run)")
        return 2
    t0 = time.time()
    report = {"device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
              "torch": torch.__version__, "cuda": torch.version.cuda}

    def save():
        if args.json:
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
    out = args.out or tempfile.mkdtemp(prefix="gpu_check_pipeline_")
    print(f"\n==== short pipeline of the gpu preset -> {out} ====", flush=True)
    report["pipeline"] = short_pipeline(args.device, out, args.tiny)
    report["seconds"] = round(time.time() - t0, 1)
    save()
    good = ok and report["pipeline"]["exit"] == 0
    print(f"\ngpu_check: attention paths {'all OK' if ok else 'MISMATCH (see above)'}; pipeline exit "
          f"{report['pipeline']['exit']}; {report['seconds']:.0f} s{f'; -> {args.json}' if args.json else ''}")
    return 0 if good else 1


if __name__ == "__main__":
    sys.exit(main())
