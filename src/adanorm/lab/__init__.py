"""adanorm's reproduction lab: configs, a generic trainer, tasks, sweeps and reports.

Entry point: the ``adanorm`` command (:mod:`adanorm.lab.cli`).
Needs ``pip install 'adanorm[lab]'``.
"""

from .config import load_config
from .task import ClassificationTask, Task, available_tasks, get_task, register_task
from .trainer import Trainer

__all__ = [
    "load_config",
    "Task",
    "ClassificationTask",
    "register_task",
    "get_task",
    "available_tasks",
    "Trainer",
]
