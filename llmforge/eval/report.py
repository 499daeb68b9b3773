"""report.md and plots/*.png from a run directory's metrics.jsonl and eval.json.

    report.write(RunDir("runs/demo"), cfg)

Sections: a table per stage (wall time, tokens, key metrics), the evaluation table (verified
accuracy per checkpoint and task with 95% intervals, pass@k, bits per byte, RM win rate), each
checkpoint vs SFT by paired bootstrap over prompts, the arena leaderboard,
the issue's targets with measured values, and plots: loss curves, held-out bpb (per source) and
few-shot accuracy during pretraining, reward and KL over RL steps,
accuracy per stage and task, arena ratings with 95% intervals.
"""
from __future__ import annotations

import json
import math

from llmforge.run import RunDir, atomic_path, write_text_atomic

KEY_METRICS = ("val_loss", "val_bpb", "acc_mean", "heldout_acc", "reward_mean", "eval_kl", "eval_length")
STAGE_ORDER = ("pretrain", "sft", "rm", "rm_safety", "rl_rejection", "rl_ppo", "rl_dpo", "rl_grpo")


def _ordered(models: dict) -> dict:
    """Checkpoints in pipeline order (eval.json is written with sorted keys)."""
    order = ["base", "sft", "rl_rejection", "rl_ppo", "rl_dpo", "rl_grpo"]
    return dict(sorted(models.items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else len(order)))


