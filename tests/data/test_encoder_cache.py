"""`soarflow cache` on the tiny SD3 and FLUX pipelines: a run on the complete cache builds no text encoder and no VAE
encoder and opens no image, and its losses equal the uncached run's; entries are named by content (a changed
caption or image is encoded again, nothing else); corrupt shards and entries are found and encoded again or
refused with an error naming them; bf16 storage; the decoder-only VAE."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")

from diffusers_testing import build_tiny_flux_pipeline, make_imagefolder, tiny_train_args  # noqa: E402
from launching import launch_two_processes  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from soarflow.commands.cache import main as cache_main  # noqa: E402
from soarflow.data import CorruptEntry, latent_key, text_key  # noqa: E402
from soarflow.data.encode_cache import fill_cache  # noqa: E402
from soarflow.tasks.registry import build_task  # noqa: E402
from soarflow.train import load_config, train  # noqa: E402

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def flux_path(tmp_path_factory):
    return build_tiny_flux_pipeline(tmp_path_factory.mktemp("flux") / "pipe")


@pytest.fixture
def images(tmp_path):
    return make_imagefolder(tmp_path / "imgs", sizes=((40, 48), (32, 32)))


def config(tmp_path, name, task, pipe, images, *extra):
    return load_config(
        None,
        [
            *tiny_train_args(
                task,
                tmp_path / name,
                pipe,
                images,
                method="soar",
                checkpointing_steps=0,
                learning_rate="1e-3",
                validation_prompts=["a red circle", "a blue square"],
            ),
            "--seed",
            "3",
            "--logging_steps",
            "1",
            "--validation_steps",
            "2",
            "--soar.num_aux",
            "2",
            "--soar.rollout_steps",
            "4",
            "--soar.guidance_scale",
            "2.0",
            *extra,
        ],
    )


def forbid_encoders_and_images(monkeypatch):
    """Any construction or loading of a text encoder, of the VAE (encoder), of the full pipeline, or any
    PIL.Image.open raises."""
    import diffusers
    import PIL.Image
    import transformers
    from diffusers.models.autoencoders import vae as vae_module

    def forbidden(what):
        def fail(*args, **kwargs):
            raise AssertionError(f"{what} was used although the encoder cache is complete")

        return fail

    for cls in (transformers.CLIPTextModel, transformers.CLIPTextModelWithProjection, transformers.T5EncoderModel):
        monkeypatch.setattr(cls, "__init__", forbidden(cls.__name__))
        monkeypatch.setattr(cls, "from_pretrained", forbidden(f"{cls.__name__}.from_pretrained"))
    monkeypatch.setattr(vae_module.Encoder, "__init__", forbidden("the VAE encoder"))
    monkeypatch.setattr(diffusers.AutoencoderKL, "__init__", forbidden("AutoencoderKL (with its encoder)"))
    for cls in (diffusers.StableDiffusion3Pipeline, diffusers.FluxPipeline):
        monkeypatch.setattr(cls, "from_pretrained", forbidden(f"{cls.__name__}.from_pretrained"))
    monkeypatch.setattr(PIL.Image, "open", forbidden("PIL.Image.open (an image decode)"))


def losses(result):
    return [h["loss"] for h in result.history]


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_training_on_a_complete_cache_builds_no_encoder_and_matches_the_uncached_loss(
    tmp_path, images, sd3_path, flux_path, family, monkeypatch
):
    pipe = sd3_path if family == "sd3" else flux_path
    plain = train(config(tmp_path, "plain", family, pipe, images))

    cached_cfg = config(
        tmp_path, "cached", family, pipe, images, f"--data.cache_dir={tmp_path / 'cache'}", "--data.cache_dtype=float32"
    )
    (tmp_path / "cached.yaml").write_text(cached_cfg.to_yaml())
    assert cache_main(["--config", str(tmp_path / "cached.yaml"), "--batch_size", "3"]) == 0
    with monkeypatch.context() as m:
        forbid_encoders_and_images(m)
        cached = train(cached_cfg)
    assert cached.global_step == 2 and cached.validation_images  # validation: decoder + cached prompts only
    np.testing.assert_allclose(losses(cached), losses(plain), rtol=1e-5, atol=1e-6)
    for (name, a), b in zip(plain.model.named_parameters(), cached.model.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6, msg=name)


def fill(cfg):
    task = build_task(cfg)
    dataset = task._dataset(task.records())
    text, latents = task.caches()
    return task, fill_cache(text, latents, dataset, list(cfg.data["validation_prompts"]), task)


def shards(root, kind):
    return sorted(root.glob(f"{kind}-*/shard-*.safetensors"))


def test_cache_is_bf16_keyed_by_content_and_resumes(tmp_path, sd3_path, images):
    cfg = config(
        tmp_path, "r", "sd3", sd3_path, images, f"--data.cache_dir={tmp_path / 'cache'}", "--data.cache_shard_size=2"
    )
    task, report = fill(cfg)
    # 4 captions + 1 more validation prompt ("a red circle" is both) + "" ; 4 images
    assert (report.text_encoded, report.latents_encoded, report.text_checked) == (6, 4, 0)
    stored = load_file(str(shards(tmp_path / "cache", "latent")[0]))
    assert all(v.dtype == torch.bfloat16 for v in stored.values())
    assert len(shards(tmp_path / "cache", "latent")) == 2  # shard_size 2: an interruption loses < 2 entries

    _, again = fill(cfg)  # nothing to do
    assert (again.text_encoded, again.latents_encoded, again.text_checked, again.latents_checked) == (0, 0, 6, 4)

    # a changed caption -> one text entry; a changed image -> one latent entry; the rest is kept
    meta = images / "metadata.jsonl"
    meta.write_text(meta.read_text().replace("a red circle", "a green circle"))
    from PIL import Image

    Image.new("RGB", (48, 40), (10, 200, 30)).save(images / "img_002.png")
    before = {p: p.stat().st_mtime_ns for p in shards(tmp_path / "cache", "latent")}
    _, changed = fill(cfg)
    assert (changed.text_encoded, changed.latents_encoded) == (1, 1)
    assert all(p.stat().st_mtime_ns == t for p, t in before.items())  # old shards untouched


def _entry_shard(cache_dir, kind, name):
    for shard in shards(cache_dir, kind):
        if any(k.startswith(name + "/") for k in load_file(str(shard))):
            return shard
    raise AssertionError(name)


def test_corrupt_shards_and_entries_are_found_and_reencoded_or_refused(tmp_path, sd3_path, images):
    cache_dir = tmp_path / "cache"
    cfg = config(tmp_path, "c", "sd3", sd3_path, images, f"--data.cache_dir={cache_dir}", "--data.cache_shard_size=2")
    task, _ = fill(cfg)
    records = task.records()
    name0 = latent_key(records[0].sha256, 32, 32)
    name1 = latent_key(records[1].sha256, 32, 32)

    # 1. a NaN in a newer copy of an entry: training refuses it with its name, `soarflow cache` re-encodes it
    good = {
        k[len(name1) + 1 :]: v
        for k, v in load_file(str(_entry_shard(cache_dir, "latent", name1))).items()
        if k.startswith(name1 + "/")
    }
    bad = {f"{name1}/{k}": v.clone() for k, v in good.items()}
    bad[f"{name1}/latent_mean"][0, 0, 0] = float("nan")
    folder = shards(cache_dir, "latent")[0].parent
    save_file(bad, str(folder / f"shard-{time.time_ns():020d}-r0.safetensors"))  # written after the others
    # 2. a text entry with the wrong shape
    cap = text_key(records[2].caption)
    wrong = {f"{cap}/encoder_hidden_states": torch.zeros(3, 32), f"{cap}/pooled_projections": torch.zeros(64)}
    save_file(wrong, str(shards(cache_dir, "text")[0].parent / f"shard-{time.time_ns():020d}-r0.safetensors"))

    trainer_task = build_task(cfg)
    dataset = trainer_task.train_dataset()
    assert not dataset.pixels  # the cache looks complete (names only are checked at start)
    batch = trainer_task.collate([dataset[1]])
    with pytest.raises(CorruptEntry, match=name1 + ".*non-finite"):
        trainer_task.encode_batch(batch, CPU)
    with pytest.raises(CorruptEntry, match=cap + ".*shape"):
        trainer_task.text_condition([records[2].caption], CPU)

    # 3. a truncated shard: set aside, its entries encoded again; every other shard is kept as it was
    victim = _entry_shard(cache_dir, "latent", name0)
    lost = {k.split("/")[0] for k in load_file(str(victim))}
    victim.write_bytes(victim.read_bytes()[:50])
    others = {p: p.read_bytes() for p in shards(cache_dir, "latent") if p != victim}
    _, report = fill(cfg)
    assert set(report.corrupt) == {name1, cap}
    assert report.latents_encoded == len(lost | {name1}) >= 2  # the truncated shard's entries and the NaN one
    assert report.text_encoded == 1
    assert victim.with_suffix(".corrupt").is_file() and not victim.exists()
    assert all(p.read_bytes() == b for p, b in others.items())
    fresh = build_task(cfg)
    ds = fresh.train_dataset()
    x0, cond = fresh.encode_batch(fresh.collate([ds[0], ds[1]]), CPU)
    assert torch.isfinite(x0).all() and cond["encoder_hidden_states"].shape[0] == 2


def test_unreadable_image_is_a_bad_sample_and_left_out_of_training(tmp_path, sd3_path, images):
    (images / "img_003.png").write_bytes((images / "img_003.png").read_bytes()[:60])  # header ok, pixels gone
    cfg = config(tmp_path, "u", "sd3", sd3_path, images, f"--data.cache_dir={tmp_path / 'cache'}")
    task, report = fill(cfg)
    assert len(report.unreadable) == 1 and task.bad_samples.count == 1  # its header reads, its pixels do not
    assert report.latents_encoded == 3
    trainer_task = build_task(cfg)
    ds = trainer_task.train_dataset()
    assert len(ds) == 3 and not ds.pixels and "img_003.png" in trainer_task.data_summary()
    strict = config(
        tmp_path, "u2", "sd3", sd3_path, images, f"--data.cache_dir={tmp_path / 'cache2'}", "--data.on_bad_sample=fail"
    )
    with pytest.raises(ValueError, match="img_003.png"):
        fill(strict)


def test_decoder_only_vae_matches_the_pipeline_vae(sd3_path, images, tmp_path):
    from diffusers import AutoencoderKL

    task = build_task(config(tmp_path, "d", "sd3", sd3_path, images))
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    ours = task.decode(z)
    assert not task.pipeline.loaded
    vae = AutoencoderKL.from_pretrained(str(sd3_path), subfolder="vae")
    shift, scale = vae.config.shift_factor, vae.config.scaling_factor
    theirs = vae.decode(z / scale + shift).sample.clamp(-1, 1)
    torch.testing.assert_close(ours, theirs)
    assert task.pipeline.latent_shape(32, 48) == (4, 32, 48)


def test_cache_command_errors_name_the_problem(tmp_path, sd3_path, images, capsys):
    cfg = config(tmp_path, "e", "sd3", sd3_path, images)
    (tmp_path / "no_cache.yaml").write_text(cfg.to_yaml())
    assert cache_main(["--config", str(tmp_path / "no_cache.yaml")]) == 2
    assert "data.cache_dir" in capsys.readouterr().err
    assert cache_main(["--config", str(tmp_path / "no_cache.yaml"), "--data.cache_dtype", "int8"]) == 2
    assert "cache_dtype" in capsys.readouterr().err
    assert json.loads(json.dumps(cfg.data))["path"] == str(images)


@pytest.mark.slow
def test_two_processes_share_the_work_and_write_the_same_entries(tmp_path, sd3_path, images):

    cfg = config(
        tmp_path, "p2", "sd3", sd3_path, images, f"--data.cache_dir={tmp_path / 'two'}", "--data.cache_dtype=float32"
    )
    (tmp_path / "two.yaml").write_text(cfg.to_yaml())
    proc = launch_two_processes(
        "-m", "soarflow", "cache", "--config", str(tmp_path / "two.yaml"), "--batch_size", "2", timeout=300
    )
    assert "rank 0: text 3 encoded" in proc.stdout and "rank 1: text 3 encoded" in proc.stdout
    assert "complete" in proc.stdout
    assert {p.name.rsplit("-", 1)[1] for p in shards(tmp_path / "two", "latent")} == {
        "r0.safetensors",
        "r1.safetensors",
    }

    one = config(
        tmp_path, "p1", "sd3", sd3_path, images, f"--data.cache_dir={tmp_path / 'one'}", "--data.cache_dtype=float32"
    )
    fill(one)
    for kind in ("text", "latent"):
        a = {k: v for p in shards(tmp_path / "two", kind) for k, v in load_file(str(p)).items()}
        b = {k: v for p in shards(tmp_path / "one", kind) for k, v in load_file(str(p)).items()}
        assert sorted(a) == sorted(b)
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
