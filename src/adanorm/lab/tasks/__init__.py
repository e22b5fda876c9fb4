"""Built-in tasks.  Importing a task module registers it (``@register_task``); add new task
modules to the import list below."""

from . import digits, mnist  # noqa: F401
from . import textcls  # noqa: F401
from . import lm  # noqa: F401
from . import parsing  # noqa: F401

__all__ = ["digits", "mnist"]
