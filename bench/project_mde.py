"""Project a paired contrast's minimum detectable effect (80% power, two-sided 5%) to other numbers of seeds.

From a study folder's per_image.npz: the paired difference X = A - B per (seed, prompt) and its variance
components (seed, prompt, residual; method of moments, as soarflow.study.stats), then for S seeds and P prompts

    Var(D) = s_seed^2 / S + s_prompt^2 / P + s_resid^2 / (S P),   MDE = (t_{df, .975} + t_{df, .8}) SE,

with Satterthwaite degrees of freedom over the three mean squares. A folder with one seed cannot separate the
seed component, nor the prompt from the residual one: `--borrow FOLDER A B` takes the seed standard deviation and
the prompt / residual split from another study's contrast, and keeps this folder's total per-prompt variance.

    python bench/project_mde.py docs/results/study_headroom_replay sft_replay sft
    python bench/project_mde.py docs/results/study_claim_powered soar sft_noise_matched \\
        --borrow docs/results/study_headroom_replay sft_replay sft
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from soarflow.study.report import PER_IMAGE_FILE, _tables, load_per_image
from soarflow.study.stats import _anova, t_ppf


def paired_table(folder: Path, row: str, against: str, metric: str, arm: str, setting: str) -> np.ndarray:
    store = load_per_image(Path(folder) / PER_IMAGE_FILE)
    entries = store["entries"]
    try:
        a, b = entries[(arm, setting, row)], entries[(arm, setting, against)]
    except KeyError as err:
        rows = sorted({k[2] for k in entries})
        raise SystemExit(f"{folder}: no {err} for arm {arm}, setting {setting} (rows: {rows})") from None
    if a["seeds"] != b["seeds"]:
        raise SystemExit(f"{folder}: {row} and {against} have different seeds ({a['seeds']}, {b['seeds']})")
    return _tables(a, metric, store["groups"]) - _tables(b, metric, store["groups"])


def components(x: np.ndarray) -> tuple[float, float, float]:
    """(seed, prompt, residual) variances of an (S, P) table of paired differences, clamped at 0."""
    s, p = x.shape
    if s < 2:
        raise SystemExit("one seed: pass --borrow to take the seed component from another study")
    ms_seed, ms_prompt, ms_resid = _anova(x)
    return max(0.0, (ms_seed - ms_resid) / p), max(0.0, (ms_prompt - ms_resid) / s), ms_resid


def mde(var_seed: float, var_prompt: float, var_resid: float, seeds: int, prompts: int) -> tuple[float, float, float]:
    """(SE, df, MDE at 80% power) for `seeds` x `prompts`."""
    terms = [  # c_k MS_k with their degrees of freedom
        ((prompts * var_seed + var_resid) / (seeds * prompts), seeds - 1),
        ((seeds * var_prompt + var_resid) / (seeds * prompts), prompts - 1),
        (-var_resid / (seeds * prompts), (seeds - 1) * (prompts - 1)),
    ]
    var = sum(v for v, _ in terms)
    df = var * var / sum(v * v / d for v, d in terms if d > 0)
    se = var**0.5
    return se, df, (t_ppf(0.975, df) + t_ppf(0.8, df)) * se


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder")
    ap.add_argument("row")
    ap.add_argument("against")
    ap.add_argument("--metric", default="overall")
    ap.add_argument("--arm", default="steps")
    ap.add_argument("--setting", default="steps40_cfg4")
    ap.add_argument("--borrow", nargs=3, metavar=("FOLDER", "ROW", "AGAINST"))
    ap.add_argument("--seeds", type=int, nargs="+", default=[3, 5, 8, 10, 15])
    ap.add_argument("--prompts", type=int, nargs="+", help="default: the folder's number of prompts")
    args = ap.parse_args()

    x = paired_table(Path(args.folder), args.row, args.against, args.metric, args.arm, args.setting)
    if args.borrow:
        seed, prompt, resid = components(paired_table(Path(args.borrow[0]), *args.borrow[1:], args.metric, args.arm,
                                                      args.setting))  # fmt: skip
        total = float(x.var(axis=1, ddof=1).mean())  # per-prompt variance within a seed: prompt + residual
        share = prompt / (prompt + resid)  # the borrowed split of this folder's per-prompt variance
        var_seed, var_prompt, var_resid = seed, share * total, (1 - share) * total
        source = f"seed sd and prompt share from {args.borrow[0]} ({args.borrow[1]} - {args.borrow[2]})"
    else:
        var_seed, var_prompt, var_resid = components(x)
        source = "this folder's own components"
    print(
        f"{args.folder}: {args.row} - {args.against}, {args.metric}, {args.arm}, {args.setting}: "
        f"{x.shape[0]} seed(s) x {x.shape[1]} prompts, difference {x.mean():+.3f}"
    )
    print(f"sd seed {var_seed**0.5:.4f}, prompt {var_prompt**0.5:.4f}, residual {var_resid**0.5:.4f} ({source})")
    for p in args.prompts or [x.shape[1]]:
        for s in args.seeds:
            se, df, m = mde(var_seed, var_prompt, var_resid, s, p)
            print(f"  {s:3d} seeds x {p} prompts: SE {se:.4f}, df {df:.1f}, MDE {m:.3f}")


if __name__ == "__main__":
    main()
