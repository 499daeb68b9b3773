"""Users' own SFT data: JSONL, one conversation per line in the common `messages` format.

    {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}
"""
from __future__ import annotations

from pathlib import Path

from llmforge.errors import UserError
from llmforge.run import read_jsonl
from llmforge.tokenizer.chat import validate_messages


def load_conversations(path: str | Path) -> list[list[dict]]:
    """Every line's `messages`, validated; a bad line raises UserError naming file:line."""
    conversations = []
    for where, record in read_jsonl(path, "conversation"):
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