def _fmt(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def _table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _interval(r: dict, task: str) -> tuple[float, float] | None:
    """95% interval of checkpoint r's accuracy on `task` ("mean" = mean over tasks): from
    eval.json's "intervals" (stats.accuracy_summary), else Wilson from accuracy and n."""
    iv = r.get("intervals", {}).get(task)
    if iv:
        return iv["lo"], iv["hi"]
    t = r["tasks"].get(task, {})
    if task != "mean" and t.get("n"):
        from llmforge.eval.stats import wilson_interval
        return wilson_interval(round(t["accuracy"] * t["n"]), t["n"])
    return None


def _acc_cell(r: dict, task: str) -> str:
    """An accuracy with its 95% interval, in percent: "48% [37, 59]"."""
    acc = r["tasks"][task]["accuracy"]
    iv = _interval(r, task)
    return f"{acc:.0%}" + (f" [{iv[0] * 100:.0f}, {iv[1] * 100:.0f}]" if iv else "")


def paired_rows(models: dict) -> list[list]:
    """"X vs SFT" on the same held-out items: difference in mean accuracy (points), its 95%
    interval and the share of bootstrap resamples (over prompts, within tasks) with X <= SFT."""
    rows = []
    for m, r in models.items():
        v = r.get("vs_sft")
        if v:
            rows.append([f"{m} vs sft", f"{v['diff'] * 100:+.1f}", f"[{v['lo'] * 100:+.1f}, {v['hi'] * 100:+.1f}]",
                         f"{v['p']:.3f}", v["n"],
                         "better" if v["lo"] > 0 else "worse" if v["hi"] < 0 else "no significant difference"])
    return rows


def stage_rows(metrics: list[dict]) -> list[list]:
    """One row per stage from its last "done" event (a rejection run has one per round; their
    wall times and tokens are summed)."""
    done: dict[str, dict] = {}
    for rec in metrics:
        if rec.get("event") != "done":
            continue
        stage = rec["stage"]
        prev = done.get(stage)
        if prev and stage == "rl_rejection":
            rec = {**rec, "elapsed_s": rec.get("elapsed_s", 0) + prev.get("elapsed_s", 0),
                   "tokens": rec.get("tokens", 0) + prev.get("tokens", 0)}
        done[stage] = rec
    norm = {r["stage"]: r for r in metrics if r.get("event") == "normalized"}
    order = [s for s in STAGE_ORDER if s in done] + [s for s in done if s not in STAGE_ORDER]
    rows = []
    for stage in order:
        rec = {**done[stage], **norm.get(stage, {})}
        key = ", ".join(f"{k} {_fmt(rec[k])}" for k in KEY_METRICS if k in rec)
        rows.append([stage, rec.get("elapsed_s"), rec.get("tokens"), rec.get("steps"), key])
    return rows


def targets(ev: dict, metrics: list[dict]) -> list[list]:
    """The issue's targets (cpu preset), each with its measured value; never tuned to pass."""
    models = ev.get("models", {})
    acc = {m: r["tasks"]["mean"]["accuracy"] for m, r in models.items()}
    rows = []
    if "sft" in acc:
        rows.append(["SFT held-out verified accuracy >= 60% (base few-shot for comparison)",
                     f"{acc['sft']:.1%} (base {acc.get('base', float('nan')):.1%})", acc["sft"] >= 0.6])
    rm = [r for r in metrics if r.get("event") == "normalized"]
    for r in rm:
        rows.append([f"{r['stage']} held-out pairwise accuracy >= 90%", f"{r.get('heldout_acc', 0):.1%}",
                     (r.get("heldout_acc") or 0) >= 0.9])
    for algo in ("rl_rejection", "rl_ppo", "rl_dpo", "rl_grpo"):
        if algo in acc and "sft" in acc:
            gain = acc[algo] - acc["sft"]
            kl = [r["eval_kl"] for r in metrics if r.get("stage") == algo and "eval_kl" in r]
            kl_text = f", KL {kl[-1]:.2f} nats" if kl else ""
            rows.append([f"{algo} accuracy >= SFT + 10 points, KL <= 10 nats",
                         f"{gain * 100:+.1f} points{kl_text}", gain >= 0.10 and (not kl or kl[-1] <= 10)])
    board = {r["model"]: r for r in ev.get("arena", [])}
    chain = [m for m in ("base", "sft") if m in board]
    rl = [m for m in board if m.startswith("rl_")]
    if len(chain) == 2 and rl:
        best = max(rl, key=lambda m: board[m]["rating"])
        chain.append(best)
        ok = all(board[a]["hi"] < board[b]["lo"] for a, b in zip(chain, chain[1:]))
        text = " < ".join(f"{m} {board[m]['rating']:.0f} [{board[m]['lo']:.0f}, {board[m]['hi']:.0f}]" for m in chain)
        rows.append(["arena: base < SFT < RLHF, non-overlapping 95% intervals", text, ok])
    return [[t, v, "met" if ok else "MISSED"] for t, v, ok in rows]


def expert_load_keys(records: list[dict]) -> list[str]:
    """The metrics keys of the MoE layers' expert loads (moe_load_L<layer>), in layer order."""
    return sorted({k for r in records for k in r if k.startswith("moe_load_L")}, key=lambda k: int(k[len("moe_load_L"):]))


def draw_expert_load(axes, records: list[dict], keys: list[str], label: str = "") -> None:
    """One axis per MoE layer: every expert's share of the top-k choices against the step, with the
    balanced share 1/E dashed (a collapsed router shows one line near 1 and the rest near 0)."""
    for ax, key in zip(axes, keys):
        pts = [(r["step"], r[key]) for r in records if key in r]
        n_experts = len(pts[0][1])
        for e in range(n_experts):
            ax.plot([p[0] for p in pts], [p[1][e] for p in pts], lw=1, color=f"C{e % 10}")
        ax.axhline(1 / n_experts, ls="--", color="k", lw=0.8)
        ax.set_title(f"{label}layer {key[len('moe_load_L'):]}: expert load", fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.set_ylim(bottom=0)
    axes[0].set_ylabel("share of routed tokens", fontsize=8)


def plots(run: RunDir, metrics: list[dict], ev: dict) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    run.plots.mkdir(parents=True, exist_ok=True)

    def save(fig, name):
        with atomic_path(run.plots / name) as tmp:
            fig.savefig(tmp, format="png", dpi=90, bbox_inches="tight")
        plt.close(fig)
        made.append(name)

    # loss curves
    stages = [s for s in STAGE_ORDER if any(r["stage"] == s and "loss" in r for r in metrics)]
    if stages:
        fig, axes = plt.subplots(1, len(stages), figsize=(3.2 * len(stages), 2.8), squeeze=False)
        for ax, s in zip(axes[0], stages):
            pts = [(r["step"], r["loss"]) for r in metrics if r["stage"] == s and "loss" in r and "step" in r]
            # a new segment whenever the step counter restarts (rejection rounds, re-runs)
            segments, seg = [], []
            for p in pts:
                if seg and p[0] <= seg[-1][0]:
                    segments.append(seg)
                    seg = []
                seg.append(p)
            for i, seg in enumerate(segments + [seg]):
                ax.plot([p[0] for p in seg], [p[1] for p in seg], lw=1, color=f"C{i % 10}")
            ax.set_title(s, fontsize=9)
            ax.set_xlabel("step", fontsize=8)
        axes[0][0].set_ylabel("training loss")
        save(fig, "loss.png")
    # evaluation while pretraining: held-out bpb (all and per source) and few-shot accuracy
    evals = [r for r in metrics if r.get("stage") == "pretrain" and "val_bpb" in r and "step" in r]
    if evals:
        accs = [r for r in evals if "fewshot_acc_mean" in r]
        fig, axes = plt.subplots(1, 2 if accs else 1, figsize=(9 if accs else 4.5, 3), squeeze=False)
        ax = axes[0][0]
        ax.plot([r["step"] for r in evals], [r["val_bpb"] for r in evals], marker=".", label="all", color="k")
        sources = sorted({k[len("val_bpb_"):] for r in evals for k in r if k.startswith("val_bpb_")})
        for i, src in enumerate(sources):
            pts = [(r["step"], r[f"val_bpb_{src}"]) for r in evals if f"val_bpb_{src}" in r]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=".", lw=1, label=src, color=f"C{i % 10}")
        last = evals[-1]
        ax.set_title("held-out bits/byte" + (f" ({int(last['val_tokens']):,} tokens, context {int(last['val_seq_len'])})"
                                             if "val_tokens" in last and "val_seq_len" in last else ""), fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.legend(fontsize=7)
        if accs:
            ax = axes[0][1]
            tasks = sorted({k[len("fewshot_acc_"):] for r in accs for k in r
                            if k.startswith("fewshot_acc_") and k != "fewshot_acc_mean"})
            for i, t in enumerate(tasks):
                ax.plot([r["step"] for r in accs], [r.get(f"fewshot_acc_{t}", math.nan) for r in accs], lw=1,
                        label=t, color=f"C{i % 10}")
            ax.plot([r["step"] for r in accs], [r["fewshot_acc_mean"] for r in accs], marker=".", lw=2,
                    color="k", label="mean")
            ax.set_ylim(0, 1)
            ax.set_title("few-shot verified accuracy, held-out items", fontsize=9)
            ax.set_xlabel("step", fontsize=8)
            ax.legend(fontsize=6, ncol=2)
        save(fig, "pretrain_eval.png")
    # mixture of experts: each expert's share of the router's choices over pretraining steps
    routed = [r for r in metrics if r.get("stage") == "pretrain" and "step" in r
              and any(k.startswith("moe_load_L") for k in r)]
    if routed:
        keys = expert_load_keys(routed)
        fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 2.8), squeeze=False)
        draw_expert_load(axes[0], routed, keys)
        save(fig, "expert_load.png")
    # reward and KL over RL rollouts
    rl = [s for s in STAGE_ORDER if s.startswith("rl_") and any(r["stage"] == s and ("rollout" in r or "round" in r)
                                                                 for r in metrics)]
    if rl:
        fig, axes = plt.subplots(1, 3, figsize=(11, 3))
        for s in rl:
            recs = [r for r in metrics if r["stage"] == s and ("rollout" in r or "round" in r)]
            x = [r.get("rollout", r.get("round")) for r in recs]
            axes[0].plot(x, [r.get("reward", math.nan) for r in recs], marker=".", label=s)
            axes[1].plot(x, [r.get("kl", math.nan) for r in recs], marker=".", label=s)
            axes[2].plot(x, [r.get("verified_reward", r.get("verified_best", math.nan)) for r in recs],
                         marker=".", label=s)
        for ax, title in zip(axes, ("reward (RM score / verifier)", "KL to reference (nats / response)",
                                    "verified reward of samples")):
            ax.set_title(title, fontsize=9)
            ax.set_xlabel("rollout / round", fontsize=8)
        axes[0].legend(fontsize=7)
        save(fig, "rl.png")
    # accuracy per stage and task
    models = _ordered(ev.get("models", {}))
    if models:
        tasks = ev["tasks"] + ["mean"]
        fig, ax = plt.subplots(figsize=(min(12, max(6, 0.35 * len(tasks) * len(models))), 3.2))
        width = 0.8 / len(models)
        for i, (m, r) in enumerate(models.items()):
            accs = [r["tasks"][t]["accuracy"] for t in tasks]
            ivs = [_interval(r, t) or (a, a) for t, a in zip(tasks, accs)]
            ax.bar([j + i * width for j in range(len(tasks))], accs, width, label=m,
                   yerr=[[a - lo for a, (lo, _) in zip(accs, ivs)], [hi - a for a, (_, hi) in zip(accs, ivs)]],
                   capsize=2, error_kw={"lw": 0.8})
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(tasks))], tasks, rotation=30, fontsize=8)
        ax.set_ylabel("held-out verified accuracy")
        ax.set_ylim(0, 1)
        ax.legend(fontsize=7)
        save(fig, "accuracy.png")
    board = ev.get("arena", [])
    if board:
        fig, ax = plt.subplots(figsize=(5, 0.5 + 0.45 * len(board)))
        rows = board[::-1]
        ax.errorbar([r["rating"] for r in rows], range(len(rows)),
                    xerr=[[r["rating"] - r["lo"] for r in rows], [r["hi"] - r["rating"] for r in rows]],
                    fmt="o", capsize=3)
        ax.set_yticks(range(len(rows)), [r["model"] for r in rows])
        ax.set_xlabel("arena rating (Bradley-Terry, Elo scale) with 95% bootstrap interval")
        save(fig, "arena.png")
    return made


