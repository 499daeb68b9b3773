"""Verified accuracy: sample answers to held-out task prompts through the engine, grade them
with the task verifiers. Greedy accuracy (one answer at temperature 0) and pass@k (k samples,
unbiased estimator of Chen et al. 2021 from n = k samples, i.e. "any of k is correct").

The base model has never seen the chat format as a conversation, so it is prompted few-shot:
a few solved train items of the same task precede the question as earlier turns.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from llmforge.infer.engine import Completion, Engine
from llmforge.infer.sampling import SamplingParams
from llmforge.tasks import Item, get_task
from llmforge.tokenizer.chat import END, EOT, parse_completion, render_prompt


@dataclass
class Sample:
    item: Item
    prompt_ids: list[int]
    completion: Completion
    messages: list[dict]          # parsed response (assistant / tool turns)
    reward: float

    @property
    def ended(self) -> bool:
        return self.completion.finish_reason == "stop"


def fewshot_prompt(item: Item, shots: int) -> list[dict]:
    """Earlier turns with solved train items of the same task, then the item's prompt."""
    if shots <= 0:
        return item.prompt
    examples = get_task(item.task).train_items(shots, offset=10_000 + item.seed % 1000)
    turns: list[dict] = []
    for ex in examples:
        turns += ex.conversation
    return turns + item.prompt


def make_engine(model, tok, max_batch: int = 128) -> Engine:
    from llmforge.infer.tools import run_tool
    return Engine(model, tok, max_batch=max_batch, tool_runner=run_tool)


def sample(model, tok, items: list[Item], *, n: int = 1, temperature: float = 1.0, max_tokens: int = 64,
           seed: int = 0, shots: int = 0, engine: Engine | None = None, max_batch: int = 128) -> list[list[Sample]]:
    """n graded samples for each item (list per item), all through one engine."""
    was_training = model.training
    engine = engine or make_engine(model, tok, max_batch)
    stops = [tok.token_id(END), tok.token_id(EOT)]
    prompts, params = [], []
    for i, item in enumerate(items):
        ids = render_prompt(tok, fewshot_prompt(item, shots))
        room = engine.max_len - len(ids) - 1
        if room < 4:   # a prompt longer than the context: keep its tail (the question itself)
            ids = ids[-(engine.max_len // 2):]
            room = engine.max_len - len(ids) - 1
        for j in range(n):
            prompts.append(ids)
            budget = min(max_tokens, get_task(item.task).max_new_tokens, room)
            params.append(SamplingParams(max_tokens=budget, temperature=temperature,
                                         seed=seed * 1_000_003 + i * 1009 + j, stop_token_ids=stops,
                                         execute_tools=True))
    completions = engine.generate(prompts, params)
    model.train(was_training)
    out: list[list[Sample]] = []
    for i, item in enumerate(items):
        row = []
        for j in range(n):
            k = i * n + j
            messages = parse_completion(tok, completions[k].tokens)
            reward = get_task(item.task).verify(item, messages)
            row.append(Sample(item, prompts[k], completions[k], messages, reward))
        out.append(row)
    return out


def heldout(task_names: list[str], per_task: int) -> list[Item]:
    items = []
    for name in task_names:
        items += get_task(name).heldout_items(per_task)
    return items


def first_per_task(items: list, n: int) -> list:
    """The first n items of each task, in order (n <= 0: all)."""
    if n <= 0:
        return items
    counts: dict[str, int] = {}
    kept = []
    for item in items:
        counts[item.task] = counts.get(item.task, 0) + 1
        if counts[item.task] <= n:
            kept.append(item)
    return kept


@torch.no_grad()
def evaluate(model, tok, task_names: list[str], per_task: int, *, pass_k: int = 0, pass_k_per_task: int = 0,
             max_tokens: int = 64, shots: int = 0, seed: int = 0, return_samples: bool = False):
    """{task: {"accuracy": greedy verified accuracy, "pass@k": ...}, "mean": {...}}; pass@k over the
    first `pass_k_per_task` items of each task (0 = all of them)."""
    items = heldout(task_names, per_task)
    greedy = sample(model, tok, items, n=1, temperature=0.0, max_tokens=max_tokens, shots=shots, seed=seed)
    results: dict[str, dict] = {}
    for name in task_names:
        rewards = [row[0].reward for row in greedy if row[0].item.task == name]
        results[name] = {"accuracy": sum(r >= 1.0 for r in rewards) / max(len(rewards), 1), "n": len(rewards)}
    if pass_k > 0:
        sampled = sample(model, tok, first_per_task(items, pass_k_per_task), n=pass_k, temperature=1.0,
                         max_tokens=max_tokens, shots=shots, seed=seed + 1)
        for name in task_names:
            rows = [row for row in sampled if row[0].item.task == name]
            hits = [any(s.reward >= 1.0 for s in row) for row in rows]
            results[name][f"pass@{pass_k}"] = sum(hits) / max(len(hits), 1)
    results["mean"] = {key: sum(results[n][key] for n in task_names) / len(task_names)
                       for key in results[task_names[0]] if key != "n"}
    if return_samples:
        return results, greedy
    return results
