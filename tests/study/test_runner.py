"""`soarflow study` on a tiny stand-in base: grid validation, the per-cell cache (resume, added rows, hash
mismatch), failed cells, equal-steps / equal-wall-clock arms, and the report files."""

import json

import numpy as np

import pytest
from study_testing import quiet, write_study

from soarflow.study import expand_cells, load_study
from soarflow.study import runner as runner_mod
from soarflow.commands.study import main
from soarflow.study.report import aggregate
from soarflow.study.runner import run_study


def test_grid_is_validated_before_anything_runs_naming_row_and_key(tmp_path, tiny_base):
    path = write_study(
        tmp_path,
        tiny_base,
        [{"name": "sft", "set": {"method": "sft"}}, {"name": "new", "set": {"method": "no_such_method"}}],
    )
    with pytest.raises(ValueError, match=r"study row 'new': config key 'method'.*no_such_method"):
        load_study(path)
    path = write_study(tmp_path, tiny_base, [{"name": "k", "set": {"soar.num_auxx": 2}}])
    with pytest.raises(ValueError, match=r"study row 'k': unknown config key 'soar.num_auxx'.*soar.num_aux"):
        load_study(path)
    assert main(["--config", str(path), "--output_dir", str(tmp_path / "o")]) == 2
    assert not (tmp_path / "o").exists()  # nothing ran, nothing written
    # one image per prompt leaves ShapesEval's diversity undefined: refused before any cell trains
    path = write_study(
        tmp_path,
        tiny_base,
        [{"name": "sft", "set": {"method": "sft"}}],
        evaluation={"num_steps": [3], "guidance_scales": [2.0], "images_per_prompt": 1},
    )
    with pytest.raises(ValueError, match=r"evaluation.images_per_prompt must be >= 2 for kind 'shapes'.*got 1"):
        load_study(path)
    # a contrast must name rows of the file
    path = write_study(tmp_path, tiny_base, [{"name": "sft", "set": {"method": "sft"}}], contrasts=[["sft", "soarr"]])
    with pytest.raises(ValueError, match=r"contrast \['sft', 'soarr'\] names unknown row 'soarr'"):
        load_study(path)
    # the primary contrast names rows, a setting and an arm of the file
    rows = [{"name": "sft", "set": {"method": "sft"}}, {"name": "soar", "set": {"method": "soar"}}]
    good = {"row": "soar", "against": "sft", "setting": "steps3_cfg2", "arm": "steps"}
    assert load_study(write_study(tmp_path, tiny_base, rows, primary=good)).primary.against == "sft"
    for bad, message in [
        ({**good, "row": "soarr"}, r"primary.row: unknown row 'soarr'"),
        ({**good, "setting": "steps40_cfg4"}, r"primary.setting: 'steps40_cfg4' is not evaluated"),
        ({**good, "arm": "seconds"}, r"primary.arm: 'seconds' is not a budget arm"),
        ({**good, "metric": "frechet_distance"}, r"primary.metric: 'frechet_distance' has no interval"),
        ({k: v for k, v in good.items() if k != "arm"}, r"primary.arm is required"),
        ({**good, "against": "soar"}, r"primary: row and against are the same row"),
        ({**good, "arms": "steps"}, r"primary: unknown key\(s\) arms"),
    ]:
        with pytest.raises(ValueError, match=message):
            load_study(write_study(tmp_path, tiny_base, rows, primary=bad))
    # --only runs a subset, and a pattern that matches nothing is an error
    path = write_study(
        tmp_path,
        tiny_base,
        [{"name": "sft", "set": {"method": "sft"}}, {"name": "new", "set": {"method": "no_such_method"}}],
    )
    assert [r.name for r in load_study(path, only=["sft"]).rows] == ["sft"]
    with pytest.raises(ValueError, match="--only 'zzz' matches no row"):
        load_study(path, only=["zzz"])


