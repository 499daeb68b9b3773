"""Held-out accuracy of several runs' SFT checkpoints on the same test items, each against the
first with the paired bootstrap over prompts (stratified by task), in one run.

    python bench/compare_sft.py runs/cpu runs/smear runs/sft800 --per-task 100
    python bench/compare_sft.py runs/a+runs/a_seed2 runs/b+runs/b_seed2   # seeds pooled per arm

For comparing recipes across runs (the eval stage compares the checkpoints of one run). Greedy,
zero-shot, the evaluation-side phrasings and content (tasks/phrasing.py), each task's own answer budget, as
`llmforge eval`. The README's smeared-keys and SFT-steps rows come from this script.

Training seeds move SFT accuracy by a few points (two seeds of one recipe on one base: 26.8%
and 26.0%; of another: 28.0% and 30.9%), more than the item bootstrap's interval says, so an
arm may name several runs joined by "+" (the same recipe, other seeds): each item's score is
their mean. Two seeds halve the variance the seed adds; the interval still covers items only.
"""
from __future__ import annotations

import argparse
import time

import torch

from llmforge.config import TasksConfig
from llmforge.eval import stats
from llmforge.eval import tasks as task_eval
from llmforge.run import RunDir
from llmforge.tasks import task_names
from llmforge.train.checkpoint import load_model, load_run_tokenizer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="run directories (or seed runs of one recipe joined by '+'); "
                                            "the first is the reference")
    ap.add_argument("--per-task", type=int, default=100, help="held-out items per task")
    ap.add_argument("--folder", default="sft", help="checkpoint folder under each run's ckpt/")
    ap.add_argument("--max-tokens", type=int, default=TasksConfig.max_new_tokens,
                    help="longest answer sampled (tool calls count, their results do not)")
    args = ap.parse_args()
    names = task_names("")
    items = task_eval.heldout(names, args.per_task)
    strata = [item.task for item in items]
    scores = {}
    for path in args.runs:
        started = time.perf_counter()
        per_run = []
        for seed_run in path.split("+"):
            run = RunDir(seed_run)
            model, _, _ = load_model(run.ckpt(args.folder))
            rows = task_eval.sample(model.eval(), load_run_tokenizer(run), items, n=1, temperature=0.0,
                                       max_tokens=args.max_tokens)
            per_run.append([float(row[0].reward >= 1.0) for row in rows])
        scores[path] = [sum(col) / len(col) for col in zip(*per_run)]
        lo, hi = stats.bootstrap_interval(scores[path], strata)
        per_task = " ".join(f"{n[:8]} {sum(s for s, t in zip(scores[path], strata) if t == n) / args.per_task:.0%}"
                            for n in names)
        print(f"{path}: {stats.stratified_mean(scores[path], strata):.1%} [{lo:.1%}, {hi:.1%}]  {per_task}  "
              f"({time.perf_counter() - started:.0f} s)", flush=True)
    ref = args.runs[0]
    for path in args.runs[1:]:
        d = stats.paired_bootstrap(scores[path], scores[ref], strata)
        print(f"{path} - {ref}: {100 * d['diff']:+.1f} points [{100 * d['lo']:+.1f}, {100 * d['hi']:+.1f}] (n = {d['n']})")


if __name__ == "__main__":
    torch.set_num_threads(2)
    main()
