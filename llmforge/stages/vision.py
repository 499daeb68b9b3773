"""Vision (LLaVA's two stages, Liu et al. 2023): the SFT assistant learns to see.

    llmforge vision --out runs/demo [--set vision.tasks=digits,count] [--set vision.user_data=imgs.jsonl]

  stage 0, tower (-> ckpt/vision_tower): the fresh ViT encoder learns to see on its own, with one
      linear head per visual task on its mean patch feature, trained on the training images'
      labels (the digit, the count, the colour, ...). LLaVA starts from a pretrained CLIP tower;
      there is none to download here, and a tower learning only through the frozen language
      model's captions reached chance on digits (README). vision.tower_steps=0 skips it;
  stage 1, align (-> ckpt/vision_align): the language model is frozen; the projector (and the
      encoder, when stage 0 is skipped or vision.freeze_tower is off) learns to turn an image
      into embeddings from which it writes the image's caption ("3 shapes: a red circle, ...");
  stage 2, tune (-> ckpt/vision): visual questions ("How many shapes are there?" -> "3"). With
      vision.tune_lm (the default) the language model trains too, at vision.lm_lr_scale of the lr
      (LLaVA's stage 2), and vision.text_share of every batch is text SFT conversations, so the
      text skills are kept; without it only encoder + projector learn (a text prompt then runs the
      SFT weights unchanged, but the frozen model answers far worse: README).
Both run through the one loop (train/loop.py: DDP, budgets, resume, metrics.jsonl, progress; LoRA is
refused here: its adapters would wrap the image tower's q/v projections too).

Measured at the end (vision.json, report.md's vision section, plots/vision_samples.png): held-out
verified accuracy per visual task with Wilson 95% intervals, the same questions with a blank image
(the baseline that sees no image), and held-out text-task accuracy before (the SFT model) and after
(the vision model on text prompts), compared by a paired bootstrap over the same prompts.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from llmforge.config import Config, TrainConfig
from llmforge.data.images import normalize, to_uint8
from llmforge.errors import UserError
from llmforge.eval import stats
from llmforge.eval import tasks as task_eval
from llmforge.eval import vision as vision_eval
from llmforge.model.vision import VisionLanguageModel, VisionTowerConfig
from llmforge.run import RunDir, write_json_atomic
from llmforge.stages.chat_data import ChatRows, conversations, pack
from llmforge.tasks import task_names
from llmforge.tasks.user_data import load_image_conversations
from llmforge.tasks.vision import RENDERED, get_vision_task, vision_task_names
from llmforge.tokenizer.chat import render
from llmforge.train import distributed
from llmforge.train.checkpoint import load_model, load_run_checkpoint, load_run_tokenizer, load_weights
from llmforge.train.loop import Checkpointing, train

STAGE = "vision"


@dataclass
class VisionConfig(TrainConfig):
    """The `vision` section; the TrainConfig fields are stage 2's (tune), align_* stage 1's."""
    batch_size: int = 16
    seq_len: int = 128              # rows of packed conversations (an image is tower.num_patches tokens)
    lr: float = 2e-3
    warmup_steps: int = 20
    max_steps: int = 400            # steps, not minutes: a loaded machine must not change the result
    eval_every: int = 0
    ckpt_every: int = 0
    enabled: bool = False           # the speedrun runs this stage after SFT (off in `cpu`: it has no minutes left)
    init: str = "sft"               # checkpoint folder (ckpt/<init>) whose language model learns to see
    tasks: str = ""                 # visual tasks (tasks/vision.py), comma-separated; "" = all
    examples_per_task: int = 3000   # training images per visual task (each one caption + one question)
    user_data: str = ""             # JSONL of conversations with image_url parts, added to stage 2
    tower: VisionTowerConfig = field(default_factory=VisionTowerConfig)
    tower_steps: int = 1500         # stage 0: steps of the encoder learning the training labels (0 = skip)
    tower_batch: int = 96           # stage 0: images per step, split evenly over the visual tasks
    tower_lr: float = 3e-3          # stage 0 peak lr (AdamW)
    freeze_tower: bool = True       # after stage 0 the encoder stays frozen (LLaVA keeps its CLIP tower frozen):
                                    # stages 1 and 2 train the projector (and the language model)
    align_lr: float = 3e-3          # stage 1 peak lr (AdamW; the language model is frozen)
    align_max_steps: int = 150
    align_minutes: float = 0.0      # 0 = no time budget for stage 1
    tune_lm: bool = True            # stage 2 trains the language model too (LLaVA's stage 2); False: encoder +
                                    # projector only, so text prompts run the SFT model unchanged
    lm_lr_scale: float = 0.1        # stage 2 with tune_lm: the language model's lr is lr times this
    text_share: float = 0.25        # stage 2 with tune_lm: share of every batch that is text SFT conversations
    text_examples_per_task: int = 300   # text conversations per text task for that share
    eval_per_task: int = 100        # held-out images per visual task
    text_eval_per_task: int = 30    # held-out items per text task, before and after
    samples_png: int = 24           # sample images with the model's answers in plots/vision_samples.png


class ImageRows:
    """Conversations with images, packed whole into rows of seq_len + 1 tokens (several per row);
    `pixels` (N, 3, S, S) uint8 holds every image in row order, row r's from starts[r]."""

    def __init__(self, tok, model: VisionLanguageModel, convs: list[tuple[list[dict], list]], seq_len: int):
        size, k = model.tower.image_size, model.image_tokens
        seqs, pictures, self.dropped = [], [], 0
        for messages, images in convs:
            ids, mask = render(tok, messages, k, model.image_token_id)
            if len(ids) > seq_len + 1:   # a cut conversation could lose half an image: leave it out
                self.dropped += 1
                continue
            seqs.append((ids, mask))
            pictures += images
        if not seqs:
            raise UserError(f"no conversation with images fits vision.seq_len={seq_len}; raise it")
        self.ids, self.masks, _ = pack(seqs, seq_len + 1, tok.eot_id, packing=True)
        self.pixels = torch.stack([to_uint8(p, size) for p in pictures])
        per_row = (self.ids == model.image_token_id).sum(1) // k
        self.starts = torch.cumsum(per_row, 0) - per_row
        self.counts = per_row

    def __len__(self) -> int:
        return len(self.ids)

    def images(self, rows: torch.Tensor) -> torch.Tensor:
        """Float pixels in [-1, 1] of the given rows' images, in row order."""
        picks = [torch.arange(int(self.starts[r]), int(self.starts[r] + self.counts[r])) for r in rows]
        return normalize(self.pixels[torch.cat(picks)])