def test_sweeps_expand_to_named_rows_and_hashes_follow_the_config(tmp_path, tiny_base):
    path = write_study(
        tmp_path,
        tiny_base,
        [
            {"name": "soar", "set": {"method": "soar"}, "sweep": {"soar.num_aux": [1, 2], "soar.lambda_aux": [0.5]}},
            {
                "name": "v",
                "set": {"method": "soar"},
                "sweep_mode": "one_at_a_time",
                "sweep": {"soar.num_aux": [1, 3], "soar.rollout_cfg": [1.0]},
            },
        ],
        seeds=[0, 1],
    )
    spec = load_study(path)
    assert [r.name for r in spec.rows] == [
        "soar[num_aux=1,lambda_aux=0.5]",
        "soar[num_aux=2,lambda_aux=0.5]",
        "v[num_aux=1]",
        "v[num_aux=3]",
        "v[rollout_cfg=1.0]",
    ]
    cells = expand_cells(spec)
    assert len(cells) == 1 + 5 * 2 and cells[0].row == "base" and cells[0].seed is None
    assert cells[1].config["soar"]["num_aux"] == 1 and cells[1].config["soar"]["lambda_aux"] == 0.5
    assert len({c.hash for c in cells}) == len(cells)
    assert [c.hash for c in expand_cells(load_study(path))] == [c.hash for c in cells]  # stable


def test_the_auto_layout_keeps_cell_hashes_and_caches_of_before(tmp_path, tiny_base):
    """soar.reuse_main_output: auto (the default) hashes as the former default true; an explicit false differs."""
    rows = [{"name": "soar", "set": {"method": "soar"}}]
    default = expand_cells(load_study(write_study(tmp_path, tiny_base, rows)))
    assert default[1].config["soar"]["reuse_main_output"] == "auto"
    hashes = {}
    for value in (True, False):
        pinned = write_study(
            tmp_path, tiny_base, [{"name": "soar", "set": {"method": "soar", "soar.reuse_main_output": value}}]
        )
        hashes[value] = expand_cells(load_study(pinned))[1].hash
    assert default[1].hash == hashes[True] != hashes[False]
    # a result cached before 'auto' existed (config says true) is still this cell's result
    cell = default[1]
    cdir = runner_mod.cell_dir(tmp_path / "out", cell)
    cdir.mkdir(parents=True)
    old = {**cell.config, "soar": {**cell.config["soar"], "reuse_main_output": True}}
    (cdir / runner_mod.RESULT).write_text(json.dumps({"hash": cell.hash, "config": old, "status": "ok"}))
    assert runner_mod.load_cached(tmp_path / "out", cell) is not None


def test_cache_resume_added_rows_mismatch_and_failed_cells(tmp_path, tiny_base, ran_cells):
    out = tmp_path / "out"
    ran = ran_cells
    rows = [{"name": "sft", "set": {"method": "sft"}}]
    records = run_study(load_study(write_study(tmp_path, tiny_base, rows)), out, estimate=False, log=quiet)
    assert ran == ["base", "sft seed 0"] and all(r["status"] == "ok" for r in records)
    sft = records[1]
    assert sft["arms"]["steps"]["step"] == 2 and sft["steps_trained"] == 2
    assert sft["arms"]["steps"]["forwards_per_step"] == 1.0  # SFT: one forward per step
    assert len(sft["arms"]["steps"]["metrics"]["steps3_cfg2"]["per_image"]["overall"]) == 12
    # a finished study reruns nothing
    ran.clear()
    run_study(load_study(write_study(tmp_path, tiny_base, rows)), out, estimate=False, log=quiet)
    assert ran == []
    # adding a row runs only that row; a cell that crashes is recorded and the study goes on
    rows += [
        {"name": "broken", "set": {"method": "sft", "data.num_samples": 2}},  # batch 4 > 2 samples
        {"name": "soar", "set": {"method": "soar"}},
    ]
    records = run_study(load_study(write_study(tmp_path, tiny_base, rows)), out, estimate=False, log=quiet)
    assert ran == ["broken seed 0", "soar seed 0"]
    broken = next(r for r in records if r["row"] == "broken")
    assert broken["status"] == "failed" and "train_batch_size" in broken["error"]
    soar = next(r for r in records if r["row"] == "soar")
    # main + 2 aux rows per image, plus the rollout's unconditional row (its conditional half is the main output)
    assert soar["status"] == "ok" and soar["arms"]["steps"]["sample_forwards_per_image"] == 4.0
    results = aggregate(load_study(write_study(tmp_path, tiny_base, rows)), records, num_resamples=200)
    assert results["failed"][0]["row"] == "broken"
    assert "sft" in results["summary"]["steps"]["steps3_cfg2"]["soar"]["compare"]
    # a cache entry whose recorded hash does not match is never reused
    ran.clear()
    sft_file = out / "cells" / sft["hash"] / "result.json"
    tampered = json.loads(sft_file.read_text())
    tampered["hash"] = "0" * 16
    sft_file.write_text(json.dumps(tampered))
    rows.pop(1)
    run_study(load_study(write_study(tmp_path, tiny_base, rows)), out, estimate=False, log=quiet)
    assert ran == ["sft seed 0"] and (sft_file.parent / "result.mismatch.json").exists()


