import json

import numpy as np
import pytest
from PIL import Image

from soarflow.commands.eval_shapes import main

SMALL = ["--prompts_per_family", "4", "--images_per_prompt", "2"]


@pytest.fixture()
def real_dir(tmp_path):
    folder = tmp_path / "real"
    assert main(["--write_real", str(folder), *SMALL]) == 0
    return folder


def test_cli_scores_real_renders(real_dir, tmp_path, capsys):
    files = sorted(p.name for p in real_dir.iterdir())
    assert len(files) == 48 and files[0] == "0000_0.png" and files[-1] == "0023_1.png"
    out_json, out_jsonl, sheet = tmp_path / "s.json", tmp_path / "r.jsonl", tmp_path / "sheet.png"
    rc = main(
        ["--images", str(real_dir), *SMALL, "--json", str(out_json), "--jsonl", str(out_jsonl), "--sheet", str(sheet)]
    )
    assert rc == 0
    assert "overall" in capsys.readouterr().out
    summary = json.loads(out_json.read_text())
    assert summary["overall"] >= 0.98 and min(summary["per_family"].values()) >= 0.98
    assert len(out_jsonl.read_text().splitlines()) == 48
    assert Image.open(sheet).size[0] > 100
    # outputs are never overwritten
    assert main(["--images", str(real_dir), *SMALL, "--json", str(out_json)]) == 2
    assert "already exists" in capsys.readouterr().err


def test_cli_bad_inputs(real_dir, tmp_path, capsys):
    assert main(["--images", str(tmp_path / "nope"), *SMALL]) == 2
    assert "nope" in capsys.readouterr().err
    (real_dir / "0005_1.png").unlink()
    assert main(["--images", str(real_dir), *SMALL]) == 2
    assert "0005_1.png" in capsys.readouterr().err
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(real_dir / "0005_1.png")
    assert main(["--images", str(real_dir), *SMALL]) == 2
    err = capsys.readouterr().err
    assert "0005_1.png" in err and "20x20" in err
    assert main(["--write_real", str(real_dir), *SMALL]) == 2  # refuses to overwrite
    assert "already exists" in capsys.readouterr().err


def test_cli_checkpoint(tmp_path, capsys):
    try:
        from soarflow.models.embedded import save_checkpoint
        from soarflow.models.mmdit import MMDiT, MMDiTConfig
        from soarflow.models.embedded import load_shapes_model  # noqa: F401
        from soarflow.shapes.generate import generate_images  # noqa: F401
    except ImportError as e:
        pytest.skip(f"shapes model not available: {e}")
    import torch

    torch.manual_seed(0)
    path = save_checkpoint(MMDiT(MMDiTConfig(hidden_size=32, depth=1, num_heads=2)), tmp_path / "tiny.safetensors")
    args = ["--checkpoint", str(path), "--prompts_per_family", "1", "--images_per_prompt", "1", "--num_steps", "2"]
    assert main([*args, "--json", str(tmp_path / "s.json")]) == 0
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["num_images"] == 6 and 0 <= summary["overall"] <= 1
    assert main(["--checkpoint", str(tmp_path / "missing.safetensors")]) == 2
    assert "missing.safetensors" in capsys.readouterr().err


def test_flags_use_underscores_and_the_old_hyphenated_spellings_still_work(tmp_path, capsys):
    from soarflow.commands.eval_shapes import OLD_FLAGS, _new_spelling, build_parser

    help_text = build_parser().format_help()
    assert "--guidance_scale" in help_text and "--prompts_per_family" in help_text
    assert not [flag for flag in OLD_FLAGS if flag in help_text]  # hidden aliases, not listed
    old = [
        "--prompts-per-family",
        "2",
        "--images-per-prompt=3",
        "--num-steps",
        "5",
        "--cfg-scale",
        "2.5",
        "--batch-size",
        "8",
    ]
    args = build_parser().parse_args([_new_spelling(a) for a in ["--real", *old]])
    assert (args.prompts_per_family, args.images_per_prompt, args.num_steps, args.guidance_scale, args.batch_size) == (
        2,
        3,
        5,
        2.5,
        8,
    )
    assert main(["--list-prompts", *old]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 12  # 2 prompts per family
    assert main(["--write-real", str(tmp_path / "real"), "--prompts-per-family", "1", "--images-per-prompt", "1"]) == 0
    assert len(list((tmp_path / "real").iterdir())) == 6
