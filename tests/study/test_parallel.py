"""`soarflow study --jobs N --device --cells_dir --max_seconds`: worker slots, cells in worker processes (same
equal-steps results as one at a time, chained rows wait for their source), failed and stopped workers, the
committed cell cache (survives a fresh output folder), the device in the hash, and the time guard."""

import json
import multiprocessing
import os
import signal
import threading
import time

import pytest
import torch
from study_testing import quiet, write_study

from soarflow.commands.study import main
from soarflow.study import expand_cells, load_study
from soarflow.study import parallel as parallel_mod
from soarflow.study import runner as runner_mod
from soarflow.study.cache import compact, load_committed, write_committed
from soarflow.study.parallel import Slot, plan_slots, run_parallel
from soarflow.study.runner import device_hashes, run_configurations, run_study
from soarflow.train.safety import Interrupted


def per_image(records, arm="steps"):
    return {(r["row"], r["seed"]): {k: m["per_image"] for k, m in r["arms"][arm]["metrics"].items()} for r in records}


# ------------------------------------------------------------------------------------------------ slots
def test_slots_pin_each_worker_to_its_own_cores_or_share_the_gpus(monkeypatch):
    assert plan_slots(2, "cpu", cores=[0, 1]) == [Slot(0, 1, (0,)), Slot(1, 1, (1,))]  # one cell per core
    assert [(s.cores, s.threads) for s in plan_slots(2, "cpu", cores=[0, 1, 2, 3, 4])] == [((0, 1), 2), ((2, 3), 2)]
    assert [s.cores for s in plan_slots(3, "cpu", cores=[1])] == [(1,), (1,), (1,)]  # more jobs than cores: shared
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    slots = plan_slots(3, "cuda", cores=list(range(16)))
    assert [s.gpu for s in slots] == ["3", "5", "3"] and all(s.cores is None and s.threads == 5 for s in slots)
    with pytest.raises(ValueError, match="--jobs must be >= 1, got 0"):
        plan_slots(0, "cpu")
    with pytest.raises(ValueError, match="--device must be 'cpu' or 'cuda', got 'tpu'"):
        plan_slots(1, "tpu")


# ------------------------------------------------------------------------------------------------ workers
def test_jobs_2_gives_the_equal_steps_results_of_jobs_1_and_chained_rows_wait(tmp_path, tiny_base):
    rows = [
        {"name": "sft", "set": {"method": "sft"}},
        {"name": "sft_then_ip", "set": {"method": "input_perturbation"}, "init_from_row": "sft"},
    ]
    spec = load_study(write_study(tmp_path, tiny_base, rows))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each worker: the same arithmetic
    try:
        serial = run_study(spec, tmp_path / "one", estimate=False, log=quiet, device="cpu")
    finally:
        torch.set_num_threads(threads)
    lines = []
    parallel = run_study(
        spec, tmp_path / "two", estimate=False, log=lines.append, device="cpu", jobs=2, quiet_workers=True
    )
    assert [r["status"] for r in parallel] == ["ok"] * 3, [r.get("error") for r in parallel]
    assert per_image(parallel) == per_image(serial)
    assert [r["hash"] for r in parallel] == [r["hash"] for r in serial]  # jobs do not enter the hash
    for r in parallel:
        assert r["run"]["device"] == "cpu" and r["run"]["jobs"] == 2 and r["run"]["threads"] == 1
    assert serial[1]["run"]["jobs"] == 1
    chained = next(r for r in parallel if r["row"] == "sft_then_ip")
    assert chained["init_from"] == {"row": "sft", "arm": "steps"}
    # the chained cell started only after its source finished
    order = [m for m in lines if "now: sft seed 0" in m or "now: sft_then_ip" in m or "sft seed 0: ok" in m]
    assert [("now: sft seed" in m, "sft seed 0: ok" in m, "sft_then_ip" in m) for m in order] == [
        (True, False, False),
        (False, True, False),
        (False, False, True),
    ]
    assert "on worker" in next(m for m in lines if "now: base" in m)
    assert run_configurations(parallel).startswith("cpu (") and "x 2 jobs: 3 cells" in run_configurations(parallel)


def _fork_context(real=multiprocessing.get_context):
    return lambda method: real("fork")  # the patched worker below is used as is (no pickling)


def _exit_3(job):
    os._exit(3)


def _exit_interrupted(job):
    os._exit(75)


def _sleep(job):
    for sig in (signal.SIGTERM, signal.SIGINT):  # a forked child inherits the study's handlers; a spawned one does not
        signal.signal(sig, signal.SIG_DFL)
    time.sleep(60)
    os._exit(0)


