"""Visual tasks with exact ground truth: images made here (no downloads), a question, a caption
and a verifier each.

    digits    scikit-learn's bundled handwritten digits (1,797 8x8 scans, UCI), placed at a random
              size and position: "What digit is this?" -> "7"                       chance 10%
    count     1-5 coloured shapes: "How many shapes are there?" -> "3"               chance 20%
    color     one shape: "What colour is the shape?" -> "blue"                       chance 20%
    shape     one shape: "What shape is this?" -> "triangle"                         chance 33%
    read      a short word in DejaVu Sans Bold (the font matplotlib ships): "What word is
              written here?" -> "fox"                                                chance 1/30
    bars      a bar chart of 3-4 bars: "Which bar is the tallest? Count from the left." -> "2"
                                                                                     chance ~29%

Train and held-out are disjoint by seed (train seeds < HELDOUT_SEED0 <= held-out seeds) AND by
image content: an image whose content hash (data/images.image_hash; for digits, the hash of the
source scan, so one person's 7 never lands on both sides) falls in the held-out bucket is never a
training image, and a training-bucket image is never held out. The question phrasings and the
word list are shared by both sides: what is held out is the image.
    items = get_vision_task("count").train_items(100, size=32)
"""
from __future__ import annotations

import functools
import hashlib
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

from llmforge.data.images import image_hash
from llmforge.errors import UserError
from llmforge.tasks.base import HELDOUT_SEED0, answer_text, first_int, lookup, names_in

HELDOUT_BUCKETS = 4            # one image hash in this many is on the held-out side
COLORS = {"red": (215, 40, 40), "green": (30, 160, 60), "blue": (40, 80, 225), "yellow": (235, 195, 20),
          "purple": (145, 55, 195)}
SHAPES = ("circle", "square", "triangle")
WORDS = ("cat", "dog", "sun", "box", "map", "cup", "hat", "pen", "bus", "car", "egg", "fox", "ice", "jar",
         "key", "leg", "man", "net", "owl", "pig", "sea", "tea", "toy", "van", "web", "bed", "bag", "arm",
         "ink", "oak")
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
DESCRIBE = "Describe the image."


def side_of(content_hash: str) -> str:
    """Which side an image belongs to, from its content hash alone."""
    return "eval" if int(content_hash[:8], 16) % HELDOUT_BUCKETS == 0 else "train"


@dataclass
class VisionItem:
    task: str
    seed: int
    image: object                  # PIL RGB image
    prompt: list[dict]             # the user turn: [{"type": "image"}, {"type": "text", ...}]
    reference: object              # what the verifier checks against
    gold: list[dict]               # the assistant's answer
    caption: str                   # a description of the image (alignment, stage 1)
    image_hash: str
    split: str = "train"
    meta: dict = field(default_factory=dict)

    @property
    def conversation(self) -> list[dict]:
        return self.prompt + self.gold

    @property
    def caption_conversation(self) -> list[dict]:
        return ask(DESCRIBE) + [{"role": "assistant", "content": self.caption}]


def ask(question: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]


def _canvas(rng: random.Random, size: int):
    from PIL import Image
    shade = rng.randint(225, 255)   # a light background, a little different each time
    return Image.new("RGB", (size, size), (shade, rng.randint(225, 255), rng.randint(225, 255)))


def _draw_shape(draw, kind: str, box: tuple[int, int, int, int], color) -> None:
    x0, y0, x1, y1 = box
    if kind == "circle":
        draw.ellipse(box, fill=color)
    elif kind == "square":
        draw.rectangle(box, fill=color)
    else:
        draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=color)


def _boxes(rng: random.Random, size: int, n: int, lo: int, hi: int) -> list[tuple[int, int, int, int]]:
    """n non-overlapping square boxes (a gap of 1 pixel at least) of side lo..hi inside the canvas."""
    for _ in range(200):
        boxes = []
        for _ in range(n):
            s = rng.randint(lo, hi)
            x, y = rng.randint(1, size - s - 1), rng.randint(1, size - s - 1)
            if all(x + s + 1 < a or c + 1 < x or y + s + 1 < b or d + 1 < y for a, b, c, d in boxes):
                boxes.append((x, y, x + s, y + s))
        if len(boxes) == n:
            return boxes
    raise RuntimeError(f"could not place {n} shapes on a {size}px canvas")


