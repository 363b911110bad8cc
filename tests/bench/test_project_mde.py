"""bench/project_mde.py: at a folder's own numbers of seeds and prompts, the projection is the study's interval."""

import runpy
from pathlib import Path

import numpy as np
import pytest

from soarflow.study.stats import crossed_diff

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "project_mde.py"
REPLAY = ROOT / "docs" / "results" / "study_headroom_replay"


def test_projection_at_the_folders_own_size_is_its_crossed_interval():
    mod = runpy.run_path(str(SCRIPT))
    x = mod["paired_table"](REPLAY, "sft_replay", "sft", "overall", "steps", "steps40_cfg4")
    seeds, prompts = x.shape
    se, df, mde = mod["mde"](*mod["components"](x), seeds, prompts)
    ci = crossed_diff(x, np.zeros_like(x), paired=True)  # the paired interval of the same differences
    assert (seeds, prompts) == (3, 96)
    assert se == pytest.approx(ci.se, rel=1e-9) and df == pytest.approx(ci.df, rel=1e-9)
    assert mde == pytest.approx(ci.mde(), rel=1e-9)
    # more seeds shrink it; a one-seed folder needs a borrowed seed component
    assert mod["mde"](*mod["components"](x), 10, prompts)[2] < mde
    with pytest.raises(SystemExit, match="one seed"):
        mod["components"](x[:1])