def image_batch(g: torch.Generator, batch: int, rank: int, world: int, rows_with_images: ImageRows,
                text: ChatRows | None, text_share: float) -> dict:
    """This rank's `batch` rows of a global batch: round(text_share * batch) text conversation rows
    (no image) and the rest image rows with their images. Every rank draws the whole global batch
    (so ranks stay in step) and keeps its own share of both kinds: each rank has images."""
    n_text = min(batch - 1, round(text_share * batch)) if text is not None else 0
    n_img = batch - n_text
    pick = torch.randint(0, len(rows_with_images), (n_img * world,), generator=g)[rank * n_img:(rank + 1) * n_img]
    ids, masks = [rows_with_images.ids[pick]], [rows_with_images.masks[pick]]
    if n_text:
        tpick = torch.randint(0, len(text), (n_text * world,), generator=g)[rank * n_text:(rank + 1) * n_text]
        ids.append(text.ids[tpick]), masks.append(text.masks[tpick])
    r, m = torch.cat(ids), torch.cat(masks)
    return {"input_ids": r[:, :-1], "targets": r[:, 1:], "loss_mask": m[:, 1:], "images": rows_with_images.images(pick)}


class TowerProbe(nn.Module):
    """Stage 0's model: the image encoder with one linear head per visual task, reading the mean of
    its patch features; the heads are dropped after stage 0, the encoder goes on into stage 1."""

    def __init__(self, encoder: nn.Module, classes: dict[str, list[str]]):
        super().__init__()
        self.encoder = encoder
        self.classes = classes
        self.heads = nn.ModuleDict({t: nn.Linear(encoder.cfg.width, len(c)) for t, c in classes.items()})

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per image patch (the loop's tokens here), matmul weights only."""
        return 6.0 * sum(p.numel() for p in self.encoder.parameters())

    def logits(self, task: str, pixels: torch.Tensor) -> torch.Tensor:
        return self.heads[task](self.encoder(normalize(pixels)).mean(1))

    def forward(self, pixels: torch.Tensor, labels: torch.Tensor, task: torch.Tensor) -> torch.Tensor:
        """Mean over tasks of each task's cross-entropy on its rows (every task weighs the same)."""
        feats = self.encoder(normalize(pixels)).mean(1)
        losses = [F.cross_entropy(head(feats[task == i]), labels[task == i])
                  for i, head in enumerate(self.heads.values()) if bool((task == i).any())]
        return torch.stack(losses).mean()


class LabelledImages:
    """Every visual task's training images (uint8) with class indices, for stage 0."""

    def __init__(self, items_by_task: dict[str, list], size: int, patch_size: int):
        self.patch_size = patch_size
        self.classes = {t: sorted({str(i.reference) for i in items}) for t, items in items_by_task.items()}
        self.pixels, self.labels = [], []
        for t, items in items_by_task.items():
            index = {c: j for j, c in enumerate(self.classes[t])}
            self.pixels.append(torch.stack([to_uint8(i.image, size) for i in items]))
            self.labels.append(torch.tensor([index[str(i.reference)] for i in items]))

    def batch(self, g: torch.Generator, per_task: int, rank: int, world: int) -> dict:
        """This rank's share of a global batch of `per_task` images of every task (every rank draws
        the whole batch and keeps its slice, so ranks stay in step)."""
        pixels, labels, task = [], [], []
        for t, (x, y) in enumerate(zip(self.pixels, self.labels)):
            pick = torch.randint(0, len(x), (per_task * world,), generator=g)[rank * per_task:(rank + 1) * per_task]
            pixels.append(x[pick]), labels.append(y[pick]), task.append(torch.full((per_task,), t))
        x = torch.cat(pixels)
        patches = (x.shape[-1] // self.patch_size) ** 2
        return {"pixels": x, "labels": torch.cat(labels), "task": torch.cat(task), "tokens": len(x) * patches}


def _pretrain_tower(model: VisionLanguageModel, vc: VisionConfig, run: RunDir, ctx, items_by_task: dict,
                    tok, meta: dict, resume: bool, show_progress: bool) -> dict:
    """Stage 0: the encoder learns the training labels; its held-out accuracy per task is logged."""
    data = LabelledImages(items_by_task, vc.tower.image_size, vc.tower.patch_size)
    probe = TowerProbe(model.encoder, data.classes)
    per_task = max(1, vc.tower_batch // len(items_by_task))
    tc = dataclasses.replace(vc, lr=vc.tower_lr, max_steps=vc.tower_steps, batch_size=per_task * len(items_by_task),
                             minutes=0.0, optimizer="adamw", lora_rank=0, warmup_steps=50)

    def get_batch(step, micro, ctx):
        return data.batch(torch.Generator().manual_seed(tc.seed * 1_000_003 + step * 1_009 + micro), per_task,
                          ctx.rank, ctx.world)

    ckpt = Checkpointing(run.ckpt("vision_tower"), "vision_tower", model.cfg, tok, {**meta, "part": "tower"})
    resume = resume and (run.ckpt("vision_tower") / "train_state.json").is_file()
    summary = train(probe, tc, run, stage=f"{STAGE}_tower", ctx=ctx, get_batch=get_batch,
                    loss_fn=lambda m, b: (m(b["pixels"], b["labels"], b["task"]), {}), ckpt=ckpt, resume=resume,
                    show_progress=show_progress)
    if ctx.is_main:   # a diagnostic: does the tower see? (held-out images, never trained on)
        probe.eval()
        accuracy = {}
        with torch.no_grad():
            for t in items_by_task:
                held = get_vision_task(t).heldout_items(vc.eval_per_task, vc.tower.image_size)
                index = {c: j for j, c in enumerate(data.classes[t])}
                x = torch.stack([to_uint8(i.image, vc.tower.image_size) for i in held])
                y = torch.tensor([index.get(str(i.reference), -1) for i in held])
                accuracy[t] = float((probe.logits(t, x).argmax(1) == y).float().mean())
        run.log(f"{STAGE}_tower", event="probe", **{f"probe_acc_{t}": a for t, a in accuracy.items()})
        print("vision: stage 0 probe, held-out accuracy " + ", ".join(f"{t} {a:.0%}" for t, a in accuracy.items()))
        summary["probe_accuracy"] = accuracy
    return summary


def _loss_fn(model, batch):
    _, loss = model(batch["input_ids"], targets=batch["targets"], loss_mask=batch["loss_mask"], images=batch["images"])
    return loss, {}


def _train_part(model, tc: TrainConfig, run: RunDir, ctx, rows: ImageRows, text, text_share: float, part: str,
                folder: str, tok, meta: dict, resume: bool, show_progress: bool) -> dict:
    B = tc.batch_size

    def get_batch(step, micro, ctx):
        g = torch.Generator().manual_seed(tc.seed * 1_000_003 + step * 1_009 + micro)
        return image_batch(g, B, ctx.rank, ctx.world, rows, text, text_share)

    ckpt = Checkpointing(run.ckpt(folder), "vision", model.cfg, tok, {**meta, "part": part})
    resume = resume and (run.ckpt(folder) / "train_state.json").is_file()
    return train(model, tc, run, stage=f"{STAGE}_{part}", ctx=ctx, get_batch=get_batch, loss_fn=_loss_fn,
                 ckpt=ckpt, resume=resume, show_progress=show_progress)


def _complete(run: RunDir, folder: str) -> bool:
    path = run.ckpt(folder) / "config.json"
    return path.is_file() and bool(json.loads(path.read_text()).get("complete"))


def run(cfg: Config, run: RunDir, resume: bool = False, show_progress: bool = True) -> dict:
    vc = cfg.vision
    vc.tower.validate()
    if vc.lora_rank:
        raise UserError("vision.lora_rank: the vision stage does not train LoRA adapters yet; set it to 0 "
                        "(vision.tune_lm=false trains the encoder and projector alone)")
    ctx = distributed.setup()
    tok = load_run_tokenizer(run)
    trunk, _ = load_run_checkpoint(run, vc.init, ("sft", "rl", "base"), tok,
                                   f"run `llmforge sft --out {run.root}` first (or set vision.init)")
    model = VisionLanguageModel(trunk, vc.tower)
    seq_len = min(vc.seq_len, trunk.cfg.max_seq_len)
    names = vision_task_names(vc.tasks)
    text_names = task_names(cfg.tasks.names)
    size = vc.tower.image_size
    by_task = {name: get_vision_task(name).train_items(vc.examples_per_task, size) for name in names}
    items = [item for name in names for item in by_task[name]]
    meta = {"preset": cfg.preset, "vision": dataclasses.asdict(vc.tower), "vision_tasks": names}
    captions = ImageRows(tok, model, [(item.caption_conversation, [item.image]) for item in items], seq_len)
    questions = [(item.conversation, [item.image]) for item in items]
    if vc.user_data:
        questions += load_image_conversations(vc.user_data)
    qa = ImageRows(tok, model, questions, seq_len)
    text_share = vc.text_share if vc.tune_lm else 0.0   # text rows teach a frozen language model nothing
    text = ChatRows(tok, conversations(text_names, vc.text_examples_per_task, seed=vc.seed), seq_len) \
        if text_share > 0 else None
    if ctx.is_main:
        print(f"vision: {len(items)} training images ({', '.join(names)}), {model.image_tokens} image tokens each; "
              f"captions in {len(captions)} rows, questions in {len(qa)} rows of {seq_len} tokens "
              f"({qa.dropped} too long), {text_share:.0%} of stage 2 rows text conversations")
    summary: dict = {}
    frozen_tower = vc.freeze_tower and vc.tower_steps > 0   # LLaVA's frozen tower, once stage 0 trained it
    try:
        text_before = task_eval.evaluate(trunk, tok, text_names, vc.text_eval_per_task, return_samples=True,
                                         max_tokens=cfg.tasks.max_new_tokens) if ctx.is_main else None
        # stage 0: the encoder alone learns the training labels; stage 1: the language model is
        # frozen, encoder + projector learn to caption
        if _complete(run, "vision_align"):
            model, _, _ = load_model(run.ckpt("vision_align"), kinds=("vision",))
        else:
            if _complete(run, "vision_tower"):
                weights = load_weights(run.ckpt("vision_tower"))
                model.encoder.load_state_dict({k.removeprefix("encoder."): v for k, v in weights.items()
                                               if k.startswith("encoder.")})
            elif vc.tower_steps > 0:
                summary["tower"] = _pretrain_tower(model, vc, run, ctx, by_task, tok, meta, resume, show_progress)
            trunk.requires_grad_(False)
            model.encoder.requires_grad_(not frozen_tower)
            align = dataclasses.replace(vc, lr=vc.align_lr, max_steps=vc.align_max_steps, minutes=vc.align_minutes,
                                        optimizer="adamw", lora_rank=0)
            summary["align"] = _train_part(model, align, run, ctx, captions, None, 0.0, "align", "vision_align",
                                           tok, meta, resume, show_progress)
        # stage 2: visual questions + text conversations; the language model trains too
        model.trunk.requires_grad_(vc.tune_lm)
        model.encoder.requires_grad_(not frozen_tower)
        model.lr_scales = {id(p): vc.lm_lr_scale for p in model.trunk.parameters()}
        summary["tune"] = _train_part(model, vc, run, ctx, qa, text, text_share, "tune", "vision", tok, meta,
                                      resume, show_progress)
    finally:
        distributed.teardown()
    if ctx.is_main:
        summary.update(measure(model, tok, run, vc, names, text_names, text_before, cfg.tasks.max_new_tokens))
    return summary


def measure(model, tok, run: RunDir, vc: VisionConfig, names, text_names, text_before, max_tokens: int) -> dict:
    """Held-out visual accuracy (with images and blank), text accuracy before/after -> vision.json + plot."""
    seen, blind, samples = vision_eval.evaluate(model, tok, names, vc.eval_per_task)
    text_after = task_eval.evaluate(model, tok, text_names, vc.text_eval_per_task, return_samples=True,
                                    max_tokens=max_tokens)
    rendered = [n for n in names if n in RENDERED]
    mean = {"rendered": _mean(seen, rendered), "rendered_blank": _mean(blind, rendered)}
    before, after = text_before[0]["mean"]["accuracy"], text_after[0]["mean"]["accuracy"]
    paired = _paired(text_before[1], text_after[1])
    out = {"tasks": names, "image_tokens": model.image_tokens, "accuracy": seen, "blank_image": blind, "mean": mean,
           "text_before": before, "text_after": after, "text_paired": paired,
           "text_items": len(text_after[1])}
    write_json_atomic(run.root / "vision.json", out)
    sample_grid(samples, run.plots / "vision_samples.png", vc.samples_png)
    run.log(STAGE, event="eval", rendered_mean=mean["rendered"], text_before=before, text_after=after,
            **{f"acc_{n}": seen[n]["accuracy"] for n in names})
    print("vision: held-out accuracy " + ", ".join(f"{n} {seen[n]['accuracy']:.0%} (blank {blind[n]['accuracy']:.0%})"
                                                    for n in names)
          + f"; text {before:.1%} -> {after:.1%} ({paired['diff'] * 100:+.1f} points "
            f"[{paired['lo'] * 100:+.1f}, {paired['hi'] * 100:+.1f}])")
    return out


def _mean(acc: dict, names: list[str]) -> float | None:
    return sum(acc[n]["accuracy"] for n in names) / len(names) if names else None


def _paired(before, after) -> dict:
    """After vs before on the same text prompts: paired bootstrap over prompts within tasks."""
    a = [float(row[0].reward >= 1.0) for row in after]
    b = [float(row[0].reward >= 1.0) for row in before]
    strata = [row[0].item.task for row in after]
    return stats.paired_bootstrap(a, b, strata=strata)


def sample_grid(samples, path, n: int) -> None:
    """A PNG grid of held-out images with the question's task, the model's answer and a tick/cross."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from llmforge.run import atomic_path

    by_task: dict[str, list] = {}
    for s in samples:
        by_task.setdefault(s.item.task, []).append(s)
    per = max(1, n // max(1, len(by_task)))
    chosen = [s for rows in by_task.values() for s in rows[:per]]
    if not chosen:
        return
    cols = min(per, 6) if per > 1 else min(len(chosen), 6)
    rows = -(-len(chosen) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 1.7, rows * 1.9), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, s in zip(axes.flat, chosen):
        ax.imshow(s.item.image)
        mark = "✓" if s.reward >= 1.0 else "✗"
        ax.set_title(f"{s.item.task}: {s.answer.strip()[:14]} {mark}", fontsize=7,
                     color="green" if s.reward >= 1.0 else "red")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
