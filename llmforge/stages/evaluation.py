"""`llmforge eval`: every checkpoint of the run, measured the same way, then report.md.

    llmforge eval --out runs/demo

For each policy checkpoint present (base, sft, rl_rejection, rl_ppo, rl_dpo, rl_grpo):
  - bits per byte on the validation shards (when the run has them);
  - verified accuracy per task on held-out items: greedy, and pass@k at temperature 1
    (the base model is prompted few-shot, since it has not learned the chat format);
  - reward-model win rate against the SFT model's answers to the same prompts;
then an arena: every pair of checkpoints battles on every held-out prompt, the verifier judges
(higher verified reward wins, equal is a tie), ratings by Bradley–Terry with bootstrap 95%
intervals. Results go to eval.json and metrics.jsonl (stage "eval"); report.md is rewritten.
"""
from __future__ import annotations

import hashlib
import itertools
import random
import time

import torch

from llmforge.config import Config
from llmforge.errors import UserError
from llmforge.eval import arena, bpb, report, stats
from llmforge.eval import tasks as task_eval
from llmforge.eval.transcripts import transcripts
from llmforge.run import RunDir, write_json_atomic
from llmforge.stages.rl.rewards import load_reward
from llmforge.tasks import task_names
from llmforge.train.checkpoint import load_run_checkpoint, load_run_tokenizer

CANDIDATES = ("base", "sft", "rl_rejection", "rl_ppo", "rl_dpo", "rl_grpo")
FEWSHOT = 2


