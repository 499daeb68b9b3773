"""RL stages: `run(cfg, run, algo=...)` dispatches to rejection | ppo | dpo | grpo."""
from __future__ import annotations

import importlib

from llmforge.errors import UserError

ALGOS = ("rejection", "ppo", "dpo", "grpo")


def run(cfg, run, algo: str | None = None, **kwargs) -> dict:
    algo = algo or cfg.rl.algo
    if algo not in ALGOS:
        raise UserError(f"unknown RL algorithm '{algo}'; choose one of: {', '.join(ALGOS)}")
    return importlib.import_module(f"llmforge.stages.rl.{algo}").run(cfg, run, **kwargs)
