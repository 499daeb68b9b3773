"""Users' own SFT data: JSONL, one conversation per line in the common `messages` format.

    {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}
"""
from __future__ import annotations

import json
from pathlib import Path

from llmforge.errors import UserError
from llmforge.tokenizer.chat import validate_messages


def load_conversations(path: str | Path) -> list[list[dict]]:
    """Every line's `messages`, validated; a bad line raises UserError naming file:line."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"conversation file {path} does not exist; pass an existing .jsonl file")
    conversations = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{where}: not valid JSON ({e.msg}); write one JSON object per line") from None
            if not isinstance(record, dict) or "messages" not in record:
                raise UserError(f'{where}: expected an object with a "messages" list; '
                                'write {"messages": [{"role": ..., "content": ...}, ...]}')
            messages = record["messages"]
            validate_messages(messages, where)
            if not any(m["role"] == "assistant" for m in messages):
                raise UserError(f"{where}: the conversation has no assistant message to learn from; add one")
            conversations.append(messages)
    if not conversations:
        raise UserError(f"{path} holds no conversations; add JSONL lines or drop the option")
    return conversations
