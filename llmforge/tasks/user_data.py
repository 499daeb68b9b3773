"""Users' own SFT data: JSONL, one conversation per line in the common `messages` format.

    {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}

With images (`llmforge vision --set vision.user_data=FILE`), a user's content is a list of OpenAI
parts; an image is a file path (relative to the JSONL file) or a data URI:

    {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "cat.png"}},
                                               {"type": "text", "text": "What is this?"}]},
                  {"role": "assistant", "content": "A cat."}]}
"""
from __future__ import annotations

from pathlib import Path

from llmforge.errors import UserError
from llmforge.run import read_jsonl
from llmforge.tokenizer.chat import image_parts, image_url, validate_messages


def _records(path: str | Path):
    """(file:line, messages) of every line, validated; a bad line raises UserError naming file:line."""
    found = False
    for where, record in read_jsonl(path, "conversation"):
        if not isinstance(record, dict) or "messages" not in record:
            raise UserError(f'{where}: expected an object with a "messages" list; '
                            'write {"messages": [{"role": ..., "content": ...}, ...]}')
        messages = record["messages"]
        validate_messages(messages, where)
        if not any(m["role"] == "assistant" for m in messages):
            raise UserError(f"{where}: the conversation has no assistant message to learn from; add one")
        found = True
        yield where, messages
    if not found:
        raise UserError(f"{path} holds no conversations; add JSONL lines or drop the option")


def load_conversations(path: str | Path) -> list[list[dict]]:
    """Every line's `messages`, validated; a bad line raises UserError naming file:line."""
    return [messages for _, messages in _records(path)]


def load_image_conversations(path: str | Path) -> list[tuple[list[dict], list]]:
    """Every line's (messages, its images as PIL images in order); an image that is missing or
    no image raises UserError naming file:line."""
    from llmforge.data.images import load_image

    out = []
    for where, messages in _records(path):
        images = []
        for part in image_parts(messages):
            url = image_url(part)
            if url is None:
                raise UserError(f"{where}: an image part needs image_url.url (a file path or a data URI)")
            images.append(load_image(url, where, base=Path(path).parent))
        out.append((messages, images))
    return out
