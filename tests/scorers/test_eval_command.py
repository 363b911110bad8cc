"""`soarflow eval` end to end on the tiny SD3 pipeline through every scorer stand-in: one process and two
(`accelerate launch`, gloo) give the same images and numbers (HPSv2.1 only where open_clip imports: CI has no
open_clip, see scorer_testing.open_clip_missing); GenEval's layout; resume; errors."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
import pytest
from launching import launch_two_processes

pytest.importorskip("diffusers")

from diffusers_testing import TINY_GENERATION_ARGS, build_tiny_flux_pipeline, build_tiny_sd3_pipeline  # noqa: E402
from scorer_testing import build_standins, open_clip_missing  # noqa: E402
from soarflow.commands.eval import build_parser, image_seed, main, run  # noqa: E402
from soarflow.scorers import SCORER_NAMES  # noqa: E402

WORKER = Path(__file__).with_name("eval_worker.py")
GEN = ["--num_inference_steps", "2", "--guidance_scale", "2.0", "--seed", "3"]
# prompts every stand-in can score: quoted text for OCR, GenEval metadata for the detector
LINES = [
    {
        "prompt": 'a photo of a bench with "soar" written on it',
        "tag": "single_object",
        "include": [{"class": "bench", "count": 1}],
    },
    {
        "prompt": 'a photo of two clocks and the word "flow"',
        "tag": "counting",
        "include": [{"class": "clock", "count": 2}],
        "exclude": [{"class": "clock", "count": 3}],
    },
    {"prompt": 'a red circle saying "hi"', "tag": "colors", "include": [{"class": "cup", "count": 1, "color": "red"}]},
]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    build_tiny_sd3_pipeline(root / "sd3")
    scorers = build_standins(root / "standins")
    (root / "prompts.jsonl").write_text("\n".join(json.dumps(x) for x in LINES) + "\n")
    return root, scorers


def pixels(path: Path) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(path).convert("RGB"))


@pytest.mark.slow
def test_one_and_two_processes_give_the_same_numbers(setup):
    root, scorers = setup
    args = [
        "--model",
        str(root / "sd3"),
        "--suite",
        "file",
        "--prompts_file",
        str(root / "prompts.jsonl"),
        "--num_images_per_prompt",
        "2",
        "--batch_size",
        "3",
        *GEN,
    ]
    # one thread, as each launched process has (OMP_NUM_THREADS=1), and the same batch sizes: the same arithmetic,
    # up to a pixel moved by one grey level now and then (an exact check failed on it in 2 of 11 repeats on
    # 2026-12-07, a value at a rounding boundary); other thread counts or batches move more of them
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one = run(build_parser().parse_args([*args, "--output_dir", str(root / "one")]), scorers)
    finally:
        torch.set_num_threads(threads)
    # every scorer; HPSv2.1 only where open_clip imports (the worker builds the same stand-ins)
    expected = set(SCORER_NAMES) - ({"hpsv2"} if open_clip_missing() else set())
    assert set(scorers) == expected
    assert one["num_processes"] == 1 and set(one["summary"]) == expected
    env = dict(
        PYTHONPATH=os.pathsep.join([str(Path(__file__).parents[2] / "src"), os.environ.get("PYTHONPATH", "")]),
    )
    worker_args = (str(WORKER), str(root / "standins"), "--", *args, "--output_dir", str(root / "two"))
    try:
        proc = launch_two_processes(*worker_args, env=env, timeout=900)
    except AssertionError as err:
        # Rank 1 has aborted in native code after its images ("terminate called without an active exception"),
        # in 2 full CI runs of 2 on 2026-12-07 and in none of 18 runs of this file alone; not root-caused. One
        # retry on exactly that abort, from an empty folder; any other failure fails. (Those runs' worker exited
        # without destroying its process group; it now does, as `soarflow eval` does.)
        if "terminate called without an active exception" not in str(err):
            raise
        shutil.rmtree(root / "two")
        proc = launch_two_processes(*worker_args, env=env, timeout=900)
    # each process generated its own prompts: 0 and 2 on process 0, 1 on process 1
    assert "[process 0] generated 4 image(s)" in proc.stderr and "[process 1] generated 2 image(s)" in proc.stderr
    two = json.loads((root / "two" / "results.json").read_text())
    assert two["num_processes"] == 2
    assert (
        [r["file"] for r in two["images"]]
        == [r["file"] for r in one["images"]]
        == [f"images/{i:05d}_{k:04d}.png" for i in range(3) for k in range(2)]
    )
    for a, b in zip(one["images"], two["images"]):
        grey = np.abs(pixels(root / "one" / a["file"]).astype(int) - pixels(root / "two" / b["file"]).astype(int))
        assert grey.max() <= 1 and (grey > 0).mean() <= 0.01, (a["file"], grey.max(), (grey > 0).mean())
        assert a["scores"].keys() == b["scores"].keys()
        for name in a["scores"]:
            assert a["scores"][name] == pytest.approx(b["scores"][name], abs=1e-3), (name, a["file"])
    assert set(two["summary"]) == expected
    for name in expected:
        assert one["summary"][name]["mean"] == pytest.approx(two["summary"][name]["mean"], abs=1e-3)
    assert one["summary"]["geneval"]["per_tag"].keys() == {"single_object", "counting", "colors", "overall"}
    # the images differ from each other (seeds per prompt and image)
    assert not np.array_equal(
        pixels(root / "one" / "images/00000_0000.png"), pixels(root / "one" / "images/00000_0001.png")
    )
    table = (root / "two" / "results.md").read_text().splitlines()
    assert table[0] == ("| model | suite | GenEval | OCR | PickScore | ClipScore | HPSv2.1 | Aesthetic | ImageReward |")
    assert f"{two['summary']['pickscore']['mean']:.2f}" in table[2]


def test_geneval_layout_and_resume(setup):
    root, scorers = setup
    out = root / "geneval"
    argv = [
        "--model",
        str(root / "sd3"),
        "--suite",
        "geneval",
        "--max_prompts",
        "2",
        "--num_images_per_prompt",
        "2",
        "--output_dir",
        str(out),
        *GEN,
    ]
    names = {k: scorers[k] for k in ("geneval", "clip")}
    first = run(build_parser().parse_args(argv), names)
    meta = json.loads((out / "00001" / "metadata.jsonl").read_text())  # GenEval reads it with json.load
    assert meta == {"tag": "single_object", "include": [{"class": "cow", "count": 1}], "prompt": "a photo of a cow"}
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png"))
    assert files == [
        "00000/samples/0000.png",
        "00000/samples/0001.png",
        "00001/samples/0000.png",
        "00001/samples/0001.png",
    ]
    index = [json.loads(line) for line in (out / "index.jsonl").read_text().splitlines()]
    assert [(r["prompt_index"], r["image_index"]) for r in index] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    before = {f: pixels(out / f) for f in files}
    mtimes = {f: (out / f).stat().st_mtime_ns for f in files}
    (out / files[1]).unlink()
    (out / files[2]).write_bytes(b"not a png")  # a corrupt image is made again
    again = run(build_parser().parse_args(argv), names)
    for f in files:
        assert np.abs(pixels(out / f).astype(int) - before[f].astype(int)).max() <= 1
    assert [f for f in files if (out / f).stat().st_mtime_ns != mtimes[f]] == [files[1], files[2]]
    for a, b in zip(first["images"], again["images"]):
        assert a["scores"]["clip"] == pytest.approx(b["scores"]["clip"], abs=1e-3)
    with pytest.raises(ValueError, match=r"other settings \(num_inference_steps: 2 -> 3\)"):
        run(build_parser().parse_args([*argv, "--num_inference_steps", "3"]), names)
    assert image_seed(3, 0, 1) != image_seed(3, 1, 0) and image_seed(3, 0, 1) == image_seed(3, 0, 1)


def test_missing_scorer_package_fails_before_generating(setup, capsys, monkeypatch):
    root, _ = setup
    monkeypatch.setitem(sys.modules, "mmdet", None)
    code = main(
        [
            "--model",
            str(root / "sd3"),
            "--suite",
            "geneval",
            "--max_prompts",
            "1",
            "--output_dir",
            str(root / "nommdet"),
            *GEN,
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err == [
        "soarflow eval: error: scorer 'geneval' needs the package 'mmdet': pip install mmdet "
        "(GenEval's environment: mmdet 2.x with mmcv-full)"
    ]
    assert not (root / "nommdet").exists()
    code = main(
        ["--model", str(root / "missing"), "--suite", "geneval", "--output_dir", str(root / "x"), "--skip_scoring"]
    )
    assert code == 2 and "--model not found" in capsys.readouterr().err


def test_a_flux_pipeline_folder(tmp_path):
    """A FLUX.1-dev-like folder (guidance-distilled): the guidance goes in as the embedded value."""
    build_tiny_flux_pipeline(tmp_path / "flux")
    (tmp_path / "p.txt").write_text("a red circle\n")
    mean = {"mean": lambda images, prompts: images.mean((1, 2, 3))}
    argv = [
        "--model",
        str(tmp_path / "flux"),
        "--suite",
        "file",
        "--prompts_file",
        str(tmp_path / "p.txt"),
        *TINY_GENERATION_ARGS,
    ]
    a = run(build_parser().parse_args([*argv, "--output_dir", str(tmp_path / "a"), "--guidance_scale", "1.0"]), mean)
    b = run(build_parser().parse_args([*argv, "--output_dir", str(tmp_path / "b"), "--guidance_scale", "9.0"]), mean)
    assert pixels(tmp_path / "a" / "images/00000_0000.png").shape == (32, 32, 3)
    assert a["images"][0]["scores"]["mean"] != b["images"][0]["scores"]["mean"]  # the guidance reaches the model
