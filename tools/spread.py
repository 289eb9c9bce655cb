"""
How much the Quickstart's numbers move from run to run: one file of runs, each with its seed, threads, CPU, the
teacher's and phase 2's passkey accuracy by key distance, phase 2's reach and its minutes.

    python tools/spread.py results/default_run/quickstart.json --extension results/roads/default_teacher.json \\
        --log results/default_run/earlier_runs.json --out results/default_run/spread.json

QUICKSTART.json: side-by-side evals of the Quickstart's three checkpoints (`eval_retrieval.py ... --json`), one per
whole run (teacher, phase 1, phase 2 trained by the two commands).  --extension: a tools/ablate.py file whose `kd`
seeds are the Quickstart's second command from the same teacher and phase 1 (`--seed K`, one thread each): the
spread of the extension alone.  --log: runs of earlier machines as the run log recorded them (a list of runs).
The summary gives, per key-distance bucket, the mean and the range of phase 2 over all runs, the range of the reach
and of the teacher at 256-512, and in how many runs each of the lesson's conclusions (CLAIMS) holds.
"""

import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import ablate  # noqa: E402
from ablate import eval_retrieval  # noqa: E402

BUCKETS = ((0, 64), (64, 128), (128, 256), (256, 512))
BINS = [(lo, lo + 32) for lo in range(0, 512, 32)]  # half a document: where the cliff sits


# The lesson's conclusions about the Quickstart, each a test of one run; a run that lacks a number is not counted.
CLAIMS = {
    "phase 2 beats phase 1 one document back (64-128)":
        lambda x: x["acc_by_distance"]["64-128"] > x["phase1_acc_by_distance"]["64-128"],
    "phase 2 >= 0.5 one document back": lambda x: x["acc_by_distance"]["64-128"] >= 0.5,
    "phase 2 <= 0.05 at 256-512": lambda x: x["acc_by_distance"]["256-512"] <= 0.05,
    "the teacher >= 0.5 at 256-512": lambda x: x["teacher_acc_by_distance"]["256-512"] >= 0.5,
}


def reach(records):
    return ablate.reach(eval_retrieval.by_distance(records, BINS))


def quickstart_run(path):
    r = json.load(open(path))
    teacher, phase1, phase2 = r["models"].values()
    on = phase2["trained_on"] or {}
    return {"scope": "whole pipeline: the Quickstart's two commands", "file": path, "seed": phase2["seed"],
            "threads": on.get("threads"), "cpu": on.get("cpu"), "prompts_per_cell": r["n"],
            "acc_by_distance": eval_retrieval.by_distance(phase2["records"], BUCKETS),
            "teacher_acc_by_distance": eval_retrieval.by_distance(teacher["records"], BUCKETS),
            "phase1_acc_by_distance": eval_retrieval.by_distance(phase1["records"], BUCKETS),
            "reach": reach(phase2["records"]), "minutes": round(sum(m["train_time_s"] for m in r["models"].values()) / 60, 1)}


def extension_runs(path):
    r = json.load(open(path))
    teacher, phase1 = (eval_retrieval.by_distance([{"distance": d, "correct": c} for d, c in r["cells"][m]["distance_correct"]], BUCKETS)
                       if m in r["cells"] else None for m in ("teacher", "phase1"))
    out = []
    for name, cell in r["cells"].items():
        variant, seed = ablate.run_key(name)
        if variant != "kd":
            continue
        recs = [{"distance": d, "correct": c} for d, c in cell["distance_correct"]]
        out.append({"scope": "extension only: the second command with --seed K at 1 thread, from the same teacher and phase 1",
                    "file": path, "seed": seed, "threads": 1, "cpu": r.get("cpu"),
                    "prompts_per_cell": r["setup"]["prompts_per_cell"], "acc_by_distance": eval_retrieval.by_distance(recs, BUCKETS),
                    "teacher_acc_by_distance": teacher, "phase1_acc_by_distance": phase1, "reach": reach(recs), "minutes": cell["train_minutes"]})
    return out


def summary(runs):
    out = {}
    for lo, hi in BUCKETS:
        vals = [x["acc_by_distance"][f"{lo}-{hi}"] for x in runs]
        out[f"{lo}-{hi}"] = {"mean": float(np.mean(vals)), "min": min(vals), "max": max(vals)}
    reaches = [x["reach"] for x in runs if x["reach"] is not None]  # a run log may not have kept it
    out["reach"] = {"min": min(reaches), "max": max(reaches), "runs": len(reaches)}
    teachers = [x["teacher_acc_by_distance"]["256-512"] for x in runs if x.get("teacher_acc_by_distance")]
    out["teacher_256-512"] = {"min": min(teachers), "max": max(teachers), "runs": len(teachers)}
    out["claims"] = []
    for claim, test in CLAIMS.items():
        verdicts = []
        for x in runs:
            try:
                verdicts.append(bool(test(x)))
            except (KeyError, TypeError):  # a logged run without that number
                pass
        out["claims"].append({"claim": claim, "holds": sum(verdicts), "runs": len(verdicts)})
    out["runs"] = len(runs)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("quickstart", nargs="+", help="eval_retrieval.py --json files of whole Quickstart runs")
    p.add_argument("--extension", default=None, help="a tools/ablate.py file with kd seeds from the same teacher and phase 1")
    p.add_argument("--log", default=None, help="a JSON list of earlier runs, in this file's run format")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    runs = [quickstart_run(q) for q in args.quickstart]
    runs += extension_runs(args.extension) if args.extension else []
    runs += json.load(open(args.log)) if args.log else []
    s = {"command": eval_retrieval.command_line("tools/spread.py", argv),
         "summary": summary(runs), "runs": runs}
    with open(args.out, "w") as fh:
        json.dump(s, fh, indent=1)
    for x in runs:
        print(f"seed {x['seed']} threads {x['threads']} {x['cpu']}: " +
              " / ".join(f"{v:.2f}" for v in x["acc_by_distance"].values()) + f"  reach {x['reach']}  ({x['scope'][:48]})")
    print(f"-> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
