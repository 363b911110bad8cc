"""A cell's identity must survive new training-config keys: committed cells are a cache across sessions."""

from pathlib import Path

from soarflow.study.spec import NEUTRAL_LATER_KEYS, expand_cells, identity_config, load_study

CONFIGS = Path(__file__).resolve().parents[2] / "configs"

# Hashes of configs/study_headroom.yaml's cells as first computed (committed in docs/results/study_headroom/cells).
# A new config key changes them unless NEUTRAL_LATER_KEYS names its neutral value: add it there, never here.
PINNED = {("base", None): "2c05521ee4e08924", ("sft", 0): "26493d3adbb712fd", ("sft", 1): "9095128531dedd8c"}


def test_cell_hashes_stay_pinned_when_keys_are_added():
    cells = {(c.row, c.seed): c.hash for c in expand_cells(load_study(CONFIGS / "study_headroom.yaml"))}
    for key, expected in PINNED.items():
        assert cells[key] == expected, f"cell {key} changed hash: a new config key needs NEUTRAL_LATER_KEYS"


def test_neutral_keys_leave_the_identity_and_other_values_stay():
    config = {"seed": 0, "soar": {"reuse_main_output": "auto"}, **NEUTRAL_LATER_KEYS}
    assert identity_config(config) == {"seed": 0, "soar": {"reuse_main_output": True}}
    other = {**config, "ema_device": "cpu"}
    assert identity_config(other)["ema_device"] == "cpu"
    assert config["soar"]["reuse_main_output"] == "auto"  # the input is not modified
