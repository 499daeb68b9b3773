"""Scaling laws measured on this machine: sweep a grid of model sizes per compute budget,
fit Chinchilla's approaches 2 and 3, and plan a model for a budget.

    llmforge scaling sweep --out runs/x [--set scaling.budgets=[1e12,3e12,1e13]]
    llmforge scaling fit   --out runs/x
    llmforge scaling plan  --out runs/x --minutes 10      # or --flops 6e13

sweep.py trains the points through the one loop (train/loop.py); fit.py is pure numpy/torch
math on RUN/scaling/scaling.jsonl; plan.py combines the fit with the sweep's measured tokens/s.
The knobs are ScalingConfig (config.py here), registered as the `scaling` section of Config.
"""
