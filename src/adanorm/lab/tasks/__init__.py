"""Built-in tasks, one package per family: the path from a task's config to its model and its
metric stays inside that family's folder.  Importing a family registers its tasks
(``@register_task``); add new families to the import list below."""

from . import lm, mt, parsing, textcls, vision  # noqa: F401

__all__ = ["lm", "mt", "parsing", "textcls", "vision"]
