"""Verified accuracy on the held-out visual tasks (tasks/vision.py), through the engine, with
Wilson 95% intervals; and the same questions with a blank image, the baseline that sees no image
(it can only guess from the question: near chance when the answers come from the images).

    results, samples = evaluate(vlm, tok, ["digits", "count"], per_task=100)
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from llmforge.data.images import to_pixels
from llmforge.eval.stats import wilson_interval
from llmforge.eval.tasks import make_engine
from llmforge.infer.sampling import SamplingParams
from llmforge.tasks.vision import VisionItem, get_vision_task
from llmforge.tokenizer.chat import END, EOT, parse_completion, render_prompt


@dataclass
class VisualSample:
    item: VisionItem
    answer: str
    reward: float


def heldout(task_names: list[str], per_task: int, size: int) -> list[VisionItem]:
    return [item for name in task_names for item in get_vision_task(name).heldout_items(per_task, size)]


def pixels_of(items: list[VisionItem], size: int, blank: bool = False) -> torch.Tensor:
    """(N, 3, S, S): the items' images, or a mid-grey image each (blank)."""
    if blank:
        return torch.zeros(len(items), 3, size, size)
    return torch.stack([to_pixels(item.image, size) for item in items])


@torch.no_grad()
def answer(model, tok, items: list[VisionItem], *, blank: bool = False, max_tokens: int = 16,
           max_batch: int = 64) -> list[VisualSample]:
    """Greedy answers to the items' questions, each graded by its task's verifier."""
    was_training = model.training
    size = model.tower.image_size
    engine = make_engine(model, tok, max_batch)
    prompts = [render_prompt(tok, item.prompt, model.image_tokens, model.image_token_id) for item in items]
    pixels = pixels_of(items, size, blank)
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, stop_token_ids=[tok.token_id(END), tok.token_id(EOT)])
    outs = engine.generate(prompts, params, images=[pixels[i:i + 1] for i in range(len(items))])
    model.train(was_training)
    samples = []
    for item, out in zip(items, outs):
        messages = parse_completion(tok, out.tokens)
        samples.append(VisualSample(item, out.text, get_vision_task(item.task).verify(item, messages)))
    return samples


def accuracy(samples: list[VisualSample], task_names: list[str]) -> dict:
    """{task: {"accuracy", "lo", "hi", "n", "chance"}} with Wilson 95% intervals."""
    out = {}
    for name in task_names:
        rewards = [s.reward for s in samples if s.item.task == name]
        hits = sum(r >= 1.0 for r in rewards)
        lo, hi = wilson_interval(hits, len(rewards))
        out[name] = {"accuracy": hits / max(len(rewards), 1), "lo": lo, "hi": hi, "n": len(rewards),
                     "chance": get_vision_task(name).chance}
    return out


def evaluate(model, tok, task_names: list[str], per_task: int) -> tuple[dict, dict, list[VisualSample]]:
    """(accuracy with the images, accuracy with blank images, the samples with images)."""
    items = heldout(task_names, per_task, model.tower.image_size)
    seen = answer(model, tok, items)
    blind = answer(model, tok, items, blank=True)
    return accuracy(seen, task_names), accuracy(blind, task_names), seen
