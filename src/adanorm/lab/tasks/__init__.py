"""Built-in tasks.  Importing a task module registers it (``@register_task``); add new task
modules to the import list below."""

from . import digits, lm, mnist, mt, parsing, textcls  # noqa: F401

__all__ = ["digits", "lm", "mnist", "mt", "parsing", "textcls"]
