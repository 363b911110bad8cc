"""`soarflow study`: run a declared grid of training cells (methods x settings x seeds) from one base, cache each
cell by its config hash, evaluate at equal steps and equal wall-clock, and report intervals with seeds and prompts
as crossed random effects (primary contrast first, the rest Holm-adjusted). See docs/study.md."""

from .spec import Budget, Cell, EvalSpec, Row, StudySpec, expand_cells, load_study
from .stats import DiffCI, cluster_bootstrap, crossed_diff, diff_interval, holm, mean_std

__all__ = [
    "Budget",
    "Cell",
    "DiffCI",
    "EvalSpec",
    "Row",
    "StudySpec",
    "cluster_bootstrap",
    "crossed_diff",
    "diff_interval",
    "expand_cells",
    "holm",
    "load_study",
    "mean_std",
]