def _fake_run(tmp_path, tiny_base, monkeypatch, worker, **kw):
    spec = load_study(
        write_study(
            tmp_path,
            tiny_base,
            [
                {"name": "sft", "set": {"method": "sft"}},
                {"name": "ip", "set": {"method": "input_perturbation"}, "init_from_row": "sft"},
            ],
            include_base=False,
        )
    )
    cells = expand_cells(spec)
    monkeypatch.setattr(parallel_mod.multiprocessing, "get_context", _fork_context())
    monkeypatch.setattr(parallel_mod, "cell_worker", worker)
    finished = []
    run_parallel(
        spec,
        cells,
        tmp_path / "out",
        device="cpu",
        jobs=2,
        cells_dir=None,
        keep_models=False,
        save_arms={},
        run_info={"jobs": 2},
        first_config=cells[0].config,
        may_start=kw.get("may_start", lambda c: True),
        on_start=lambda c, s: c.label,
        on_finish=lambda c, r: finished.append(r),
        log=quiet,
    )
    return cells, finished


def test_a_worker_that_dies_is_a_failed_cell_and_a_signal_stops_every_worker(tmp_path, tiny_base, monkeypatch):
    cells, finished = _fake_run(tmp_path, tiny_base, monkeypatch, _exit_3)
    # the source failed, so the chained cell ran next (and failed the same way here)
    assert [(r["row"], r["status"]) for r in finished] == [("sft", "failed"), ("ip", "failed")]
    assert "worker process exited with code 3 without a result" in finished[0]["error"]
    assert json.loads((tmp_path / "out" / "cells" / cells[0].hash / "result.json").read_text())["status"] == "failed"
    # a time guard that refuses the source leaves its chained cell pending too, and nothing runs
    cells, finished = _fake_run(tmp_path, tiny_base, monkeypatch, _exit_3, may_start=lambda c: False)
    assert finished == []
    # a worker stopped by a signal stops the study instead of being recorded as failed
    with pytest.raises(Interrupted, match="stopped by a signal"):
        _fake_run(tmp_path, tiny_base, monkeypatch, _exit_interrupted)
    # Ctrl-C / SIGTERM to the study: every worker is stopped, quickly
    timer = threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGTERM))
    t0 = time.monotonic()
    timer.start()
    try:
        with pytest.raises(Interrupted, match="stopped by SIGTERM"):
            _fake_run(tmp_path, tiny_base, monkeypatch, _sleep)
    finally:
        timer.cancel()
    assert time.monotonic() - t0 < 20
    assert not [p for p in multiprocessing.active_children() if p.name.startswith("soarflow-cell-")]


# ------------------------------------------------------------------------------------------------ cells_dir
def test_compact_cell_files_round_floats_and_store_pass_fail_as_ints(tmp_path):
    record = {
        "row": "sft",
        "seed": 0,
        "hash": "ab" * 8,
        "status": "ok",
        "config": {"learning_rate": 1.234567891e-4},
        "history": [{"loss": 0.5}] * 100,
        "wall_seconds": 12.3456789,
        "arms": {
            "steps": {
                "train_seconds": 1.23456789,
                "metrics": {
                    "s": {
                        "overall": 0.6458333333333334,
                        "per_image": {"overall": [1.0, 0.0, 1.0], "reward": [0.3333333333333333, 1.0, 0.5]},
                    }
                },
            }
        },
    }
    c = compact(record)
    assert "history" not in c and c["config"] == record["config"]  # the config stays exact
    metrics = c["arms"]["steps"]["metrics"]["s"]
    assert metrics["per_image"]["overall"] == [1, 0, 1] and all(type(v) is int for v in metrics["per_image"]["overall"])
    assert metrics["per_image"]["reward"] == [0.333333, 1.0, 0.5] and metrics["overall"] == 0.645833
    assert c["wall_seconds"] == 12.3457
    path = write_committed(tmp_path, record)
    assert path.name == "ab" * 8 + ".json" and len(path.read_text().splitlines()) == 1 and ": " not in path.read_text()
    assert load_committed(tmp_path, "ab" * 8, record["config"]) == c
    assert load_committed(tmp_path, "ab" * 8, {"learning_rate": 1e-4}) is None  # another config: not reused
    assert load_committed(tmp_path, "cd" * 8, record["config"]) is None
    with pytest.raises(ValueError, match="only finished cells are committed, got status 'failed'"):
        write_committed(tmp_path, {**record, "status": "failed"})


