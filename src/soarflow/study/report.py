"""Aggregate a study's cell records into results.json, per_image.npz, report.md and plots.

For every budget arm (``steps``: equal optimizer steps; ``seconds``: equal training wall-clock) and every
evaluation setting: mean ± std over seeds of each metric, and for each interval metric (per image: overall,
reward; per prompt: diversity; kind loss: fm_loss) an interval for each row's difference to the reference row
(SFT), to the base and to its contrasts, with seeds and prompts as crossed random effects
(:mod:`soarflow.study.stats`). The study's primary contrast (``primary:``) leads the report with its p-value and
minimum detectable effect; every other interval is exploratory (unadjusted 95%) with a Holm-adjusted p-value
over the report's family of comparisons. FD and the exposure gap have no per-prompt decomposition here: they
are descriptive (mean ± std over seeds), with no interval and no ordering claim.

All intervals are computed from the compact per-image store (:func:`collect_per_image`: pass/fail as uint8,
rewards and diversities as float16), which is written next to results.json as ``per_image.npz``; :func:`rebuild`
recomputes every interval of a report from it (``soarflow study-report``), with the same numbers.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from .spec import BASE_ROW, INTERVAL_METRICS, StudySpec, setting_key
from .stats import DiffCI, cluster_bootstrap, cluster_means, crossed_diff, holm, mean_std

SCALARS = {
    "shapes": ["overall", "reward", "seen", "held_out", "frechet_distance", "diversity", "exposure_gap"],
    "loss": ["fm_loss", "exposure_gap"],
}
PER_IMAGE = {"shapes": ["overall", "reward"], "loss": ["fm_loss"]}
PER_PROMPT = {"shapes": ["diversity"], "loss": []}
DESCRIPTIVE = {"shapes": ["frechet_distance", "exposure_gap"], "loss": ["exposure_gap"]}
DTYPES = {"overall": np.uint8, "reward": np.float16, "diversity": np.float16, "fm_loss": np.float32}
COST = ["step", "train_seconds", "forwards_per_step", "sample_forwards_per_image"]
PER_IMAGE_FILE = "per_image.npz"
STORE_FORMAT = 1


def headline_setting(spec: StudySpec) -> str:
    return setting_key(spec.evaluation.num_steps[-1], spec.evaluation.guidance_scales[-1])


def primary_metric(spec: StudySpec) -> str:
    return spec.primary.metric if spec.primary and spec.primary.metric else INTERVAL_METRICS[spec.evaluation.kind][0]


# ---------------------------------------------------------------------------------------------- per-image store
def _groups(spec: StudySpec, num_images: int) -> np.ndarray:
    """Image i -> its prompt (cluster): i // images_per_prompt for shapes; every sample its own for kind loss."""
    if spec.evaluation.kind == "loss":
        return np.arange(num_images, dtype=np.int32)
    m = spec.evaluation.images_per_prompt
    if num_images % m:
        raise ValueError(f"{num_images} images is not a multiple of images_per_prompt {m}")
    return (np.arange(num_images) // m).astype(np.int32)


def _quantize(metric: str, values: list) -> np.ndarray:
    x = np.asarray(values, dtype=np.float64)
    if metric == "overall" and not np.isin(x, (0.0, 1.0)).all():
        raise ValueError("per-image 'overall' must be pass/fail (0 or 1)")
    return x.astype(DTYPES[metric])


def collect_per_image(spec: StudySpec, records: list[dict]) -> dict[str, Any]:
    """The compact per-image store of finished cells: {"kind", "groups": (N,) prompt ids, "entries": {(arm,
    setting, row): {"seeds": [...], metric: (S, N) or (S, P) array}}}. A per-prompt metric is kept only when
    every cell of the entry recorded it (cells cached before it existed did not)."""
    kind = spec.evaluation.kind
    by_row: dict[str, list[dict]] = {}
    for r in records:
        if r.get("status") == "ok":
            by_row.setdefault(r["row"], []).append(r)
    entries: dict[tuple[str, str, str], dict] = {}
    groups = None
    for row in spec.row_names():
        cells = sorted(by_row.get(row, []), key=lambda r: r["seed"] or 0)
        for arm in spec.budget.arms:
            arm_cells = [r for r in cells if arm in r["arms"]]
            if not arm_cells:
                continue
            for n, w in spec.evaluation.settings:
                key = setting_key(n, w)
                ms = [r["arms"][arm]["metrics"][key] for r in arm_cells]
                entry: dict[str, Any] = {"seeds": [r["seed"] for r in arm_cells]}
                for m in PER_IMAGE[kind]:
                    entry[m] = _quantize(m, [x["per_image"][m] for x in ms])
                for m in PER_PROMPT[kind]:
                    if all(m in (x.get("per_prompt") or {}) for x in ms):
                        entry[m] = _quantize(m, [x["per_prompt"][m] for x in ms])
                n_img = entry[PER_IMAGE[kind][0]].shape[1]
                groups = _groups(spec, n_img) if groups is None else groups
                if groups.shape[0] != n_img:
                    raise ValueError(f"row {row} {arm} {key}: {n_img} images, other entries {groups.shape[0]}")
                entries[(arm, key, row)] = entry
    return {
        "format": STORE_FORMAT,
        "kind": kind,
        "groups": groups if groups is not None else np.zeros(0, np.int32),
        "entries": entries,
    }


def save_per_image(store: dict[str, Any], path: Path) -> None:
    """per_image.npz: ``manifest`` (JSON as uint8 bytes: format, kind, entries [{arm, setting, row, seeds,
    metrics}]), ``groups`` (N,) int32, and ``<i>.<metric>`` arrays for entry i (overall uint8 (S, N); reward
    float16 (S, N); diversity float16 (S, P); fm_loss float32 (S, N))."""
    manifest = {"format": store["format"], "kind": store["kind"], "entries": []}
    arrays: dict[str, np.ndarray] = {"groups": np.asarray(store["groups"], dtype=np.int32)}
    for i, ((arm, key, row), entry) in enumerate(store["entries"].items()):
        metrics = [m for m in entry if m != "seeds"]
        manifest["entries"].append(
            {"arm": arm, "setting": key, "row": row, "seeds": entry["seeds"], "metrics": metrics}
        )
        for m in metrics:
            arrays[f"{i}.{m}"] = entry[m]
    arrays["manifest"] = np.frombuffer(json.dumps(manifest).encode(), dtype=np.uint8)
    np.savez_compressed(path, **arrays)


def load_per_image(path: Path) -> dict[str, Any]:
    if not Path(path).is_file():
        raise FileNotFoundError(
            f"no per-image data: {path} (reports made before per_image.npz existed cannot be rebuilt; rerun the study)"
        )
    with np.load(path, allow_pickle=False) as z:
        manifest = json.loads(z["manifest"].tobytes().decode())
        if manifest.get("format") != STORE_FORMAT:
            raise ValueError(f"{path}: per-image format {manifest.get('format')!r}, expected {STORE_FORMAT}")
        entries = {}
        for i, e in enumerate(manifest["entries"]):
            entries[(e["arm"], e["setting"], e["row"])] = {
                "seeds": e["seeds"],
                **{m: z[f"{i}.{m}"] for m in e["metrics"]},
            }
        return {"format": manifest["format"], "kind": manifest["kind"], "groups": z["groups"], "entries": entries}


# ---------------------------------------------------------------------------------------------- intervals
def _tables(entry: dict, metric: str, groups: np.ndarray) -> np.ndarray:
    x = entry[metric].astype(np.float64)
    return x if metric in PER_PROMPT["shapes"] else cluster_means(x, groups)


def compare(a: dict, b: dict, metric: str, groups: np.ndarray) -> DiffCI | None:
    """Row a minus row b on `metric` (None when either lacks it); seeds paired when the seed lists are equal."""
    if metric not in a or metric not in b:
        return None
    return crossed_diff(_tables(a, metric, groups), _tables(b, metric, groups), paired=a["seeds"] == b["seeds"])


def intervals(spec: StudySpec, summary: dict, store: dict, num_resamples: int = 2000) -> dict[str, Any]:
    """Fill every row's ``compare`` in `summary` (to the reference, the base, its contrasts and the primary's
    `against`) from the per-image store, Holm-adjust all but the primary, and return the primary's record. The
    family counts each comparison once: A vs B and B vs A (e.g. SFT vs base and base vs SFT) share one p_holm."""
    kind = spec.evaluation.kind
    groups = store["groups"]
    metrics = INTERVAL_METRICS[kind]
    pr = spec.primary
    p_metric = primary_metric(spec)
    family: dict[tuple, list[dict]] = {}  # one comparison (either direction) -> its interval dicts
    primary_key = (pr.arm, pr.setting, frozenset((pr.row, pr.against)), p_metric) if pr else None
    primary_ci: dict | None = None
    for arm, settings in summary.items():
        for key, table in settings.items():
            for row, entry in table.items():
                entry["compare"] = {}
                refs = [spec.reference, BASE_ROW, *(b for a, b in spec.contrasts if a == row)]
                if pr and pr.row == row:
                    refs.append(pr.against)
                for ref in refs:
                    if ref is None or ref == row or ref not in table or ref in entry["compare"]:
                        continue
                    a, b = store["entries"].get((arm, key, row)), store["entries"].get((arm, key, ref))
                    if a is None or b is None:
                        continue
                    out = {}
                    for m in metrics:
                        ci = compare(a, b, m, groups)
                        if ci is None:
                            continue
                        out[m] = ci.to_dict()
                        if pr and (arm, key, row, ref, m) == (pr.arm, pr.setting, pr.row, pr.against, p_metric):
                            primary_ci = out[m]
                        elif (arm, key, frozenset((row, ref)), m) != primary_key:  # not the primary reversed
                            family.setdefault((arm, key, frozenset((row, ref)), m), []).append(out[m])
                    entry["compare"][ref] = out
    groups_ = list(family.values())
    for same, p in zip(groups_, holm([g[0]["p"] for g in groups_])):
        for d in same:  # A vs B and B vs A: one comparison, the same p
            d["p_holm"] = p
    record: dict[str, Any] = {"declared": pr is not None, "family_size": len(family)}
    if pr is not None:
        record.update(row=pr.row, against=pr.against, setting=pr.setting, arm=pr.arm, metric=p_metric)
    if primary_ci is not None:
        ci = DiffCI(**{k: primary_ci[k] for k in DiffCI.__dataclass_fields__})
        a = store["entries"][(pr.arm, pr.setting, pr.row)]
        b = store["entries"][(pr.arm, pr.setting, pr.against)]
        boot = cluster_bootstrap(
            _tables(a, p_metric, groups),
            _tables(b, p_metric, groups),
            paired=a["seeds"] == b["seeds"],
            num_resamples=num_resamples,
        )
        record.update(interval=primary_ci, mde_80=ci.mde(0.8), bootstrap=boot.to_dict())
    return record


def aggregate(spec: StudySpec, records: list[dict], num_resamples: int = 2000) -> dict[str, Any]:
    """results.json's content; the per-image store it was computed from is under ``_per_image`` (the caller
    saves it with :func:`save_per_image` and removes the key before writing JSON)."""
    kind = spec.evaluation.kind
    ok = [r for r in records if r.get("status") == "ok"]
    rows = spec.row_names()
    by_row = {row: sorted([r for r in ok if r["row"] == row], key=lambda r: r["seed"] or 0) for row in rows}
    summary: dict[str, Any] = {}
    for arm in spec.budget.arms:
        summary[arm] = {}
        for n, w in spec.evaluation.settings:
            key = setting_key(n, w)
            table: dict[str, Any] = {}
            for row in rows:
                cells = [r for r in by_row[row] if arm in r["arms"]]
                if not cells:
                    continue
                ms = [r["arms"][arm]["metrics"][key] for r in cells]
                entry: dict[str, Any] = {"seeds": [r["seed"] for r in cells]}
                for m in SCALARS[kind]:
                    vals = [x[m] for x in ms if x.get(m) is not None]
                    entry[m] = dict(zip(("mean", "std"), mean_std(vals))) if vals else None
                for c in COST:
                    entry[c] = dict(zip(("mean", "std"), mean_std([r["arms"][arm][c] for r in cells])))
                if "per_family" in ms[0]:
                    entry["per_family"] = {
                        f: dict(zip(("mean", "std"), mean_std([x["per_family"][f] for x in ms])))
                        for f in ms[0]["per_family"]
                    }
                bins = ms[0]["exposure_bins"]
                entry["exposure_bins"] = [
                    {
                        "sigma_low": b["sigma_low"],
                        "sigma_high": b["sigma_high"],
                        **dict(
                            zip(
                                ("mean", "std"),
                                mean_std([x["exposure_bins"][i]["gap"] for x in ms if i < len(x["exposure_bins"])]),
                            )
                        ),
                    }
                    for i, b in enumerate(bins)
                ]
                table[row] = entry
            summary[arm][key] = table
    store = collect_per_image(spec, records)
    primary = intervals(spec, summary, store, num_resamples)
    curves = {row: [{"seed": r["seed"], "points": r.get("curve", [])} for r in by_row[row]] for row in rows}
    failed = [
        {"row": r["row"], "seed": r["seed"], "hash": r["hash"], "error": r.get("error")}
        for r in records
        if r.get("status") == "failed"
    ]
    return {
        "primary": primary,
        "statistics": statistics_record(spec),
        "summary": summary,
        "curves": curves,
        "failed": failed,
        "cells": [
            {k: r.get(k) for k in ("row", "seed", "hash", "status", "wall_seconds", "steps_trained")} for r in records
        ],
        "_per_image": store,
    }


def statistics_record(spec: StudySpec) -> dict[str, Any]:
    kind = spec.evaluation.kind
    return {
        "method": "crossed random effects of seeds and prompts (method of moments, Satterthwaite df); "
        "docs/study.md#statistics",
        "confidence": 0.95,
        "interval_metrics": INTERVAL_METRICS[kind],
        "descriptive_only": DESCRIPTIVE[kind],
        "secondary": "exploratory: unadjusted 95% intervals, Holm-adjusted p-values (p_holm) over the family",
        "per_image": PER_IMAGE_FILE,
    }


def rebuild(spec: StudySpec, folder: Path, num_resamples: int = 2000) -> dict[str, Any]:
    """Recompute every interval of the report in `folder` from its per_image.npz (results.json's scalars kept)."""
    folder = Path(folder)
    path = folder / "results.json"
    if not path.is_file():
        raise FileNotFoundError(f"no results.json in {folder}")
    results = json.loads(path.read_text())
    store = load_per_image(folder / PER_IMAGE_FILE)
    if store["kind"] != spec.evaluation.kind:
        raise ValueError(
            f"{folder}: per-image data of kind {store['kind']!r}, the study file's is {spec.evaluation.kind!r}"
        )
    results["primary"] = intervals(spec, results["summary"], store, num_resamples)
    results["statistics"] = statistics_record(spec)
    return results


# ---------------------------------------------------------------------------------------------- markdown
def _ms(x: dict | None, fmt: str = "{:.3f}") -> str:
    if x is None or x.get("mean") is None or np.isnan(x["mean"]):
        return "-"
    return f"{fmt.format(x['mean'])} ± {fmt.format(x['std'])}"


def _ci(c: dict | None) -> str:
    """A secondary interval: difference [unadjusted 95% interval], Holm-adjusted p; bold when p_Holm < 0.05."""
    if c is None:
        return "-"
    text = f"{c['diff']:+.3f} [{c['low']:+.3f}, {c['high']:+.3f}]"
    if c.get("p_holm") is None:
        return text
    text += f" p_H {c['p_holm']:.2g}"
    return f"**{text}**" if c["p_holm"] < 0.05 else text


def _p(p: float) -> str:
    return "< 0.001" if p < 0.001 else f"{p:.3f}"


def primary_lines(spec: StudySpec, results: dict) -> list[str]:
    pr = results.get("primary") or {}
    if not pr.get("declared"):
        return [
            "## Primary contrast",
            "",
            "None declared (`primary:` in the study file): every interval below is exploratory.",
            "",
        ]
    head = f"`{pr['row']}` minus `{pr['against']}`, {pr['metric']}, {_arm_title(spec, pr['arm'])}, {pr['setting']}"
    ci = pr.get("interval")
    if ci is None:
        return [
            "## Primary contrast",
            "",
            f"{head}: not evaluated in this run (a row filtered out by --only or --quick, or no finished cells).",
            "",
        ]
    verdict = "contains 0" if ci["within_noise"] else "excludes 0"
    boot = pr.get("bootstrap")
    return [
        "## Primary contrast",
        "",
        f"{head}:",
        "",
        f"**{ci['diff']:+.3f} [{ci['low']:+.3f}, {ci['high']:+.3f}]** (95% interval, {verdict}), "
        f"p = {_p(ci['p'])}; SE {ci['se']:.4f}, {ci['df']:.1f} df ({ci['method']}).",
        "",
        f"Minimum detectable effect at 80% power (two-sided 5%), from this contrast's own variance: "
        f"**{pr['mde_80']:.3f}**.",
        "",
        *(
            [
                "One training seed: the seed component of the variance cannot be estimated, so this interval and "
                "MDE cover the sampling of prompts and noise only; they understate the uncertainty about another "
                "training run.",
                "",
            ]
            if len(spec.seeds) < 2
            else []
        ),
        *(
            [
                f"Cross-check, prompt-cluster bootstrap ({boot['num_resamples']} resamples, seed level corrected by "
                f"S/(S-1)): [{boot['low']:+.3f}, {boot['high']:+.3f}]."
            ]
            if boot
            else []
        ),
        "",
    ]


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def _arm_title(spec: StudySpec, arm: str) -> str:
    return "equal optimizer steps" if arm == "steps" else f"equal training wall-clock ({spec.budget.seconds} s)"


def markdown(spec: StudySpec, results: dict, command: str, machine: str, wall_seconds: float) -> str:
    kind = spec.evaluation.kind
    lead = PER_IMAGE[kind][0]
    ref = spec.reference
    lines = (
        [
            f"# Study `{spec.name}`",
            "",
            f"- command: `{command}`",
            f"- machine: {machine}",
            f"- wall-clock of this invocation: {wall_seconds:.0f} s; of all its cells (each measured when it ran): "
            f"{sum(c.get('wall_seconds') or 0 for c in results.get('cells', [])) / 60:.0f} min",
            *(
                [
                    f"- **interim report**: seeds {spec.seeds} of the {len(spec.declared_seeds)} the study declares "
                    f"({spec.declared_seeds}); its intervals and MDE are those of this subset, not of the study as "
                    "declared"
                ]
                if spec.interim
                else []
            ),
            f"- seeds: {spec.seeds}; budget: steps {spec.budget.steps}, seconds {spec.budget.seconds} "
            f"(cap {spec.budget.max_steps} steps); evaluation: {kind}, settings "
            + ", ".join(setting_key(n, w) for n, w in spec.evaluation.settings),
            *[
                f"- row `{r.name}` starts from row `{r.init_from_row}`'s weights at its {r.init_from_arm}-arm evaluation "
                f"(same seed): that stage's budget comes on top of this row's"
                for r in spec.rows
                if r.init_from_row
            ],
            "",
            "",
        ]
        + primary_lines(spec, results)
        + [
            "## Secondary comparisons (exploratory)",
            "",
            "Values are mean ± std over seeds. Δ columns: difference of the row to the reference / the base with its "
            "unadjusted 95% interval (seeds and prompts as crossed random effects: images paired by prompt and "
            "noise, seeds paired when both rows share them; docs/study.md) and its Holm-adjusted p-value p_H over "
            f"the report's {results.get('primary', {}).get('family_size', 0)} secondary comparisons; **bold**: "
            "p_H < 0.05. The intervals are exploratory. "
            + (
                "FD and the exposure gap are descriptive (no interval): no ordering claims about them. "
                if kind == "shapes"
                else "The exposure gap is descriptive (no interval). "
            ),
            "",
        ]
    )
    for arm, settings in results["summary"].items():
        arm_title = _arm_title(spec, arm)
        for key, table in settings.items():
            lines += [f"## {arm_title}: {key}", ""]
            header = ["row", "n", lead]
            if ref:
                header.append(f"Δ {lead} vs {ref}")
            header.append(f"Δ {lead} vs base")
            others = [m for m in SCALARS[kind] if m != lead]
            header += [f"{m} (no CI)" if m in DESCRIPTIVE[kind] else m for m in others] + [
                "steps",
                "train s",
                "fwd calls/step",
                "sample fwd/image",
            ]
            body = []
            for row, e in table.items():
                r = [row, str(len(e["seeds"])), _ms(e[lead])]
                if ref:
                    r.append(_ci(e["compare"].get(ref, {}).get(lead)))
                r.append(_ci(e["compare"].get(BASE_ROW, {}).get(lead)))
                r += [_ms(e[m], "{:.2f}" if m == "frechet_distance" else "{:.3f}") for m in others]
                r += [
                    _ms(e["step"], "{:.0f}"),
                    _ms(e["train_seconds"], "{:.1f}"),
                    _ms(e["forwards_per_step"], "{:.1f}"),
                    _ms(e["sample_forwards_per_image"], "{:.1f}"),
                ]
                body.append(r)
            lines += _table(header, body) + [""]
            if kind == "shapes":
                sub = [
                    [row]
                    + [
                        c
                        for m in ("reward", "diversity")
                        for c in (
                            _ci(e["compare"].get(ref, {}).get(m)) if ref else "-",
                            _ci(e["compare"].get(BASE_ROW, {}).get(m)),
                        )
                    ]
                    for row, e in table.items()
                ]
                lines += (
                    [f"Reward and diversity differences ({key}):", ""]
                    + _table(
                        [
                            "row",
                            f"Δ reward vs {ref}",
                            "Δ reward vs base",
                            f"Δ diversity vs {ref}",
                            "Δ diversity vs base",
                        ],
                        sub,
                    )
                    + [""]
                )
    if spec.contrasts:
        lines += [
            "## Contrasts",
            "",
            "Each pair's difference (row minus against): unadjusted 95% interval, "
            "Holm-adjusted p (exploratory, as above).",
            "",
        ]
        metrics = INTERVAL_METRICS[kind]
        for arm, settings in results["summary"].items():
            arm_title = _arm_title(spec, arm)
            body = [
                [a, b, m] + [_ci(table.get(a, {}).get("compare", {}).get(b, {}).get(m)) for table in settings.values()]
                for a, b in spec.contrasts
                for m in metrics
            ]
            lines += [f"### {arm_title}", ""] + _table(["row", "against", "metric", *settings], body) + [""]
    head = headline_setting(spec)
    for arm, settings in results["summary"].items():
        table = settings.get(head, {})
        if kind == "shapes" and table:
            fams = list(next(iter(table.values()))["per_family"])
            lines += [f"## Per family ({arm}, {head})", ""]
            lines += _table(
                ["row"] + fams, [[row] + [_ms(e["per_family"][f]) for f in fams] for row, e in table.items()]
            )
            lines += [""]
        if table:
            bins = next(iter(table.values()))["exposure_bins"]
            lines += [f"## Exposure gap per sigma bin ({arm}, {head})", ""]
            lines += _table(
                ["row"] + [f"({b['sigma_low']:.2f}, {b['sigma_high']:.2f}]" for b in bins],
                [[row] + [_ms(b, "{:.4f}") for b in e["exposure_bins"]] for row, e in table.items()],
            )
            lines += [""]
    if results["failed"]:
        lines += (
            ["## Failed cells", ""]
            + [f"- {f['row']} seed {f['seed']} ({f['hash']}): {f['error']}" for f in results["failed"]]
            + [""]
        )
    lines += ["Plots: " + ", ".join(f"![{p}]({p})" for p in results.get("plots", [])), ""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- plots
def plots(spec: StudySpec, results: dict, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kind = spec.evaluation.kind
    lead = PER_IMAGE[kind][0]
    head = headline_setting(spec)
    written = []
    rows = spec.row_names()
    colors = {row: plt.cm.tab20(i % 20) for i, row in enumerate(rows)}
    for arm, settings in results["summary"].items():
        table = settings.get(head, {})
        if not table:
            continue
        if kind == "shapes":
            fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
            for ax, other in zip(axes, ("frechet_distance", "diversity")):
                for row, e in table.items():
                    ax.errorbar(
                        e[other]["mean"],
                        e[lead]["mean"],
                        xerr=e[other]["std"],
                        yerr=e[lead]["std"],
                        fmt="o",
                        capsize=3,
                        color=colors[row],
                        label=row,
                    )
                ax.set_xlabel(other.replace("_", " ") + (" (lower is better)" if other == "frechet_distance" else ""))
                ax.set_ylabel(f"ShapesEval {lead}")
                ax.set_title(f"alignment vs {other.replace('_', ' ')} ({arm}, {head})")
            axes[1].legend(fontsize=7, loc="best")
            fig.tight_layout()
            name = f"pareto_{arm}.png"
            fig.savefig(out / name, dpi=100)
            plt.close(fig)
            written.append(name)

            fams = list(next(iter(table.values()))["per_family"])
            fig, ax = plt.subplots(figsize=(12, 4))
            width = 0.8 / max(len(table), 1)
            for i, (row, e) in enumerate(table.items()):
                xs = [j + (i - (len(table) - 1) / 2) * width for j in range(len(fams))]
                ax.bar(
                    xs,
                    [e["per_family"][f]["mean"] for f in fams],
                    width,
                    yerr=[e["per_family"][f]["std"] for f in fams],
                    color=colors[row],
                    label=row,
                )
            ax.set_xticks(range(len(fams)), fams, rotation=20)
            ax.set_ylabel("accuracy")
            ax.set_title(f"ShapesEval per family ({arm}, {head})")
            ax.legend(fontsize=7, ncol=2)
            fig.tight_layout()
            name = f"families_{arm}.png"
            fig.savefig(out / name, dpi=100)
            plt.close(fig)
            written.append(name)

        fig, ax = plt.subplots(figsize=(7, 4))
        for row, e in table.items():
            mids = [(b["sigma_low"] + b["sigma_high"]) / 2 for b in e["exposure_bins"]]
            ax.errorbar(
                mids,
                [b["mean"] for b in e["exposure_bins"]],
                yerr=[b["std"] for b in e["exposure_bins"]],
                marker="o",
                capsize=3,
                color=colors[row],
                label=row,
            )
        ax.set_xlabel("sigma")
        ax.set_ylabel("exposure gap (own-state minus ideal x0 error)")
        ax.set_title(f"exposure gap per sigma bin ({arm}, {head})")
        ax.legend(fontsize=7)
        fig.tight_layout()
        name = f"exposure_{arm}.png"
        fig.savefig(out / name, dpi=100)
        plt.close(fig)
        written.append(name)

    if any(c["points"] for cs in results["curves"].values() for c in cs):
        fig, ax = plt.subplots(figsize=(7, 4))
        for row, cs in results["curves"].items():
            for i, c in enumerate(cs):
                if c["points"]:
                    ax.plot(
                        [p["train_seconds"] for p in c["points"]],
                        [p["value"] for p in c["points"]],
                        marker=".",
                        color=colors[row],
                        alpha=0.8,
                        label=row if i == 0 else None,
                    )
        ev = spec.evaluation
        ax.set_xlabel("training wall-clock (s, evaluation excluded)")
        ax.set_ylabel("ShapesEval overall (curve set)" if kind == "shapes" else "flow-matching loss")
        ax.set_title(
            f"score vs wall-clock ({ev.curve_num_steps} steps, guidance {ev.curve_guidance_scale:g}, "
            f"every {ev.every_steps} steps)"
        )
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "curves.png", dpi=100)
        plt.close(fig)
        written.append("curves.png")
    return written
