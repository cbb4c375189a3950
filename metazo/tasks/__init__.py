"""Prompt-based classification tasks scored through label words (MeZO / LM-BFF style).

The model reads `Example.prompt` and is scored on the next token: the logits of the label words
at the last position give a cross-entropy loss and a prediction.
"""

from metazo.tasks.core import Example, Task
from metazo.tasks.registry import get_task, list_tasks
from metazo.tasks.user import parse_label_words

__all__ = ["Example", "Task", "get_task", "list_tasks", "parse_label_words"]