def _listing(things: list[str]) -> str:
    return things[0] if len(things) == 1 else ", ".join(things[:-1]) + " and " + things[-1]


def _first_word_of(text: str, vocabulary) -> str | None:
    words = re.findall(r"[a-z]+", text.lower().replace("colour", "color"))
    return next((w for w in words if w in vocabulary), None)


class VisionTask:
    """Subclasses set `name`, `questions` and implement render(rng, size) -> (image, reference,
    answer, caption) and verify(item, response) -> reward in [0, 1]."""

    name = "vision"
    questions: tuple[str, ...] = ()
    chance = 0.0                   # accuracy of a uniform guess among the possible answers

    def render(self, rng: random.Random, size: int, split: str):
        raise NotImplementedError

    def verify(self, item: VisionItem, response: list[dict]) -> float:
        raise NotImplementedError

    def content_hash(self, image, meta: dict) -> str:
        return image_hash(image)

    def generate(self, seed: int, split: str, size: int) -> VisionItem | None:
        """The item of `seed` on `split`'s side, or None when its image belongs to the other side."""
        rng = random.Random(f"{self.name}:{seed}")
        image, reference, answer, caption, meta = self.render(rng, size, split)
        digest = self.content_hash(image, meta)
        if side_of(digest) != split:
            return None
        prompt = ask(rng.choice(self.questions))
        return VisionItem(self.name, seed, image, prompt, reference, [{"role": "assistant", "content": answer}],
                          caption, digest, split, meta)

    def _items(self, n: int, seed0: int, split: str, size: int) -> list[VisionItem]:
        items, seen, seed = [], set(), seed0
        while len(items) < n and seed < seed0 + 50 * n + 1000:
            item = self.generate(seed, split, size)
            seed += 1
            if item is None or (split == "eval" and item.image_hash in seen):
                continue
            seen.add(item.image_hash)
            items.append(item)
        return items

    def train_items(self, n: int, size: int = 32, offset: int = 0) -> list[VisionItem]:
        return self._items(n, offset, "train", size)

    def heldout_items(self, n: int, size: int = 32) -> list[VisionItem]:
        """Distinct held-out images (seeds >= HELDOUT_SEED0, hashes in the held-out bucket)."""
        return self._items(n, HELDOUT_SEED0, "eval", size)