def transcript_section(chats: dict[str, list]) -> list[str]:
    """The fixed conversations (eval/transcripts.py), each checkpoint's greedy answer under it."""
    lines = ["## Transcripts (greedy; requests no training conversation used)", ""]
    first = next(iter(chats.values()))
    for i, entry in enumerate(first):
        turns = " / ".join(f"{m['role']}: {m['content']}" for m in entry["messages"])
        lines += [f"**{entry['name']}** — {turns}", ""]
        for model, rows in chats.items():
            answer = rows[i]["answer"].replace("\n", " ").replace("|", "\\|") or "(empty)"
            lines.append(f"- `{model}`: {answer}")
        lines.append("")
    return lines


def vision_section(v: dict) -> list[str]:
    """`llmforge vision`'s held-out accuracy per visual task, the blank-image baseline and the text tasks."""
    rows = [[t, f"{a['accuracy']:.1%} [{a['lo']:.0%}, {a['hi']:.0%}]", f"{v['blank_image'][t]['accuracy']:.1%}",
             f"{a['chance']:.0%}", a["n"]] for t, a in v["accuracy"].items()]
    p = v["text_paired"]
    lines = ["## Vision (held-out images, greedy)", "",
             f"{v['image_tokens']} image tokens per image. Intervals: Wilson 95%. The blank-image column asks "
             "the same questions with a mid-grey image: what the model guesses without seeing.", "",
             _table(["task", "accuracy", "blank image", "chance", "items"], rows), ""]
    if v["mean"]["rendered"] is not None:
        lines += [f"Mean over the rendered tasks: {v['mean']['rendered']:.1%} "
                  f"(blank image {v['mean']['rendered_blank']:.1%}).", ""]
    lines += [f"Text tasks ({v['text_items']} held-out items): {v['text_before']:.1%} before (SFT) -> "
              f"{v['text_after']:.1%} after, {p['diff'] * 100:+.1f} points [{p['lo'] * 100:+.1f}, {p['hi'] * 100:+.1f}] "
              "(paired bootstrap over prompts).", "", "![vision samples](plots/vision_samples.png)", ""]
    return lines