def test_equal_wall_clock_arm_and_report_files(tmp_path, tiny_base, capsys):
    path = write_study(
        tmp_path,
        tiny_base,
        [{"name": "sft", "set": {"method": "sft"}}, {"name": "soar", "set": {"method": "soar"}}],
        budget={"steps": 1, "seconds": 0.05, "max_steps": 50},
        evaluation={
            "num_steps": [3],
            "guidance_scales": [1.0, 2.0],
            "prompts_per_family": 1,
            "images_per_prompt": 2,
            "exposure_images": 4,
            "every_steps": 1,
        },
        contrasts=[["sft", "soar"]],
        primary={"row": "soar", "against": "sft", "setting": "steps3_cfg2", "arm": "seconds"},
    )
    out = tmp_path / "o"
    assert main(["--config", str(path), "--output_dir", str(out), "--num_resamples", "200"]) == 0
    assert "estimated total for 3 cells" in capsys.readouterr().err
    results = json.loads((out / "results.json").read_text())
    for row in ("sft", "soar"):
        cell = next(c for c in results["cells"] if c["row"] == row)
        record = json.loads((out / "cells" / cell["hash"] / "result.json").read_text())
        assert record["arms"]["steps"]["step"] == 1
        assert record["arms"]["seconds"]["train_seconds"] >= 0.05 and not record["arms"]["seconds"]["capped"]
        assert [p["step"] for p in record["curve"]] == list(range(1, record["steps_trained"] + 1))
    report = (out / "report.md").read_text()
    assert "equal training wall-clock (0.05 s)" in report and "Δ overall vs sft" in report
    # a contrast is the same paired comparison, the other way round
    for arm in ("steps", "seconds"):
        for table in results["summary"][arm].values():
            forward = table["soar"]["compare"]["sft"]["overall"]["diff"]
            assert table["sft"]["compare"]["soar"]["overall"]["diff"] == pytest.approx(-forward)
    assert "## Contrasts" in report and "| sft | soar | overall |" in report and "| sft | soar | reward |" in report
    # the report leads with the primary contrast; every other interval carries a Holm-adjusted p
    assert report.index("## Primary contrast") < report.index("## Secondary comparisons") < report.index("## Contrasts")
    primary = results["primary"]
    assert (primary["row"], primary["against"], primary["arm"], primary["setting"]) == (
        "soar",
        "sft",
        "seconds",
        "steps3_cfg2",
    )
    assert primary["interval"] == results["summary"]["seconds"]["steps3_cfg2"]["soar"]["compare"]["sft"]["overall"]
    assert "p_holm" not in primary["interval"] and primary["mde_80"] >= 0 and primary["family_size"] > 0
    secondary = results["summary"]["steps"]["steps3_cfg2"]["soar"]["compare"]["sft"]
    assert {"overall", "reward", "diversity"} <= set(secondary) and secondary["overall"]["p_holm"] >= secondary[
        "overall"
    ]["p"]
    # per_image.npz rebuilds every interval with the same numbers, without the cells
    from soarflow.commands.study_report import main as report_main
    from soarflow.study.report import load_per_image

    store = load_per_image(out / "per_image.npz")
    entry = store["entries"][("steps", "steps3_cfg2", "soar")]
    assert (
        entry["overall"].dtype == "uint8" and entry["overall"].shape == (1, 12) and entry["reward"].dtype == "float16"
    )
    assert entry["diversity"].shape == (1, 6) and list(store["groups"]) == [i // 2 for i in range(12)]
    rebuilt = tmp_path / "rebuilt"
    assert report_main([str(out), "--config", str(path), "--output_dir", str(rebuilt), "--num_resamples", "200"]) == 0
    assert json.loads((rebuilt / "results.json").read_text()) == results
    assert (rebuilt / "report.md").read_text() == report
    assert report_main([str(tmp_path / "nowhere"), "--config", str(path)]) == 2
    for name in results["plots"]:
        assert (out / name).stat().st_size > 1000
    assert {"pareto_steps.png", "curves.png", "families_seconds.png", "exposure_steps.png"} <= set(results["plots"])


def test_a_signal_stops_the_study_and_keeps_finished_cells(tmp_path, tiny_base, monkeypatch):
    """SIGTERM / Ctrl-C in a cell (the trainer's Interrupted) stops the whole study instead of recording the cell as
    failed and going on; finished cells stay cached, and the interrupted one runs again on the rerun."""
    from soarflow.train.safety import Interrupted

    out = tmp_path / "out"
    real_run_cell = runner_mod.run_cell

    def interrupt_sft(spec, cell, *a, **k):
        if cell.row == "sft":
            raise Interrupted("stopped by SIGTERM after step 1", 1, None, "SIGTERM")
        return real_run_cell(spec, cell, *a, **k)

    monkeypatch.setattr(runner_mod, "run_cell", interrupt_sft)
    spec = load_study(write_study(tmp_path, tiny_base, [{"name": "sft", "set": {"method": "sft"}}]))
    with pytest.raises(Interrupted):
        run_study(spec, out, estimate=False, log=quiet)
    results = sorted(p.parent.name for p in (out / "cells").glob("*/result.json"))
    assert len(results) == 1  # the base cell; nothing recorded for the interrupted cell
    monkeypatch.setattr(runner_mod, "run_cell", real_run_cell)
    records = run_study(spec, out, estimate=False, log=quiet)
    assert [r["status"] for r in records] == ["ok", "ok"]


def test_a_chained_row_starts_from_its_source_cells_weights(tmp_path, tiny_base, monkeypatch):
    """SOAR -> GRPO: `init_from_row` starts each cell from the same seed's source cell at its arm's evaluation."""
    rows = [
        {"name": "sft", "set": {"method": "sft"}},
        {"name": "sft_then_ip", "set": {"method": "input_perturbation"}, "init_from_row": "sft"},
    ]
    path = write_study(tmp_path, tiny_base, rows, seeds=[0, 1], include_base=False)
    spec = load_study(path)
    cells = expand_cells(spec)
    chained = [c for c in cells if c.row == "sft_then_ip"]
    assert [c.init_from.label for c in chained] == ["sft seed 0", "sft seed 1"]
    assert all(c.init_arm == "steps" for c in chained)  # the only arm of this budget
    # the source's hash is part of the chained cell's: same config without the chain hashes differently
    unchained = [rows[0], {"name": "sft_then_ip", "set": rows[1]["set"]}]
    (tmp_path / "plain").mkdir()
    plain = expand_cells(
        load_study(write_study(tmp_path / "plain", tiny_base, unchained, seeds=[0, 1], include_base=False))
    )
    assert {c.hash for c in chained}.isdisjoint({c.hash for c in plain})
    assert [c.hash for c in cells if c.row == "sft"] == [c.hash for c in plain if c.row == "sft"]

    loaded = []
    from soarflow.train import trainer as trainer_mod

    orig = trainer_mod.load_init_weights

    def spy(task, model, p):
        loaded.append(str(p))
        return orig(task, model, p)

    monkeypatch.setattr(trainer_mod, "load_init_weights", spy)
    out = tmp_path / "out"
    records = run_study(spec, out, estimate=False, log=quiet)
    assert [r["status"] for r in records] == ["ok"] * 4
    assert all(r["init_from"] == {"row": "sft", "arm": "steps"} for r in records if r["row"] == "sft_then_ip")
    sources = [runner_mod.weights_path(out, c.init_from, "steps") for c in chained]
    assert sorted(loaded) == sorted(str(p) for p in sources) and all(p.is_file() for p in sources)
    # a chained row names an earlier, unchained row
    (tmp_path / "bad").mkdir()
    bad = write_study(
        tmp_path / "bad",
        tiny_base,
        [{"name": "a", "set": {"method": "sft"}, "init_from_row": "b"}, {"name": "b", "set": {"method": "sft"}}],
    )
    with pytest.raises(ValueError, match="study row 'a': init_from_row 'b' must name a row listed before it"):
        load_study(bad)
    bad = write_study(
        tmp_path / "bad",
        tiny_base,
        [
            {"name": "a", "set": {"method": "sft"}},
            {"name": "b", "set": {"method": "sft"}, "init_from_row": "a", "init_from_arm": "seconds"},
        ],
    )
    with pytest.raises(ValueError, match=r"study row 'b': init_from_arm must be one of \['steps'\]"):
        load_study(bad)
    # --only keeps the source row of a chained row
    assert [r.name for r in load_study(path, only=["sft_then_ip"]).rows] == ["sft", "sft_then_ip"]


def test_former_evaluation_key_names_still_load_with_a_warning(tmp_path, tiny_base):
    path = write_study(
        tmp_path,
        tiny_base,
        [{"name": "sft", "set": {"method": "sft"}}],
        evaluation={"num_steps": [3], "cfg_scales": [1.0, 2.0], "curve_cfg_scale": 2.0},
    )
    with pytest.warns(FutureWarning, match="guidance_scales"):
        spec = load_study(path)
    assert spec.evaluation.guidance_scales == [1.0, 2.0] and spec.evaluation.curve_guidance_scale == 2.0


def _fake_records(spec, rng, num_images):
    """Finished-cell records with random per-image results (no training): what run_study returns."""
    records = []
    for cell in expand_cells(spec):
        skill = rng.normal(0, 0.5)
        metrics = {}
        for n, w in spec.evaluation.settings:
            passed = (rng.random(num_images) < 1 / (1 + np.exp(-skill - rng.normal(0, 1, num_images)))).astype(float)
            reward = np.clip(passed * 0.5 + rng.random(num_images) * 0.5, 0, 1)
            metrics[f"steps{n}_cfg{w:g}"] = {
                "overall": passed.mean(),
                "reward": reward.mean(),
                "seen": 0.5,
                "held_out": 0.5,
                "frechet_distance": rng.random() * 10,
                "diversity": rng.random(),
                "exposure_gap": rng.random(),
                "per_family": {"single": 0.5},
                "exposure_bins": [{"sigma_low": 0.0, "sigma_high": 1.0, "gap": 0.1}],
                "per_image": {"overall": passed.tolist(), "reward": reward.tolist()},
                "per_prompt": {"diversity": rng.random(num_images // 2).tolist()},
            }
        arm = {
            "step": 2,
            "train_seconds": 1.0,
            "capped": False,
            "forwards_per_step": 1.0,
            "sample_forwards_per_image": 1.0,
            "metrics": metrics,
        }
        records.append(
            {
                "row": cell.row,
                "seed": cell.seed,
                "hash": cell.hash,
                "status": "ok",
                "wall_seconds": 1.0,
                "arms": {a: arm for a in spec.budget.arms},
                "curve": [],
            }
        )
    return records


def test_rebuild_from_per_image_data_gives_the_same_intervals(tmp_path, tiny_base):
    from soarflow.study.report import PER_IMAGE_FILE, markdown, rebuild, save_per_image

    path = write_study(
        tmp_path,
        tiny_base,
        [{"name": "sft", "set": {"method": "sft"}}, {"name": "soar", "set": {"method": "soar"}}],
        seeds=[0, 1, 2],
        contrasts=[["sft", "soar"]],
        evaluation={
            "num_steps": [3],
            "guidance_scales": [1.0, 2.0],
            "prompts_per_family": 4,
            "images_per_prompt": 2,
            "exposure_images": 4,
        },
        primary={"row": "soar", "against": "sft", "setting": "steps3_cfg2", "arm": "steps"},
    )
    spec = load_study(path)
    results = aggregate(spec, _fake_records(spec, np.random.default_rng(0), 96), num_resamples=300)
    store = results.pop("_per_image")
    out = tmp_path / "study"
    out.mkdir()
    save_per_image(store, out / PER_IMAGE_FILE)
    (out / "results.json").write_text(json.dumps(results))
    original = json.loads((out / "results.json").read_text())
    # drop every interval, then rebuild them from per_image.npz alone
    stripped = json.loads((out / "results.json").read_text())
    for settings in stripped["summary"].values():
        for table in settings.values():
            for entry in table.values():
                entry["compare"] = {}
    (out / "results.json").write_text(json.dumps({**stripped, "primary": None}))
    rebuilt = rebuild(spec, out, num_resamples=300)
    assert rebuilt == original
    ci = rebuilt["primary"]["interval"]
    assert ci["se"] > 0 and 0 < ci["p"] <= 1 and ci["low"] < ci["diff"] < ci["high"]
    from soarflow.study.stats import t_ppf

    mde = (t_ppf(0.975, ci["df"]) + t_ppf(0.8, ci["df"])) * ci["se"]
    assert rebuilt["primary"]["mde_80"] == pytest.approx(mde) and mde > 2.8 * ci["se"]  # few df: wider than 2.8 SE
    # Holm over the family: each comparison once (A vs B and B vs A share p_holm), the primary (either way) outside
    table = rebuilt["summary"]["steps"]["steps3_cfg2"]
    assert "p_holm" not in table["sft"]["compare"]["soar"]["overall"]  # the primary, reversed
    assert table["sft"]["compare"]["base"]["reward"]["p_holm"] == table["base"]["compare"]["sft"]["reward"]["p_holm"]
    ps = {}
    for arm, settings in rebuilt["summary"].items():
        for key, tab in settings.items():
            for row, entry in tab.items():
                for ref, metrics in entry["compare"].items():
                    for m, d in metrics.items():
                        if "p_holm" in d:
                            ps[(arm, key, frozenset((row, ref)), m)] = (d["p"], d["p_holm"])
    assert len(ps) == rebuilt["primary"]["family_size"]
    smallest = min(ps.values())
    assert smallest[1] == pytest.approx(min(1.0, smallest[0] * len(ps)))
    assert all(p <= ph <= 1 for p, ph in ps.values())
    report = markdown(spec, rebuilt, "cmd", "machine", 1.0)
    assert f"**{ci['diff']:+.3f} [{ci['low']:+.3f}, {ci['high']:+.3f}]**" in report
    assert "frechet_distance (no CI)" in report and "exposure_gap (no CI)" in report


def test_cells_run_seed_major_and_seeds_makes_an_interim_report(tmp_path, tiny_base, ran_cells, capsys):
    rows = [{"name": "sft", "set": {"method": "sft"}}, {"name": "soar", "set": {"method": "soar"}}]
    primary = {"row": "soar", "against": "sft", "setting": "steps3_cfg2", "arm": "steps"}
    path = write_study(tmp_path, tiny_base, rows, seeds=[0, 1, 2], primary=primary)
    out = tmp_path / "out"
    # an interim report from seed 0: same cells (hashes) as the declared study, and it says what it is
    assert main(["--config", str(path), "--output_dir", str(out), "--no_estimate", "--seeds", "0"]) == 0
    report = (out / "report.md").read_text()
    assert "**interim report**: seeds [0] of the 3 the study declares ([0, 1, 2])" in report
    assert json.loads((out / "results.json").read_text())["study"]["declared_seeds"] == [0, 1, 2]
    assert "One training seed: the seed component of the variance cannot be estimated" in report
    interim, full = load_study(path, seeds=[0]), load_study(path)
    assert interim.interim and not full.interim and interim.seeds == [0]
    assert {c.hash for c in expand_cells(interim)} < {c.hash for c in expand_cells(full)}
    # the rest runs seed-major, so that a run cut short leaves whole seeds
    assert ran_cells == ["base", "sft seed 0", "soar seed 0"]
    ran_cells.clear()
    records = run_study(full, out, estimate=False, log=quiet)
    assert ran_cells == ["sft seed 1", "soar seed 1", "sft seed 2", "soar seed 2"]
    assert all(r["status"] == "ok" for r in records)
    # the study as declared, from the cache: neither interim nor one seed
    assert main(["--config", str(path), "--output_dir", str(out), "--no_estimate"]) == 0
    report = (out / "report.md").read_text()
    assert "interim report" not in report and "One training seed" not in report
    assert "declared_seeds" not in json.loads((out / "results.json").read_text())["study"]
    # a seed the file does not declare is refused, naming it
    capsys.readouterr()
    assert main(["--config", str(path), "--output_dir", str(out), "--seeds", "0", "7"]) == 2
    assert "--seeds [7] not among the seeds" in capsys.readouterr().err
