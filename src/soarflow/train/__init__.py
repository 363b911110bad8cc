"""Training: config (YAML + CLI overrides), the accelerate training loop, checkpoints, EMA (`Task` and the task
registry live in `soarflow.tasks`, re-exported here).

    from soarflow.train import TrainConfig, load_config, train, TrainResult
    cfg = load_config("configs/shapes_soar.yaml", ["--soar.num_aux", "4"])
    result = train(cfg)             # task from the registry, model = task.build_model()
"""

from .config import TrainConfig, from_dict, load_config
from ..tasks.base import Task
from ..tasks.registry import TASKS, build_task, get_task_class
from .trainer import TrainResult, train

__all__ = [
    "TrainConfig",
    "TrainResult",
    "Task",
    "TASKS",
    "build_task",
    "from_dict",
    "get_task_class",
    "load_config",
    "train",
]
