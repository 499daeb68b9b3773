"""The `scaling` config section (registered on llmforge.config.Config).

    llmforge scaling sweep --out runs/x --set scaling.budgets=[3e12,1e13] --set scaling.depths=[2,3,4]
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class ScalingConfig:
    # ---- the sweep: which points (one point = one model size trained on one budget)
    unit: str = "flops"         # budgets in "flops" (C = 6*N*D; exact IsoFLOP curves, step budgets:
                                # reproducible even on shared cores) or "minutes" of wall time per point
    # one IsoFLOP curve each; the cpu preset's 10-minute pretraining is ~5e13. With the depths below:
    # 12 points (3 + 4 + 5; the rest buy < min_steps), est. ~25 min on 2 idle cores (bf16)
    budgets: list[float] = field(default_factory=lambda: [3e12, 1e13, 3e13])
    depths: list[int] = field(default_factory=lambda: [1, 2, 3, 4, 6])  # n_layer per size: 0.3-10.7M params at vocab 4096
    # ---- the shape rule: every size is a function of its depth alone (vocab from the tokenizer)
    aspect: int = 64            # d_model = aspect * n_layer (a fixed aspect ratio, nanochat's "depth" dial)
    head_dim: int = 64          # n_head ~ d_model / head_dim (at least 1, dividing d_model, even head size)
    kv_ratio: int = 4           # n_kv_head = largest divisor of n_head <= n_head / kv_ratio (GQA, as the presets)
    # ---- how each point trains (batch, seq_len, warmup, schedule, dtype, seed: from [pretrain])
    lr: float = 0.0             # peak lr of every point; 0 = pretrain.lr
    min_steps: int = 50         # a point whose budget buys fewer optimizer steps is skipped (too short to mean much)
    eval_batches: int = 0       # held-out batches of batch_size x seq_len per point; 0 = pretrain.eval_batches
    keep_checkpoints: bool = False  # keep each point's weights in RUN/scaling/points/<id>/ckpt (disk: 4 bytes/param)
    # ---- the fit
    bootstrap: int = 200        # bootstrap resamples for the 95% intervals (0 = none)
    huber_delta: float = 1e-3   # Approach 3: Huber loss threshold on log-loss residuals (Hoffmann et al., App. D)
    seed: int = 0               # bootstrap resampling seed
