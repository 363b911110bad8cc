"""The training loop on a toy task: objective wiring, learning, checkpoints/resume, EMA, outputs, safety."""

from __future__ import annotations

import torch
import pytest
from safetensors.torch import load_file

from soarflow.objective import sft_loss
from soarflow.train import TrainResult, load_config, train
from soarflow.train.checkpoint import TRAINABLE_FILE, list_checkpoints
from soarflow.train.config import resolved_for_device

from .toy_task import ToyTask


def config(tmp_path, name="run", *overrides):
    return load_config(
        None,
        [
            "--output_dir",
            str(tmp_path / name),
            "--train_batch_size",
            "4",
            "--max_train_steps",
            "3",
            "--report_to",
            "none",
            "--show_progress",
            "false",
            "--checkpointing_steps",
            "0",
            "--soar.num_aux",
            "2",
            "--soar.rollout_steps",
            "4",
            "--learning_rate",
            "1e-2",
            *overrides,
        ],
    )


def weights(result: TrainResult) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in result.model.state_dict().items()}


def assert_same(a: dict, b: dict, exact=True):
    assert a.keys() == b.keys()
    for k in a:
        if exact:
            assert torch.equal(a[k], b[k]), k
        else:
            torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)


def test_soar_with_lambda_zero_is_sft(tmp_path):
    sft = train(config(tmp_path, "sft", "--method", "sft"), task=ToyTask())
    soar0 = train(config(tmp_path, "soar0", "--method", "soar", "--soar.lambda_aux", "0"), task=ToyTask())
    soar = train(config(tmp_path, "soar", "--method", "soar"), task=ToyTask())
    assert_same(weights(sft), weights(soar0))
    assert [h["loss"] for h in sft.history] == [h["loss"] for h in soar0.history]
    assert soar.history[0]["num_aux_points"] == 8 and sft.history[0]["num_aux_points"] == 0
    assert not torch.equal(weights(sft)["net.0.weight"], weights(soar)["net.0.weight"])


@pytest.mark.parametrize("method", ["sft", "soar"])
def test_loss_decreases_on_a_fixed_batch(tmp_path, method):
    # dataset == one batch, so every step sees the same samples (fresh noise and t each step)
    task = ToyTask(n=8)
    torch.manual_seed(0)
    model = task.build_model()
    data = task.collate([task.train_dataset()[i] for i in range(8)])
    x0, cond = data["x0"], data["cond"]
    g = torch.Generator().manual_seed(1)
    noise, t = torch.randn((64, *x0.shape[1:]), generator=g), torch.rand(64, generator=g)

    def eval_loss(m):  # flow-matching loss at fixed (noise, t): a noise-free measure of fit
        with torch.no_grad():
            return float(sft_loss(m, x0.repeat(8, 1, 1, 1), cond.repeat(8, 1), noise=noise, t=t).loss)

    before = eval_loss(model)
    cfg = config(
        tmp_path,
        method,
        "--method",
        method,
        "--max_train_steps",
        "100",
        "--learning_rate",
        "1e-2",
        "--train_batch_size",
        "8",
        "--weighting_scheme",
        "none",
        "--soar.shift",
        "1",
    )
    result = train(cfg, task=task, model=model)
    assert result.model is model and result.global_step == 100 and len(result.history) == 100
    assert eval_loss(result.model) < 0.7 * before
    losses = torch.tensor([h["main_loss"] for h in result.history])
    assert losses[-20:].mean() < losses[:20].mean()


def test_result_and_outputs(tmp_path):
    cfg = config(
        tmp_path,
        "run",
        "--max_train_steps",
        "4",
        "--validation_steps",
        "2",
        "--report_to",
        "tensorboard",
        "--logging_steps",
        "2",
        "--lr_scheduler",
        "linear",
        "--lr_warmup_steps",
        "1",
    )
    result = train(cfg, task=ToyTask())
    out = tmp_path / "run"
    assert result.output_dir == out and result.global_step == 4 and result.wall_time_s > 0
    assert [h["step"] for h in result.history] == [2, 4]
    for key in ("loss", "main_loss", "aux_loss", "lr", "grad_norm", "rollout_deviation"):
        assert key in result.history[0]
    assert result.history[1]["lr"] < result.history[0]["lr"]  # linear decay after warmup
    # config.yaml is the config with the layout `soar.reuse_main_output: auto` resolved to on this device (a CPU)
    assert cfg.soar.reuse_main_output == "auto"
    recorded = load_config(out / "config.yaml")
    assert recorded.soar.reuse_main_output is True and recorded == resolved_for_device(cfg, "cpu")
    assert (out / "model" / "toy.safetensors").is_file()
    assert sorted(p.name for p in (out / "validation").iterdir()) == ["step_000002.png", "step_000004.png"]
    from PIL import Image

    assert Image.open(out / "validation" / "step_000004.png").size[0] > 100

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = list((out / "logs").rglob("events.out.tfevents*"))
    assert events
    tags = {"scalars": set(), "images": set()}
    for ev in events:
        acc = EventAccumulator(str(ev), size_guidance={"images": 0})
        acc.Reload()
        tags["scalars"] |= set(acc.Tags()["scalars"])
        tags["images"] |= set(acc.Tags()["images"])
    assert {"loss", "main_loss", "aux_loss", "lr"} <= tags["scalars"]
    assert any(t.startswith("validation") for t in tags["images"])


