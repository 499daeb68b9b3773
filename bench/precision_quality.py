"""What lower-precision inference weights cost in quality: held-out bits/byte of the base model and
verified task accuracy of the policy at fp32, bf16 and int8 (llmforge/infer/quantize.py), same items.

    python bench/precision_quality.py runs/cpu                  # --per-task 100 (900 items per precision)
    python bench/precision_quality.py runs/cpu --per-task 30 --dtypes fp32,int8

bpb is llmforge.eval.bpb.heldout_of_run (the whole validation split, as `llmforge eval` scores it) on
ckpt/base; accuracy is llmforge.eval.tasks.evaluate (greedy, held-out items) on the run's latest
policy (rl > sft). "changed" counts items whose verdict differs from fp32's (the comparison is
paired: the same prompts at every precision).
"""
from __future__ import annotations

import argparse
import time

from llmforge.config import resolve
from llmforge.eval.bpb import heldout_of_run
from llmforge.eval.tasks import evaluate
from llmforge.infer.quantize import check_dtype, for_inference
from llmforge.run import RunDir
from llmforge.tasks import task_names
from llmforge.train.checkpoint import load_model, load_tokenizer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", help="run directory with data/, ckpt/base and a policy checkpoint")
    ap.add_argument("--dtypes", default="fp32,bf16,int8")
    ap.add_argument("--per-task", type=int, default=100)
    args = ap.parse_args()
    run = RunDir(args.run)
    dtypes = [check_dtype(d) for d in args.dtypes.split(",")]
    names = task_names(resolve(run_dir=run.root).tasks.names)
    rows, verdicts = [], {}
    for dtype in dtypes:
        t0 = time.perf_counter()
        base, _, _ = load_model(run.ckpt("base"))
        tok = load_tokenizer(run.ckpt("base"))
        bpb = heldout_of_run(for_inference(base, dtype), run, tok)["val_bpb"]
        policy, _, folder = load_model(run.root)
        res, samples = evaluate(for_inference(policy, dtype), load_tokenizer(folder), names, args.per_task,
                                return_samples=True)
        verdicts[dtype] = [row[0].reward >= 1.0 for row in samples]
        rows.append((dtype, bpb, res["mean"]["accuracy"], len(samples), time.perf_counter() - t0))
        print(f"{dtype}: bpb {bpb:.4f}, accuracy {res['mean']['accuracy']:.1%} ({folder.name}), "
              f"{time.perf_counter() - t0:.0f} s", flush=True)
    ref_bpb, ref_acc = rows[0][1], rows[0][2]
    print(f"\n{'dtype':<6} {'bpb (base)':>10} {'vs ' + dtypes[0]:>9} {'accuracy':>9} {'vs ' + dtypes[0]:>9} "
          f"{'changed':>8}  items")
    for dtype, bpb, acc, n, _ in rows:
        changed = sum(a != b for a, b in zip(verdicts[dtype], verdicts[dtypes[0]]))
        print(f"{dtype:<6} {bpb:10.4f} {bpb / ref_bpb - 1:+8.2%} {acc:9.1%} {100 * (acc - ref_acc):+8.1f}pt "
              f"{changed:8d}  {n}")


if __name__ == "__main__":
    main()