def flywheel_section(run: RunDir) -> list[str]:
    """`llmforge flywheel`'s rounds (RUN/flywheel/round_<r>/round.json): accuracy and win rate per
    round, pairs per source and per user, and what the defences dropped."""
    rounds = []
    for path in sorted((run.root / "flywheel").glob("round_*/round.json"), key=lambda p: int(p.parent.name[6:])):
        rounds.append(json.loads(path.read_text(encoding="utf-8")))
    if not rounds:
        return []

    def diff(v):
        return f"{v['diff'] * 100:+.1f} [{v['lo'] * 100:+.1f}, {v['hi'] * 100:+.1f}], p={v['p']:.3f}"

    rows = [[r["round"], r["source"], f"{r['before']['mean']:.1%}", f"{r['after']['mean']:.1%} "
             f"[{r['after']['lo'] * 100:.1f}, {r['after']['hi'] * 100:.1f}]", diff(r["vs_served"]),
             f"{r['vs_served']['win_rate']:.1%} ({r['vs_served']['wins']}-{r['vs_served']['losses']})",
             diff(r["vs_initial"]), r["kl"], r["pairs_exported"], r["pairs_kept"],
             ", ".join(f"{k} {v}" for k, v in r["dropped"].items()) or "-", r["seconds"]["total"]] for r in rounds]
    users = sorted({u for r in rounds for u in r["exported_per_user"]})
    user_rows = [[u, *[f"{r['pairs_per_user'].get(u, 0)}/{r['exported_per_user'].get(u, 0)}"
                       + (f" (trust {r['trust'][u]['trust']:.2f})" if u in r.get("trust", {}) else "")
                       for r in rounds]] for u in users]
    sources = sorted({s for r in rounds for s in r["exported_per_source"]})
    source_rows = [[s, *[f"{r['pairs_per_source'].get(s, 0)}/{r['exported_per_source'].get(s, 0)}" for r in rounds]]
                   for s in sources]
    tasks = rounds[0]["tasks"]
    return ["## Flywheel (users' edits and ratings -> DPO -> next model)", "",
            f"Held-out verified accuracy (greedy) on {', '.join(tasks)}; each round's model against the model "
            "it was served as (paired bootstrap over prompts within tasks, 95% interval; win rate = verifier-"
            "judged wins + half the ties) and against round 0's served model. KL: nats per response to the "
            "served model (DPO's reference) on validation prompts.", "",
            _table(["round", "feedback", "served acc", "next acc", "vs served (points)", "win rate (W-L)",
                    "vs round 0 (points)", "KL", "pairs exported", "pairs trained", "dropped", "wall s"], rows), "",
            "Pairs trained / exported per source:", "",
            _table(["source"] + [f"round {r['round']}" for r in rounds], source_rows), "",
            "Pairs trained / exported per user (the rejected answer's user), with the defences' trust weight:", "",
            _table(["user"] + [f"round {r['round']}" for r in rounds], user_rows), ""]


