"""Synthetic verifiable tasks: each makes (prompt, reference, gold) from a seed and grades a
response with a reward in [0, 1]. See base.py for how train and held-out stay disjoint."""
from __future__ import annotations

from llmforge.errors import UserError
from llmforge.tasks.arithmetic import AddSub, MultiplyWithTool
from llmforge.tasks.base import Item, Task
from llmforge.tasks.chat import Chat
from llmforge.tasks.extract import ExtractJSON
from llmforge.tasks.python_doc import PythonDoc
from llmforge.tasks.safety import Safety
from llmforge.tasks.words import CountLetter, ReverseWord, SortNumbers

TASKS: dict[str, Task] = {t.name: t for t in (AddSub(), MultiplyWithTool(), CountLetter(), ReverseWord(),
                                              SortNumbers(), ExtractJSON(), Safety(), Chat(), PythonDoc())}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise UserError(f"unknown task '{name}'; choose from {', '.join(TASKS)}")
    return TASKS[name]


def task_names(spec: str = "") -> list[str]:
    """'' or 'all' -> every task; otherwise a comma-separated list, validated."""
    if not spec or spec == "all":
        return list(TASKS)
    names = [s.strip() for s in spec.split(",") if s.strip()]
    for n in names:
        get_task(n)
    return names


__all__ = ["Item", "Task", "TASKS", "get_task", "task_names"]
