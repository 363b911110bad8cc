"""The ratio table of bench/scale.py's rows (SOAR/SFT, official/SFT, soarflow/official), without torch, so that
bench/gpu_report.py can summarise a run anywhere."""

from __future__ import annotations

from types import SimpleNamespace

# A row's group: everything but the method, K, chunk and layout (the rows whose step times the ratios compare).
GROUP_FIELDS = ("arch", "resolution", "batch", "finetune", "quant", "grad_ckpt", "optimizer")


def ratios(rows: list[dict]) -> list[dict]:
    """Per group (everything but the method) and K: SOAR / SFT, official / SFT and soarflow / official, from the
    finished rows' seconds per step (SOAR: its unchunked row, else the first chunked one)."""
    groups: dict[tuple, dict] = {}
    for r in rows:
        if r.get("status") != "ok":
            continue
        case = SimpleNamespace(**{"quant": None, "layout": "auto", "batch": 1, **r})
        key = tuple(getattr(case, f) for f in GROUP_FIELDS)
        g = groups.setdefault(key, {"sft": None, "soar": {}, "official": {}, "peak": {}})
        if case.method == "sft":
            g["sft"] = r["s_per_step"]
            g["peak"]["sft"] = r.get("peak_gib")
        elif case.method == "official":
            g["official"][case.k] = r["s_per_step"]
            g["peak"][f"official{case.k}"] = r.get("peak_gib")
        elif case.layout != "auto":
            g.setdefault("by_layout", {}).setdefault(case.k, {})[case.layout] = r["s_per_step"]
        elif case.k not in g["soar"] or case.aux_chunk is None:
            g["soar"][case.k] = r["s_per_step"]
            g["peak"][f"soar{case.k}"] = r.get("peak_gib")
            g.setdefault("layout", r.get("resolved_layout"))
    out = []
    for key, g in groups.items():
        for k in sorted(set(g["soar"]) | set(g["official"])):
            soar, off, sft = g["soar"].get(k), g["official"].get(k), g["sft"]
            out.append(
                {
                    **dict(zip(GROUP_FIELDS, key)),
                    "k": k,
                    "layout": g.get("layout"),
                    "sft_s": sft,
                    "soar_s": soar,
                    "official_s": off,
                    "soar_s_other_layouts": g.get("by_layout", {}).get(k, {}),
                    "soar_over_sft": soar / sft if soar and sft else None,
                    "official_over_sft": off / sft if off and sft else None,
                    "soarflow_over_official": soar / off if soar and off else None,
                    "peak_gib_sft": g["peak"].get("sft"),
                    "peak_gib_soar": g["peak"].get(f"soar{k}"),
                    "peak_gib_official": g["peak"].get(f"official{k}"),
                }
            )
    return out


def markdown(meta: dict, rows: list[dict]) -> str:
    """The ratio table, and every configuration that did not finish with why."""

    def f(v, fmt):
        return "-" if v is None else format(v, fmt)

    lines = [
        f"Device: {meta.get('device_name')} (torch {meta.get('torch')}, CUDA {meta.get('cuda')}), "
        f"scale {meta.get('scale')}, {meta.get('date')}. Seconds per optimizer step (best timed step after a "
        "warm-up); peak GiB is torch.cuda.max_memory_allocated.",
        "",
        "| arch | px | batch | finetune | optimizer | grad. ckpt | K | SFT s | SOAR s (layout) | official s | "
        "SOAR/SFT | official/SFT | soarflow/official | peak GiB SFT / SOAR / official |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in ratios(rows):
        ft = r["finetune"] + (f" ({r['quant']})" if r["quant"] else "")
        peaks = " / ".join(f(r[f"peak_gib_{m}"], ".1f") for m in ("sft", "soar", "official"))
        others = "".join(f"; {name} {sec:.3f}" for name, sec in r["soar_s_other_layouts"].items())
        lines.append(
            f"| {r['arch']} | {r['resolution']} | {r['batch']} | {ft} | {r['optimizer']} | "
            f"{'on' if r['grad_ckpt'] else 'off'} | {r['k']} | {f(r['sft_s'], '.3f')} | "
            f"{f(r['soar_s'], '.3f')} ({r['layout'] or '-'}{others}) | {f(r['official_s'], '.3f')} | "
            f"{f(r['soar_over_sft'], '.2f')} | {f(r['official_over_sft'], '.2f')} | "
            f"{f(r['soarflow_over_official'], '.2f')} | {peaks} |"
        )
    other = [r for r in rows if r.get("status") != "ok"]
    if other:
        lines += ["", "Not measured:", ""] + [f"* {r['case']}: {r['status']}" for r in other]
    return "\n".join(lines) + "\n"