def test_cells_dir_is_reused_from_a_fresh_output_dir_without_training(tmp_path, tiny_base, monkeypatch):
    rows = [{"name": "sft", "set": {"method": "sft"}}, {"name": "soar", "set": {"method": "soar"}}]
    path = write_study(tmp_path, tiny_base, rows, contrasts=[["soar", "sft"]])
    cells_dir = tmp_path / "docs" / "cells"
    assert (
        main(
            [
                "--config",
                str(path),
                "--output_dir",
                str(tmp_path / "a"),
                "--cells_dir",
                str(cells_dir),
                "--no_estimate",
                "--num_resamples",
                "200",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    first = json.loads((tmp_path / "a" / "results.json").read_text())
    files = sorted(cells_dir.glob("*.json"))
    assert sorted(f.stem for f in files) == sorted(c["hash"] for c in first["cells"]) and len(files) == 3
    for f in files:
        text = f.read_text()
        assert len(text.splitlines()) == 1 and '"history"' not in text and "weights" not in text
    assert not list(cells_dir.rglob("*.safetensors"))

    def no_training(*a, **k):
        raise AssertionError("a cell trained although its committed result was there")

    import soarflow.train

    monkeypatch.setattr(soarflow.train, "train", no_training)
    monkeypatch.setattr(runner_mod, "run_cell", no_training)  # the base row evaluates without training
    assert (
        main(
            [
                "--config",
                str(path),
                "--output_dir",
                str(tmp_path / "b"),
                "--cells_dir",
                str(cells_dir),
                "--no_estimate",
                "--num_resamples",
                "200",
            ]
        )
        == 0
    )
    second = json.loads((tmp_path / "b" / "results.json").read_text())
    assert not (tmp_path / "b" / "cells").exists()
    a, b = (r["summary"]["steps"]["steps3_cfg2"] for r in (first, second))
    for row in ("base", "sft", "soar"):  # committed floats have 6 significant digits
        assert b[row]["overall"]["mean"] == pytest.approx(a[row]["overall"]["mean"], abs=1e-6)
    assert b["soar"]["compare"]["sft"]["overall"]["diff"] == pytest.approx(
        a["soar"]["compare"]["sft"]["overall"]["diff"]
    )
    assert "cpu" in second["machine"] and second["run"]["cells_dir"] == str(cells_dir)


def test_cells_finished_before_cells_dir_are_committed_on_the_next_run(tmp_path, tiny_base, monkeypatch):
    spec = load_study(write_study(tmp_path, tiny_base, [{"name": "sft", "set": {"method": "sft"}}]))
    records = run_study(spec, tmp_path / "o", estimate=False, log=quiet)
    ran = []
    monkeypatch.setattr(runner_mod, "run_cell", lambda *a, **k: ran.append(a[1].label))
    again = run_study(spec, tmp_path / "o", estimate=False, log=quiet, cells_dir=tmp_path / "cells")
    assert ran == [] and [r["status"] for r in again] == ["ok", "ok"]
    assert sorted(p.stem for p in (tmp_path / "cells").glob("*.json")) == sorted(r["hash"] for r in records)


# ------------------------------------------------------------------------------------------------ device, time
def test_the_device_enters_the_hash_and_cuda_without_a_gpu_is_refused(tmp_path, tiny_base, capsys):
    rows = [
        {"name": "sft", "set": {"method": "sft"}},
        {"name": "ip", "set": {"method": "input_perturbation"}, "init_from_row": "sft"},
    ]
    path = write_study(tmp_path, tiny_base, rows)
    cpu, cuda = expand_cells(load_study(path)), expand_cells(load_study(path))
    device_hashes(cpu, "cpu")
    device_hashes(cuda, "cuda")
    assert [c.hash for c in cpu] == [c.hash for c in expand_cells(load_study(path))]  # CPU hashes as before
    assert {c.hash for c in cpu}.isdisjoint(c.hash for c in cuda) and len({c.hash for c in cuda}) == 3
    assert cuda[2].init_from is cuda[1]  # a chained cell finds its source under the source's new hash
    if not torch.cuda.is_available():
        assert main(["--config", str(path), "--output_dir", str(tmp_path / "o"), "--device", "cuda"]) == 2
        assert "--device cuda: no CUDA device is visible" in capsys.readouterr().err
    assert main(["--config", str(path), "--output_dir", str(tmp_path / "o"), "--jobs", "0"]) == 2


def test_max_seconds_starts_no_cell_after_the_deadline_and_exits_75(tmp_path, tiny_base, capsys):
    path = write_study(tmp_path, tiny_base, [{"name": "sft", "set": {"method": "sft"}}])
    out = tmp_path / "o"
    assert main(["--config", str(path), "--output_dir", str(out), "--no_estimate", "--max_seconds", "0.001"]) == 75
    err = capsys.readouterr().err
    assert "not starting base" in err and "2 of 2 cells pending" in err
    assert not list(out.glob("cells/*/result.json")) and not (out / "report.md").exists()
    records = run_study(load_study(path), out, estimate=False, log=quiet, max_seconds=3600)
    assert [r["status"] for r in records] == ["ok", "ok"]


def test_max_seconds_assumes_an_untimed_row_is_as_slow_as_the_slowest_cell(tmp_path, tiny_base, monkeypatch):
    # the base cell "took" 1000 s: with no estimate, the untimed sft row must not start 1000 s before a 500 s
    # deadline (it used to count as 0 s)
    real_execute = runner_mod.execute_cell

    def slow_record(*args, **kwargs):
        record = real_execute(*args, **kwargs)
        return {**record, "wall_seconds": 1000.0}

    monkeypatch.setattr(runner_mod, "execute_cell", slow_record)
    path = write_study(tmp_path, tiny_base, [{"name": "sft", "set": {"method": "sft"}}])
    logged = []
    records = run_study(load_study(path), tmp_path / "o", estimate=False, log=logged.append, max_seconds=500)
    assert [r["status"] for r in records] == ["ok", "pending"]
    assert any("not starting sft seed 0" in line and "16m40s needed" in line for line in logged)