def test_resume_reproduces_the_uninterrupted_run(tmp_path):
    # accumulation, EMA, warmup+cosine, stochastic rollout paths and condition dropout: all must resume exactly
    extra = [
        "--max_train_steps",
        "6",
        "--checkpointing_steps",
        "2",
        "--gradient_accumulation_steps",
        "2",
        "--use_ema",
        "--ema_decay",
        "0.9",
        "--lr_scheduler",
        "cosine",
        "--lr_warmup_steps",
        "2",
        "--soar.num_rollout_paths",
        "2",
        "--cond_dropout",
        "0.25",
        "--data.n",
        "12",
    ]
    full = train(config(tmp_path, "full", *extra), task=ToyTask(n=12))

    with pytest.raises(RuntimeError, match="simulated crash"):
        train(config(tmp_path, "cut", *extra), task=ToyTask(n=12, fail_after=9))  # dies in step 5
    assert [p.name for p in list_checkpoints(tmp_path / "cut")] == ["checkpoint-2", "checkpoint-4"]
    resumed = train(config(tmp_path, "cut", *extra, "--resume_from_checkpoint", "latest"), task=ToyTask(n=12))
    assert resumed.resumed_from == tmp_path / "cut" / "checkpoint-4" and resumed.global_step == 6
    assert_same(weights(full), weights(resumed))
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in full.history[4:]]

    # a named checkpoint, into a new folder
    again = train(
        config(tmp_path, "from2", *extra, "--resume_from_checkpoint", str(tmp_path / "full" / "checkpoint-2")),
        task=ToyTask(n=12),
    )
    assert_same(weights(full), weights(again))


def test_checkpoints_total_limit(tmp_path):
    train(
        config(
            tmp_path, "run", "--max_train_steps", "5", "--checkpointing_steps", "1", "--checkpoints_total_limit", "2"
        ),
        task=ToyTask(),
    )
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["checkpoint-4", "checkpoint-5"]
    assert not list((tmp_path / "run").glob("*.tmp"))


def test_checkpoint_holds_only_trainable_parameters(tmp_path):
    task = ToyTask()
    model = task.build_model()
    model.net[0].requires_grad_(False)  # as with LoRA: part of the model is frozen
    frozen = model.net[0].weight.detach().clone()
    result = train(config(tmp_path, "run", "--checkpointing_steps", "3"), task=task, model=model)
    saved = load_file(str(tmp_path / "run" / "checkpoint-3" / TRAINABLE_FILE))
    assert set(saved) == {"net.2.weight", "net.2.bias"}
    assert torch.equal(saved["net.2.weight"], result.model.net[2].weight.detach())
    assert torch.equal(result.model.net[0].weight, frozen)


def test_ema_weights_follow_diffusers_ema(tmp_path):
    # the training trajectory does not depend on EMA, so runs of 1, 2, 3 steps give theta_1..theta_3
    thetas = [
        weights(train(config(tmp_path, f"raw{n}", "--max_train_steps", str(n)), task=ToyTask())) for n in (1, 2, 3)
    ]
    ema = weights(train(config(tmp_path, "ema", "--use_ema", "--ema_decay", "0.9"), task=ToyTask()))
    for k in ema:
        # EMAModel: decay_n = min(0.9, (1 + m)/(10 + m)), m = n - 1: 0, 2/11, 3/12
        expect = thetas[0][k]
        for n, d in ((2, 2 / 11), (3, 3 / 12)):
            expect = d * expect + (1 - d) * thetas[n - 1][k]
        torch.testing.assert_close(ema[k], expect, rtol=1e-6, atol=1e-7)
    assert not torch.equal(ema["net.0.weight"], thetas[2]["net.0.weight"])


def test_output_dir_safety(tmp_path):
    cfg = config(tmp_path, "run", "--checkpointing_steps", "3")
    train(cfg, task=ToyTask())
    out = tmp_path / "run"
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(ValueError, match="already holds this run.*--resume_from_checkpoint latest"):
        train(cfg, task=ToyTask())
    with pytest.raises(ValueError, match="different run.*learning_rate"):
        train(cfg.replace(learning_rate=5e-3), task=ToyTask())
    with pytest.raises(ValueError, match="different config.*learning_rate"):
        train(cfg.replace(learning_rate=5e-3, resume_from_checkpoint="latest"), task=ToyTask())
    with pytest.raises(FileNotFoundError, match="checkpoint-7"):
        train(cfg.replace(resume_from_checkpoint="checkpoint-7"), task=ToyTask())
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before  # nothing written or lost

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty and holds no soarflow run"):
        train(cfg.replace(output_dir=str(foreign)), task=ToyTask())


