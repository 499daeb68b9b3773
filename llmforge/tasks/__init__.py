"""Synthetic verifiable tasks: each makes (prompt, reference, gold) from a seed and grades a
response with a reward in [0, 1]. See base.py for how train and held-out stay disjoint."""
from __future__ import annotations

from llmforge.tasks.arithmetic import AddSub, MultiplyWithTool
from llmforge.tasks.base import Item, Task, lookup, names_in
from llmforge.tasks.chat import Chat
from llmforge.tasks.extract import ExtractJSON
from llmforge.tasks.python_doc import PythonDoc
from llmforge.tasks.safety import Safety
from llmforge.tasks.words import CountLetter, ReverseWord, SortNumbers

TASKS: dict[str, Task] = {t.name: t for t in (AddSub(), MultiplyWithTool(), CountLetter(), ReverseWord(),
                                              SortNumbers(), ExtractJSON(), Safety(), Chat(), PythonDoc())}


def get_task(name: str) -> Task:
    return lookup(TASKS, name)


def task_names(spec: str = "") -> list[str]:
    """'' or 'all' -> every task; otherwise a comma-separated list, validated."""
    return names_in(TASKS, spec)


__all__ = ["Item", "Task", "TASKS", "get_task", "task_names"]