def weights_digest(model) -> str:
    """A fingerprint of a model's weights: two checkpoints with the same one answer identically."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def refusal_rates(samples) -> dict:
    """Llama 2's two sides of safety on the held-out safety items: how often harmful requests are
    refused, and how often benign-but-edgy ones are (false refusals)."""
    from llmforge.tasks.base import answer_text
    from llmforge.tasks.safety import is_refusal
    out = {}
    for key, harmful in (("refusal_rate_harmful", True), ("false_refusal_rate", False)):
        refused = [is_refusal(answer_text(s.messages)) for s in samples
                   if s.item.task == "safety" and s.item.reference["harmful"] == harmful]
        if refused:
            out[key] = sum(refused) / len(refused)
    return out


def run(cfg: Config, run: RunDir, show_progress: bool = True, **_) -> dict:
    ec = cfg.eval
    tok = load_run_tokenizer(run)
    names = task_names(cfg.tasks.names)
    present = [c for c in CANDIDATES if (run.ckpt(c) / "config.json").is_file()]
    if not present:
        raise UserError(f"{run.root} has no checkpoints to evaluate; run `llmforge pretrain --out {run.root}` first")
    reward = load_reward(run, tok, cfg.rm.safety_threshold) if (run.ckpt("rm") / "config.json").is_file() \
        else None
    results: dict[str, dict] = {}
    greedy: dict[str, list] = {}
    chats: dict[str, list] = {}
    measured: dict[str, str] = {}   # weights digest -> the checkpoint already measured with them
    for name in present:
        kinds = ("base",) if name == "base" else ("sft",) if name == "sft" else ("rl",)
        model, _ = load_run_checkpoint(run, name, kinds, tok, "")
        twin = measured.get(digest := weights_digest(model))
        if twin is not None and name != "sft":   # an RL stage that published its initial policy:
            greedy[name], chats[name] = greedy[twin], chats[twin]   # greedy decoding gives the same answers
            results[name] = {**results[twin], "tasks": {t: {k: v for k, v in r.items() if not k.startswith("pass@")}
                                                          for t, r in results[twin]["tasks"].items()},
                             "same_weights_as": twin, "seconds": 0.0}
            print(f"eval {name}: the same weights as {twin}, measured once")
            continue
        measured.setdefault(digest, name)
        started = time.perf_counter()
        model.eval()
        with torch.no_grad():
            # pass@k (is there signal for RL to amplify?) only where RL starts: the SFT model
            acc, samples = task_eval.evaluate(model, tok, names, ec.eval_per_task,
                                              pass_k=ec.pass_k if name == "sft" else 0,
                                              pass_k_per_task=ec.pass_k_per_task,
                                              max_tokens=cfg.tasks.max_new_tokens, seed=ec.seed,
                                              shots=FEWSHOT if name == "base" else 0, return_samples=True)
            if name != "base":
                chats[name] = transcripts(task_eval.make_engine(model, tok), tok, cfg.tasks.max_new_tokens)
            record = bpb.heldout_of_run(model, run, tok)
            val_bpb = None if record is None else record["val_bpb"]
        greedy[name] = [row[0] for row in samples]
        results[name] = {"tasks": acc, "bpb": val_bpb, **refusal_rates(greedy[name]),
                         "seconds": round(time.perf_counter() - started, 1)}
        print(f"eval {name}: accuracy {acc['mean']['accuracy']:.1%}" + (f", bpb {val_bpb:.3f}" if val_bpb else "")
              + f" ({results[name]['seconds']:.0f} s)")

    if reward is not None and "sft" in greedy:
        def scores(samples):
            seqs = [(s.prompt_ids + s.completion.tokens) for s in samples]
            return reward(seqs, [s.item.safety_relevant for s in samples])
        # score the answers in the same (zero-shot) prompt context so the comparison is like for like
        sft_scores = scores(greedy["sft"])
        for name in present:
            mine = [task_eval.Sample(s.item, ref.prompt_ids, s.completion, s.messages, s.reward)
                    for s, ref in zip(greedy[name], greedy["sft"])]
            a = scores(mine)
            results[name]["rm_win_rate_vs_sft"] = float(((a > sft_scores).float() + 0.5 * (a == sft_scores).float()).mean())

    # Every checkpoint answered the same held-out items in the same order: keep each item's
    # verified reward (additive keys), every accuracy's 95% interval, and the paired bootstrap
    # over prompts of each checkpoint against SFT (stratified by task, as the mean is over tasks).
    item_tasks = [s.item.task for s in greedy[present[0]]]
    for name in present:
        rewards = [float(s.reward) for s in greedy[name]]
        results[name]["items"] = {"task": [s.item.task for s in greedy[name]],
                                  "seed": [getattr(s.item, "seed", None) for s in greedy[name]], "reward": rewards}
        results[name]["intervals"] = stats.accuracy_summary([r >= 1.0 for r in rewards], item_tasks,
                                                            seed=ec.seed)
    if "sft" in present:
        sft_correct = [s.reward >= 1.0 for s in greedy["sft"]]
        for name in present:
            if name != "sft":
                results[name]["vs_sft"] = stats.paired_bootstrap(
                    [s.reward >= 1.0 for s in greedy[name]], sft_correct, item_tasks, seed=ec.seed)

    battles = []   # (model_a, model_b, winner, prompt id): the arena's bootstrap resamples prompts
    rng = random.Random(ec.seed)
    for a, b in itertools.combinations(present, 2):
        pairs = list(enumerate(zip(greedy[a], greedy[b])))
        rng.shuffle(pairs)
        for prompt, (sa, sb) in pairs[:ec.arena_battles]:
            # random side assignment, as in the arena: position must not matter
            if rng.random() < 0.5:
                battles.append((a, b, arena.judge(sa.reward, sb.reward), prompt))
            else:
                battles.append((b, a, arena.judge(sb.reward, sa.reward), prompt))
    board = arena.leaderboard(battles, rounds=ec.bootstrap, seed=ec.seed) if len(present) > 1 else []
    out = {"models": results, "arena": board, "tasks": names, "transcripts": chats}
    write_json_atomic(run.root / "eval.json", out)
    for name in present:
        r = results[name]
        run.log("eval", model=name, acc_mean=r["tasks"]["mean"]["accuracy"],
                **{f"acc_{t}": r["tasks"][t]["accuracy"] for t in names},
                **({f"pass_at_{ec.pass_k}": r["tasks"]["mean"].get(f"pass@{ec.pass_k}")} if ec.pass_k else {}),
                **({"bpb": r["bpb"]} if r["bpb"] is not None else {}),
                **({"rm_win_rate_vs_sft": r["rm_win_rate_vs_sft"]} if "rm_win_rate_vs_sft" in r else {}),
                **{k: r[k] for k in ("refusal_rate_harmful", "false_refusal_rate") if k in r})
    report.write(run, cfg)
    return out
