"""The over-optimisation curve (Gao, Schulman & Hilton 2022, "Scaling laws for reward model
over-optimization"): as a policy is optimised against a learned (proxy) reward, the proxy
keeps rising with KL from the initial policy while the true (gold) reward rises, peaks, and
falls. Here the proxy is the reward models' score and the gold reward is held-out verified
accuracy; every point is (KL per response in nats, proxy, gold) of one policy.

PPO writes a point at each of its held-out evaluations (metrics.jsonl: stage "rl_ppo",
event "curve"); a KL sweep (ppo.kl_sweep) adds one trajectory per KL coefficient. Gao et al.
plot against d = sqrt(KL); the PNG shows both rewards against KL on that axis.
"""
from __future__ import annotations

import math
from pathlib import Path

from llmforge.errors import UserError


def sweep_values(spec: str) -> list[float]:
    """"0.01, 0.05,0.2" -> [0.01, 0.05, 0.2]; "" -> []."""
    out = []
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        try:
            value = float(part)
        except ValueError:
            raise UserError(f"ppo.kl_sweep entry '{part}' is not a number; write e.g. --set ppo.kl_sweep=0.01,0.05,0.2") \
                from None
        if value < 0:
            raise UserError(f"ppo.kl_sweep entry {value} is negative; KL coefficients are >= 0")
        out.append(value)
    return out


def point(kl_coef: float, step: int, kl: float, proxy: float, gold: float) -> dict:
    """One point of the curve, as written to metrics.jsonl."""
    return {"event": "curve", "kl_coef": kl_coef, "step": step, "kl": kl, "proxy": proxy, "gold": gold}


def summarize(points: list[dict]) -> dict:
    """Where the gold reward peaks, and whether the proxy still rises beyond it (over-optimisation).
    Points are pooled over all runs and ordered by KL."""
    if not points:
        return {}
    pts = sorted(points, key=lambda p: p["kl"])
    best = max(pts, key=lambda p: p["gold"])
    beyond = [p for p in pts if p["kl"] > best["kl"]]
    return {"gold_peak": best["gold"], "gold_peak_kl": best["kl"], "gold_peak_kl_coef": best["kl_coef"],
            "proxy_at_peak": best["proxy"], "max_kl": pts[-1]["kl"],
            "proxy_beyond_peak": max((p["proxy"] for p in beyond), default=math.nan),
            "gold_beyond_peak": min((p["gold"] for p in beyond), default=math.nan),
            "overoptimised": bool(beyond) and max(p["proxy"] for p in beyond) > best["proxy"]
            and min(p["gold"] for p in beyond) < best["gold"]}


def plot(points: list[dict], path: Path, proxy_label: str = "RM reward", gold_label: str = "verified accuracy"):
    """Proxy and gold reward against sqrt(KL), one line per KL coefficient; PNG at `path`."""
    if not points:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax_p, ax_g) = plt.subplots(1, 2, figsize=(9, 3.6))
    for coef in sorted({p["kl_coef"] for p in points}):
        pts = sorted((p for p in points if p["kl_coef"] == coef), key=lambda p: p["step"])
        x = [math.sqrt(max(p["kl"], 0.0)) for p in pts]
        ax_p.plot(x, [p["proxy"] for p in pts], "o-", label=f"β={coef:g}")
        ax_g.plot(x, [p["gold"] for p in pts], "o-", label=f"β={coef:g}")
    for ax, label in ((ax_p, proxy_label), (ax_g, gold_label)):
        ax.set_xlabel("sqrt(KL(π || π_ref)) per response, sqrt(nats)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    ax_p.set_title("proxy: what the policy is trained on")
    ax_g.set_title("gold: what we want")
    ax_g.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    tmp.replace(path)
    return path
