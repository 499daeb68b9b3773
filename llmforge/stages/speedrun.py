"""The whole recipe in one command: data -> tokenizer -> pretrain -> SFT [-> vision, when
vision.enabled] -> reward models -> rejection sampling -> PPO (RM) -> GRPO (verifiers) -> eval -> report.md.

    llmforge speedrun --preset cpu --out runs/cpu      # <= 20 minutes on 2 CPU cores
    llmforge speedrun --preset micro --out runs/micro  # <= 2 minutes: the end-to-end test
    llmforge speedrun --preset cpu-moe --out runs/moe  # the cpu budget with mixture-of-experts MLPs

A stage whose checkpoint is complete is skipped; one that was interrupted resumes from its
last checkpoint, so re-running the command after a crash or Ctrl-C continues where it stopped.
"""
from __future__ import annotations

import json
import time

from llmforge.config import Config
from llmforge.run import RunDir


def _complete(run: RunDir, folder: str) -> bool:
    config = run.ckpt(folder) / "config.json"
    if not config.is_file():
        return False
    return bool(json.loads(config.read_text()).get("complete", True))


def _started(run: RunDir, folder: str) -> bool:
    return (run.ckpt(folder) / "train_state.json").is_file()


def run(cfg: Config, run: RunDir) -> dict:
    from llmforge.data.prepare import prepare
    from llmforge.stages import evaluation as eval_stage
    from llmforge.stages import pretrain, reward, rl, sft, vision

    steps = [
        ("data", lambda: (run.data / "manifest.json").is_file() and run.tokenizer.is_file(),
         lambda: prepare(cfg, run)),
        ("pretrain", lambda: _complete(run, "base"),
         lambda: pretrain.run(cfg, run, resume=_started(run, "base"))),
        ("sft", lambda: _complete(run, "sft"), lambda: sft.run(cfg, run, resume=_started(run, "sft"))),
        *([("vision", lambda: _complete(run, "vision"), lambda: vision.run(cfg, run, resume=True))]
          if cfg.vision.enabled else []),
        ("rm", lambda: _complete(run, "rm") and _complete(run, "rm_safety"), lambda: reward.run(cfg, run)),
        # RL stages resume mid-rollout from ckpt/<stage>_train + ckpt/<stage>_rollouts
        ("rl_rejection", lambda: _complete(run, "rl_rejection"),
         lambda: rl.run(cfg, run, algo="rejection", resume=_started(run, "rl_rejection_train"))),
        ("rl_ppo", lambda: _complete(run, "rl_ppo"),
         lambda: rl.run(cfg, run, algo="ppo", resume=True)),   # a sweep member may have finished
        ("rl_grpo", lambda: _complete(run, "rl_grpo"),
         lambda: rl.run(cfg, run, algo="grpo", resume=_started(run, "rl_grpo_train"))),
        ("eval", lambda: False, lambda: eval_stage.run(cfg, run)),
    ]
    timings = {}
    for name, done, stage in steps:
        if done():
            print(f"speedrun: {name} already done, skipping")
            continue
        print(f"speedrun: {name} ...", flush=True)
        t0 = time.perf_counter()
        stage()
        timings[name] = round(time.perf_counter() - t0, 1)
        run.log("speedrun", step_name=name, seconds=timings[name])
    total = sum(timings.values())
    print(f"speedrun: finished in {total / 60:.1f} min; report at {run.report}")
    return timings
