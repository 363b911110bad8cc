"""Tasks: what the trainer needs from one model family (the `Task` base class in `base`), one module per family
(`shapes`: the embedded model on ShapesEval; `sd3`, `flux`: diffusers pipelines, sharing `diffusers`) and the
name -> class `registry` (`TrainConfig.task`). Family modules are imported only when their task is built."""

from .base import Task
from .registry import TASKS, build_task, get_task_class

__all__ = ["TASKS", "Task", "build_task", "get_task_class"]