def write(run: RunDir, cfg=None) -> str:
    metrics = run.read_metrics()
    eval_path = run.root / "eval.json"
    ev = json.loads(eval_path.read_text()) if eval_path.is_file() else {}
    parts = [f"# llmforge report: {run.root.name}", ""]
    if cfg is not None:
        m = cfg.model
        experts = (f", {m.moe_experts} experts (top {m.moe_top_k}, {m.moe_router}) in every {m.moe_every} layer(s)"
                   if m.moe_experts else "")
        parts += [f"Preset `{cfg.preset}`; model {m.n_layer} layers x {m.d_model} wide{experts}, "
                  f"context {m.max_seq_len}, vocab {m.vocab_size}.", ""]
    parts += ["## Stages", "", _table(["stage", "wall s", "tokens", "steps", "key metrics"], stage_rows(metrics)), ""]
    models = _ordered(ev.get("models", {}))
    if models:
        tasks = ev["tasks"]
        k = next((key for r in models.values() for key in r["tasks"]["mean"] if key.startswith("pass@")), None)
        k_label = k if not (k and cfg is not None and cfg.eval.pass_k_per_task) else \
            f"{k} (first {cfg.eval.pass_k_per_task}/task)"
        header = ["checkpoint"] + tasks + ["mean"] + ([k_label] if k else []) + ["bpb", "RM win vs SFT"]
        rows = []
        for m, r in models.items():
            t = r["tasks"]
            rows.append([m] + [_acc_cell(r, x) for x in tasks] + [_acc_cell(r, "mean")] +
                        ([t["mean"].get(k)] if k else []) + [r.get("bpb"), r.get("rm_win_rate_vs_sft")])
        parts += ["## Held-out verified accuracy (greedy)", "",
                  "The base model is prompted few-shot; every other checkpoint zero-shot. Each accuracy "
                  "comes with its 95% interval (per task: Wilson; mean over tasks: bootstrap over "
                  "prompts within tasks).", "",
                  _table(header, rows), ""]
        paired = paired_rows(models)
        if paired:
            parts += ["### Each checkpoint vs SFT (paired bootstrap over prompts)", "",
                      "Both checkpoints answered the same held-out items; items are resampled with "
                      "replacement within their task, both answers together. p = share of resamples "
                      "in which the checkpoint is not better than SFT.", "",
                      _table(["comparison", "difference (points)", "95% interval", "p", "items", "verdict"],
                             paired), ""]
    if ev.get("arena"):
        parts += ["## Arena (verifier-judged battles, Bradley-Terry ratings, 95% bootstrap over prompts)", "",
                  _table(["model", "rating", "95% low", "95% high", "battles", "wins", "ties"],
                         [[r["model"], r["rating"], r["lo"], r["hi"], r["battles"], r["wins"], r.get("ties")]
                          for r in ev["arena"]]),
                  ""]
    if ev.get("transcripts"):
        parts += transcript_section(ev["transcripts"])
    vision_path = run.root / "vision.json"
    if vision_path.is_file():
        parts += vision_section(json.loads(vision_path.read_text()))
    parts += flywheel_section(run)
    target_rows = targets(ev, metrics)
    if target_rows:
        parts += ["## Targets", "", _table(["target", "measured", "status"], target_rows), ""]
    made = plots(run, metrics, ev)
    if made:
        parts += ["## Plots", ""] + [f"![{name}](plots/{name})" for name in made] + [""]
    text = "\n".join(parts)
    write_text_atomic(run.report, text)
    return text
