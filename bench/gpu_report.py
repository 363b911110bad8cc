"""One JSON and one markdown summary of a bench/gpu_all.sh run, from the files its sections wrote.

    python bench/gpu_report.py WORK_DIR --out gpu_summary.json --markdown gpu_summary.md

WORK_DIR holds ``sections.tsv`` (section, exit status, seconds, note: one line per section, written by
gpu_all.sh), ``env.json``, ``step_cost.json`` (bench/step_cost.py) and ``scale_*.json`` (bench/scale.py parts,
merged in name order). A missing file is a section that did not run; the summary says so.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import scale_report  # noqa: E402  (bench/scale_report.py: no torch needed)


def _load(path: str) -> dict | None:
    try:
        with open(path) as fh:
            return json.load(fh)
    except (OSError, json.JSONDecodeError):
        return None


def sections(work: str) -> list[dict]:
    out = []
    try:
        with open(os.path.join(work, "sections.tsv")) as fh:
            for line in fh:
                parts = line.rstrip("\n").split("\t")
                if len(parts) >= 3:
                    out.append(
                        {
                            "section": parts[0],
                            "rc": parts[1],
                            "seconds": parts[2],
                            "note": parts[3] if len(parts) > 3 else "",
                        }
                    )
    except OSError:
        pass
    return out


def layout_table(step_cost: dict) -> list[str]:
    """Milliseconds per step of each layout (bench/step_cost.py), the default's resolved layout and the largest
    loss difference between layouts on fixed draws."""
    ks = step_cost.get("ks", {})
    if not ks:
        return []
    variants = list(next(iter(ks.values()))["median_s"])
    lines = [
        f"Forward layouts (bench/step_cost.py, model {step_cost.get('model')}, batch {step_cost.get('batch')}, "
        f"{step_cost.get('device_name')}); the default resolved to **{step_cost.get('default_layout')}**. "
        "Median ms per step:",
        "",
        "| K | " + " | ".join(variants) + " | max abs loss diff between layouts |",
        "|---" * (len(variants) + 2) + "|",
    ]
    for k, r in ks.items():
        lines.append(
            f"| {k} | "
            + " | ".join(f"{r['median_s'][v] * 1e3:.1f}" for v in variants)
            + f" | {r['max_abs_loss_diff']:.1e} |"
        )
    return lines


def build(work: str) -> tuple[dict, str]:
    env = _load(os.path.join(work, "env.json")) or {}
    step_cost = _load(os.path.join(work, "step_cost.json"))
    parts = sorted(glob.glob(os.path.join(work, "scale_*.json")))
    scale = scale_report
    meta, rows = {}, []
    for path in parts:
        data = _load(path) or {}
        meta = meta or data.get("meta", {})
        rows += data.get("rows", [])
    secs = sections(work)
    summary = {
        "env": env,
        "sections": secs,
        "step_cost": step_cost,
        "scale_meta": meta,
        "scale_rows": rows,
        "ratios": scale.ratios(rows),
    }
    md = [
        "# bench/gpu_all.sh summary",
        "",
        f"Machine: {env.get('device') or 'no GPU'} ({env.get('nvidia_smi', '')}); torch {env.get('torch')}, "
        f"CUDA {env.get('cuda')}; diffusers {env.get('diffusers')}, bitsandbytes {env.get('bitsandbytes')}; "
        f"{env.get('date')}.",
        "",
        "| section | exit | seconds | note |",
        "|---|---|---|---|",
    ]
    md += [f"| {s['section']} | {s['rc']} | {s['seconds']} | {s['note']} |" for s in secs]
    if step_cost:
        md += [""] + layout_table(step_cost)
    if rows:
        md += [
            "",
            "## Scale (bench/scale.py parts: " + ", ".join(os.path.basename(p) for p in parts) + ")",
            "",
            scale.markdown(meta, rows),
        ]
    return summary, "\n".join(md) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("work")
    ap.add_argument("--out", required=True)
    ap.add_argument("--markdown", required=True)
    args = ap.parse_args()
    summary, md = build(args.work)
    with open(args.out, "w") as fh:
        json.dump(summary, fh, indent=1)
    with open(args.markdown, "w") as fh:
        fh.write(md)
    print(md)


if __name__ == "__main__":
    main()
