"""`soarflow study`: run a declared grid of training cells (methods x settings x seeds) from one base, cache each
cell by its config hash, evaluate at equal steps and equal wall-clock, and report with paired bootstrap CIs.
See docs/study.md."""

from .spec import Budget, Cell, EvalSpec, Row, StudySpec, expand_cells, load_study
from .stats import DiffCI, mean_std, paired_bootstrap

__all__ = ["Budget", "Cell", "DiffCI", "EvalSpec", "Row", "StudySpec", "expand_cells", "load_study", "mean_std",
           "paired_bootstrap"]
