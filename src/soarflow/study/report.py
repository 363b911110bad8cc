"""Aggregate a study's cell records into results.json, report.md and plots.

For every budget arm (``steps``: equal optimizer steps; ``seconds``: equal training wall-clock) and every
evaluation setting: mean ± std over seeds of each metric, and for each per-image metric a paired bootstrap CI
(:mod:`soarflow.study.stats`) of each row's difference to the reference row (SFT) and to the base; a difference
whose CI contains 0 is printed "within noise" in the table. The headline setting of plots and the per-family
table is the last ``num_steps`` with the last ``guidance_scale``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .spec import BASE_ROW, StudySpec, setting_key
from .stats import mean_std, paired_bootstrap

SCALARS = {
    "shapes": ["overall", "reward", "seen", "held_out", "frechet_distance", "diversity", "exposure_gap"],
    "loss": ["fm_loss", "exposure_gap"],
}
PER_IMAGE = {"shapes": ["overall", "reward"], "loss": ["fm_loss"]}
COST = ["step", "train_seconds", "forwards_per_step", "sample_forwards_per_image"]


def headline_setting(spec: StudySpec) -> str:
    return setting_key(spec.evaluation.num_steps[-1], spec.evaluation.guidance_scales[-1])


def aggregate(spec: StudySpec, records: list[dict], num_resamples: int = 2000) -> dict[str, Any]:
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
                    entry["per_family"] = {f: dict(zip(("mean", "std"), mean_std([x["per_family"][f] for x in ms])))
                                           for f in ms[0]["per_family"]}
                bins = ms[0]["exposure_bins"]
                entry["exposure_bins"] = [
                    {"sigma_low": b["sigma_low"], "sigma_high": b["sigma_high"],
                     **dict(zip(("mean", "std"), mean_std([x["exposure_bins"][i]["gap"] for x in ms
                                                           if i < len(x["exposure_bins"])])))}
                    for i, b in enumerate(bins)]
                entry["_per_image"] = {m: np.array([x["per_image"][m] for x in ms]) for m in PER_IMAGE[kind]}
                table[row] = entry
            for row, entry in table.items():
                entry["compare"] = {}
                for ref in (spec.reference, BASE_ROW, *(b for a, b in spec.contrasts if a == row)):
                    if ref is None or ref == row or ref not in table or ref in entry["compare"]:
                        continue
                    other = table[ref]
                    entry["compare"][ref] = {
                        m: paired_bootstrap(entry["_per_image"][m], other["_per_image"][m],
                                            num_resamples=num_resamples,
                                            paired_seeds=entry["seeds"] == other["seeds"]).to_dict()
                        for m in PER_IMAGE[kind]}
            for entry in table.values():
                del entry["_per_image"]
            summary[arm][key] = table
    curves = {row: [{"seed": r["seed"], "points": r.get("curve", [])} for r in by_row[row]] for row in rows}
    failed = [{"row": r["row"], "seed": r["seed"], "hash": r["hash"], "error": r.get("error")}
              for r in records if r.get("status") == "failed"]
    return {"summary": summary, "curves": curves, "failed": failed,
            "cells": [{k: r.get(k) for k in ("row", "seed", "hash", "status", "wall_seconds", "steps_trained")}
                      for r in records]}


# ---------------------------------------------------------------------------------------------- markdown
def _ms(x: dict | None, fmt: str = "{:.3f}") -> str:
    if x is None or x.get("mean") is None or np.isnan(x["mean"]):
        return "-"
    return f"{fmt.format(x['mean'])} ± {fmt.format(x['std'])}"


def _ci(c: dict | None) -> str:
    if c is None:
        return "-"
    text = f"{c['diff']:+.3f} [{c['low']:+.3f}, {c['high']:+.3f}]"
    return text + " within noise" if c["within_noise"] else text


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def _arm_title(spec: StudySpec, arm: str) -> str:
    return "equal optimizer steps" if arm == "steps" else f"equal training wall-clock ({spec.budget.seconds} s)"


def markdown(spec: StudySpec, results: dict, command: str, machine: str, wall_seconds: float) -> str:
    kind = spec.evaluation.kind
    lead = PER_IMAGE[kind][0]
    ref = spec.reference
    lines = [f"# Study `{spec.name}`", "",
             f"- command: `{command}`", f"- machine: {machine}", f"- wall-clock of this invocation: {wall_seconds:.0f} s; of all its cells (each measured when it ran): "
             f"{sum(c.get('wall_seconds') or 0 for c in results.get('cells', [])) / 60:.0f} min",
             f"- seeds: {spec.seeds}; budget: steps {spec.budget.steps}, seconds {spec.budget.seconds} "
             f"(cap {spec.budget.max_steps} steps); evaluation: {kind}, settings "
             + ", ".join(setting_key(n, w) for n, w in spec.evaluation.settings),
             *[f"- row `{r.name}` starts from row `{r.init_from_row}`'s weights at its {r.init_from_arm}-arm evaluation "
               f"(same seed): that stage's budget comes on top of this row's" for r in spec.rows if r.init_from_row],
             "",
             "Values are mean ± std over seeds. Δ columns: difference of the row to the reference / the base with a "
             "95% paired bootstrap CI (images paired by prompt and noise, seeds paired by seed); "
             "**within noise** marks a CI that contains 0.", ""]
    for arm, settings in results["summary"].items():
        arm_title = _arm_title(spec, arm)
        for key, table in settings.items():
            lines += [f"## {arm_title}: {key}", ""]
            header = ["row", "n", lead]
            if ref:
                header.append(f"Δ {lead} vs {ref}")
            header.append(f"Δ {lead} vs base")
            others = [m for m in SCALARS[kind] if m != lead]
            header += others + ["steps", "train s", "fwd calls/step", "sample fwd/image"]
            body = []
            for row, e in table.items():
                r = [row, str(len(e["seeds"])), _ms(e[lead])]
                if ref:
                    r.append(_ci(e["compare"].get(ref, {}).get(lead)))
                r.append(_ci(e["compare"].get(BASE_ROW, {}).get(lead)))
                r += [_ms(e[m], "{:.2f}" if m == "frechet_distance" else "{:.3f}") for m in others]
                r += [_ms(e["step"], "{:.0f}"), _ms(e["train_seconds"], "{:.1f}"),
                      _ms(e["forwards_per_step"], "{:.1f}"), _ms(e["sample_forwards_per_image"], "{:.1f}")]
                body.append(r)
            lines += _table(header, body) + [""]
            if kind == "shapes":
                sub = [[row, _ci(e["compare"].get(ref, {}).get("reward")) if ref else "-",
                        _ci(e["compare"].get(BASE_ROW, {}).get("reward"))] for row, e in table.items()]
                lines += [f"Reward differences ({key}):", ""] + _table(["row", f"Δ reward vs {ref}", "Δ reward vs base"],
                                                                       sub) + [""]
    if spec.contrasts:
        lines += ["## Contrasts", "", "Each pair's difference (row minus against) with its 95% paired bootstrap CI.", ""]
        metrics = [lead] + (["reward"] if kind == "shapes" else [])
        for arm, settings in results["summary"].items():
            arm_title = _arm_title(spec, arm)
            body = [[a, b, m] + [_ci(table.get(a, {}).get("compare", {}).get(b, {}).get(m)) for table in settings.values()]
                    for a, b in spec.contrasts for m in metrics]
            lines += [f"### {arm_title}", ""] + _table(["row", "against", "metric", *settings], body) + [""]
    head = headline_setting(spec)
    for arm, settings in results["summary"].items():
        table = settings.get(head, {})
        if kind == "shapes" and table:
            fams = list(next(iter(table.values()))["per_family"])
            lines += [f"## Per family ({arm}, {head})", ""]
            lines += _table(["row"] + fams, [[row] + [_ms(e["per_family"][f]) for f in fams] for row, e in table.items()])
            lines += [""]
        if table:
            bins = next(iter(table.values()))["exposure_bins"]
            lines += [f"## Exposure gap per sigma bin ({arm}, {head})", ""]
            lines += _table(["row"] + [f"({b['sigma_low']:.2f}, {b['sigma_high']:.2f}]" for b in bins],
                            [[row] + [_ms(b, "{:.4f}") for b in e["exposure_bins"]] for row, e in table.items()])
            lines += [""]
    if results["failed"]:
        lines += ["## Failed cells", ""] + [f"- {f['row']} seed {f['seed']} ({f['hash']}): {f['error']}"
                                            for f in results["failed"]] + [""]
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
                    ax.errorbar(e[other]["mean"], e[lead]["mean"], xerr=e[other]["std"], yerr=e[lead]["std"],
                                fmt="o", capsize=3, color=colors[row], label=row)
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
                ax.bar(xs, [e["per_family"][f]["mean"] for f in fams], width,
                       yerr=[e["per_family"][f]["std"] for f in fams], color=colors[row], label=row)
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
            ax.errorbar(mids, [b["mean"] for b in e["exposure_bins"]], yerr=[b["std"] for b in e["exposure_bins"]],
                        marker="o", capsize=3, color=colors[row], label=row)
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
                    ax.plot([p["train_seconds"] for p in c["points"]], [p["value"] for p in c["points"]],
                            marker=".", color=colors[row], alpha=0.8, label=row if i == 0 else None)
        ev = spec.evaluation
        ax.set_xlabel("training wall-clock (s, evaluation excluded)")
        ax.set_ylabel("ShapesEval overall (curve set)" if kind == "shapes" else "flow-matching loss")
        ax.set_title(f"score vs wall-clock ({ev.curve_num_steps} steps, guidance {ev.curve_guidance_scale:g}, "
                     f"every {ev.every_steps} steps)")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "curves.png", dpi=100)
        plt.close(fig)
        written.append("curves.png")
    return written