class Digits(VisionTask):
    name = "digits"
    chance = 0.1
    questions = ("What digit is this?", "Which digit is written here?", "What number is in the image?")

    def render(self, rng, size, split):
        from PIL import Image
        scans, labels, sides = _digits()
        index = rng.choice([i for i, s in enumerate(sides) if s == split])
        grey = Image.fromarray(scans[index]).resize((s := rng.randint(size * 3 // 4, size), s), Image.BILINEAR)
        img = _canvas(rng, size)
        ink = Image.new("RGB", grey.size, tuple(rng.randint(0, 80) for _ in range(3)))
        img.paste(ink, (rng.randint(0, size - s), rng.randint(0, size - s)), grey)
        label = int(labels[index])
        return img, label, str(label), f"A handwritten digit {label} ({NUMBER_WORDS[label]}).", {"scan": index}

    def content_hash(self, image, meta):
        scans, _, _ = _digits()
        return _scan_hash(scans[meta["scan"]])

    def verify(self, item, response):
        return float(first_int(answer_text(response)) == item.reference)


@functools.lru_cache(maxsize=1)
def _digits():
    """(8-bit scans, labels, side of each scan by its hash) of scikit-learn's digits."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise UserError("the digits task needs scikit-learn (its bundled digits); run scripts/setup.sh "
                        "or pip install scikit-learn, or leave digits out of vision.tasks") from None
    import numpy as np
    data = load_digits()
    scans = (data.images * (255 / 16)).round().astype(np.uint8)
    return scans, data.target, [side_of(_scan_hash(s)) for s in scans]


def _scan_hash(scan) -> str:
    return hashlib.sha256(b"digits" + scan.tobytes()).hexdigest()


class Count(VisionTask):
    name = "count"
    chance = 0.2
    questions = ("How many shapes are there?", "How many shapes can you see?", "Count the shapes.")

    def render(self, rng, size, split):
        from PIL import ImageDraw
        n = rng.randint(1, 5)
        img = _canvas(rng, size)
        draw = ImageDraw.Draw(img)
        names = []
        for box in _boxes(rng, size, n, max(4, size // 7), max(5, size // 5)):
            kind, color = rng.choice(SHAPES), rng.choice(list(COLORS))
            _draw_shape(draw, kind, box, COLORS[color])
            names.append(f"a {color} {kind}")
        caption = f"{n} shape{'s' if n > 1 else ''}: {_listing(names)}."
        return img, n, str(n), caption, {}

    def verify(self, item, response):
        return float(first_int(answer_text(response)) == item.reference)


class _OneShape(VisionTask):
    def render(self, rng, size, split):
        from PIL import ImageDraw
        img = _canvas(rng, size)
        kind, color = rng.choice(SHAPES), rng.choice(list(COLORS))
        _draw_shape(ImageDraw.Draw(img), kind, _boxes(rng, size, 1, size // 4, size * 2 // 3)[0], COLORS[color])
        reference = color if self.name == "color" else kind
        return img, reference, reference, f"A {color} {kind}.", {}

    def verify(self, item, response):
        vocabulary = COLORS if self.name == "color" else SHAPES
        return float(_first_word_of(answer_text(response), vocabulary) == item.reference)


class Color(_OneShape):
    name = "color"
    chance = 0.2
    questions = ("What colour is the shape?", "What color is it?", "Which colour do you see?")


class Shape(_OneShape):
    name = "shape"
    chance = 1 / 3
    questions = ("What shape is this?", "Which shape is drawn?", "What kind of shape is it?")


class Read(VisionTask):
    name = "read"
    chance = 1 / len(WORDS)
    questions = ("What word is written here?", "Read the word in the image.", "What does the image say?")

    def render(self, rng, size, split):
        from PIL import ImageDraw, ImageFont
        word = rng.choice(WORDS)
        img = _canvas(rng, size)
        font = ImageFont.truetype(_font_path(), rng.randint(size * 9 // 32, size * 12 // 32))
        draw = ImageDraw.Draw(img)
        x0, y0, x1, y1 = draw.textbbox((0, 0), word, font=font)
        x = rng.randint(0, max(0, size - (x1 - x0))) - x0
        y = rng.randint(0, max(0, size - (y1 - y0))) - y0
        draw.text((x, y), word, font=font, fill=tuple(rng.randint(0, 90) for _ in range(3)))
        return img, word, word, f"The word \"{word}\".", {}

    def verify(self, item, response):
        words = re.findall(r"[a-z]+", answer_text(response).lower())
        return float(bool(words) and words[0] == item.reference)


@functools.lru_cache(maxsize=1)
def _font_path() -> str:
    import matplotlib
    path = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans-Bold.ttf"
    if not path.is_file():
        raise UserError(f"the read task's font {path} is missing; reinstall matplotlib (it ships DejaVu Sans)")
    return str(path)


class Bars(VisionTask):
    name = "bars"
    chance = (1 / 3 + 1 / 4) / 2
    questions = ("Which bar is the tallest? Count from the left.", "Which bar is highest, counting from the left?")

    def render(self, rng, size, split):
        from PIL import ImageDraw
        n = rng.randint(3, 4)
        heights = rng.sample(range(size // 6, size - 3, 2), n)   # distinct: exactly one tallest bar
        img = _canvas(rng, size)
        draw = ImageDraw.Draw(img)
        slot = size // n
        color = COLORS[rng.choice(list(COLORS))]
        for i, h in enumerate(heights):
            draw.rectangle((i * slot + 1, size - 1 - h, (i + 1) * slot - 2, size - 1), fill=color)
        tallest = heights.index(max(heights)) + 1
        caption = f"A bar chart with {n} bars; bar {tallest} from the left is the tallest."
        return img, tallest, str(tallest), caption, {}

    def verify(self, item, response):
        return float(first_int(answer_text(response)) == item.reference)


VISION_TASKS: dict[str, VisionTask] = {t.name: t for t in (Digits(), Count(), Color(), Shape(), Read(), Bars())}
RENDERED = ("count", "color", "shape", "read", "bars")   # made here (digits are scanned)


def get_vision_task(name: str) -> VisionTask:
    return lookup(VISION_TASKS, name, "visual task")


def vision_task_names(spec: str = "") -> list[str]:
    """'' or 'all' -> every visual task; otherwise a comma-separated list, validated."""
    return names_in(VISION_TASKS, spec, "visual task")
