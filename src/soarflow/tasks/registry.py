"""Task registry: `TrainConfig.task` name -> Task class, imported lazily (sd3/flux pull in diffusers models)."""

from __future__ import annotations

import importlib
from typing import Any

from .base import Task

TASKS: dict[str, str] = {
    "shapes": "soarflow.tasks.shapes:ShapesTask",
    "sd3": "soarflow.tasks.sd3:SD3Task",
    "flux": "soarflow.tasks.flux:FluxTask",
}


def get_task_class(name: str) -> type[Task]:
    """The Task class for a registered name, or for an explicit 'package.module:ClassName'."""
    if name in TASKS:
        target = TASKS[name]
    elif ":" in name:
        target = name
    else:
        raise ValueError(
            f"config key 'task': unknown task {name!r}; choose one of {', '.join(TASKS)} "
            "or give 'package.module:TaskClass'"
        )
    module_name, _, class_name = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"task {name!r}: could not import {module_name} ({err})") from err
    if not hasattr(module, class_name):
        raise ValueError(f"task {name!r}: module {module_name} has no class {class_name}")
    cls = getattr(module, class_name)
    if not (isinstance(cls, type) and issubclass(cls, Task)):
        raise ValueError(
            f"task {name!r}: {target} is not a subclass of soarflow.tasks.Task (the trainer calls its "
            "whole contract: from_config, build_model, ... and the hooks with defaults)"
        )
    return cls


def build_task(config: Any) -> Task:
    """`TaskClass.from_config(model=config.model, data=config.data, train_config=config)`."""
    cls = get_task_class(config.task)
    return cls.from_config(model=dict(config.model), data=dict(config.data), train_config=config)