def test_corrupt_checkpoint_is_named(tmp_path):
    cfg = config(tmp_path, "run", "--checkpointing_steps", "3")
    train(cfg, task=ToyTask())
    ckpt = tmp_path / "run" / "checkpoint-3"
    (ckpt / TRAINABLE_FILE).write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match=f"checkpoint {ckpt} is corrupt"):
        train(cfg.replace(output_dir=str(tmp_path / "new"), resume_from_checkpoint=str(ckpt)), task=ToyTask())
    (ckpt / "trainer_state.json").unlink()
    with pytest.raises(ValueError, match=f"checkpoint {ckpt} is corrupt or incomplete"):
        train(cfg.replace(output_dir=str(tmp_path / "new"), resume_from_checkpoint=str(ckpt)), task=ToyTask())
    assert not (tmp_path / "new").exists()


def test_bf16_mixed_precision_runs(tmp_path):
    result = train(config(tmp_path, "bf16", "--mixed_precision", "bf16", "--max_train_steps", "2"), task=ToyTask())
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in result.history)
    # and accelerate's state is reset, so the next run may use another precision
    train(config(tmp_path, "fp32", "--max_train_steps", "1"), task=ToyTask())


def test_clear_errors_for_unavailable_features(tmp_path):
    pytest.importorskip("torch")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        with pytest.raises(ValueError, match="bitsandbytes"):
            train(config(tmp_path, "a", "--use_8bit_adam"), task=ToyTask())
    with pytest.raises(ValueError, match="gradient_checkpointing"):
        train(config(tmp_path, "b", "--gradient_checkpointing"), task=ToyTask())
    with pytest.raises(ValueError, match="train_batch_size"):
        train(config(tmp_path, "c", "--train_batch_size", "64"), task=ToyTask())


def test_resume_latest_without_checkpoints(tmp_path):
    # nothing to resume in a new folder: a fresh run (handy for preemptible jobs that always pass 'latest')
    cfg = config(tmp_path, "run", "--resume_from_checkpoint", "latest")
    result = train(cfg, task=ToyTask())
    assert result.resumed_from is None and result.global_step == 3
    assert result.model_path == tmp_path / "run" / "model"
    # ... but a finished run without checkpoints is not silently re-run over its output
    with pytest.raises(ValueError, match="finished run without checkpoints"):
        train(cfg, task=ToyTask())


@pytest.mark.parametrize("name", ["constant", "constant_with_warmup", "linear", "cosine"])
def test_lr_schedules_match_diffusers(name):
    get_scheduler = pytest.importorskip("diffusers.optimization").get_scheduler
    from soarflow.train.trainer import lr_lambda

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    ref = get_scheduler(name, opt, num_warmup_steps=3, num_training_steps=10)
    ours = lr_lambda(name, 3, 10)
    for n in range(12):
        assert ours(n) == pytest.approx(opt.param_groups[0]["lr"], abs=1e-12), n
        opt.step()
        ref.step()


class BucketedToyTask(ToyTask):
    """A task that picks its own global batches (as the diffusers tasks do for aspect-ratio buckets)."""

    def batch_indices(self, dataset, global_batch, seed, epoch):
        evens = [i for i in range(len(dataset)) if i % 2 == 0]
        odds = [i for i in range(len(dataset)) if i % 2 == 1]
        return [evens[:global_batch], odds[:global_batch], odds[global_batch : global_batch + 1]]

    def data_summary(self):
        return "0 bad samples skipped"


def test_trainer_uses_task_batch_indices_and_reports_data_summary(tmp_path):
    task = BucketedToyTask()
    result = train(config(tmp_path, "bucketed", "--max_train_steps", "2"), task=task)
    # Batches come from the task (incomplete ones dropped), in its order: all even, then all odd indices.
    assert task.seen_indices == [[0, 2, 4, 6], [1, 3, 5, 7]]
    assert result.data_summary == "0 bad samples skipped"


def test_step_callback_sees_the_weights_the_run_would_save(tmp_path):
    # With use_ema the callback (a study's evaluation) must see the EMA weights, then training goes on with the
    # raw ones: the callback at the last step sees exactly the saved (EMA) model, and the raw run is unaffected.
    seen = {}

    def callback(step, model):
        seen[step] = {k: v.detach().clone() for k, v in model.state_dict().items()}

    ema = train(config(tmp_path, "ema_cb", "--use_ema", "--ema_decay", "0.9"), task=ToyTask(), step_callback=callback)
    assert_same(seen[3], weights(ema))
    # the raw weights are put back after every callback: an EMA run without callbacks saves the same EMA
    ema_alone = train(config(tmp_path, "ema_alone", "--use_ema", "--ema_decay", "0.9"), task=ToyTask())
    assert_same(weights(ema_alone), weights(ema))
    raw = weights(train(config(tmp_path, "raw_cb"), task=ToyTask()))
    assert not torch.equal(seen[3]["net.0.weight"], raw["net.0.weight"])
    seen.clear()
    plain = train(config(tmp_path, "plain_cb"), task=ToyTask(), step_callback=callback)
    assert_same(seen[3], weights(plain))
    assert_same(weights(plain), raw)  # the callback does not disturb training
