"""A tiny Task for the trainer tests: an MLP velocity model on random 2x4x4 "images" with a tensor condition.

Independent of the embedded model, so the trainer is tested on its own. The data has structure (x0 depends
on the condition), so training on it lowers the loss."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from soarflow.tasks import Task

SHAPE = (2, 4, 4)
COND_DIM = 4

# What the runs that two processes and one process make of the same global batch share (test_distributed.py under
# DDP, test_fsdp.py under FSDP2): SOAR with 3 auxiliary points, 2 accumulated micro-batches a step, a checkpoint
# every step, no trackers and no progress bar.
TWO_PROCESS_SOAR_RUN = [
    "--report_to",
    "none",
    "--show_progress",
    "false",
    "--checkpointing_steps",
    "1",
    "--soar.num_aux",
    "3",
    "--soar.rollout_steps",
    "4",
    "--learning_rate",
    "1e-2",
    "--gradient_accumulation_steps",
    "2",
]


class ToyVelocity(nn.Module):
    def __init__(self, hidden: int = 32):
        super().__init__()
        dim = SHAPE[0] * SHAPE[1] * SHAPE[2]
        self.net = nn.Sequential(nn.Linear(dim + 1 + COND_DIM, hidden), nn.SiLU(), nn.Linear(hidden, dim))

    def forward(self, x, sigma, cond):
        flat = torch.cat([x.flatten(1), sigma[:, None].to(x.dtype), cond.to(x.dtype)], dim=1)
        return self.net(flat).view_as(x)


class ToyDataset(torch.utils.data.Dataset):
    def __init__(self, n: int = 32, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.cond = torch.randn(n, COND_DIM, generator=g)
        proj = torch.randn(COND_DIM, SHAPE[0] * SHAPE[1] * SHAPE[2], generator=g) * 0.5
        self.x0 = torch.tanh(self.cond @ proj).view(n, *SHAPE)

    def __len__(self) -> int:
        return len(self.x0)

    def __getitem__(self, i: int) -> dict:
        return {"x0": self.x0[i], "cond": self.cond[i], "index": i, "caption": f"toy {i}"}


class ToyTask(Task):
    """A soarflow Task. `fail_after` raises after that many encode_batch calls (to
    simulate an interrupted run)."""

    def __init__(self, n: int = 32, seed: int = 0, hidden: int = 32, fail_after: int | None = None):
        self.n, self.seed, self.hidden, self.fail_after = n, seed, hidden, fail_after
        self.encoded = 0
        self.seen_indices: list[list[int]] = []

    @classmethod
    def from_config(cls, model: dict | None = None, data: dict | None = None, train_config: Any = None) -> "ToyTask":
        model, data = model or {}, data or {}
        return cls(n=data.get("n", 32), seed=data.get("seed", 0), hidden=model.get("hidden", 32))

    def build_model(self) -> nn.Module:
        return ToyVelocity(self.hidden)

    def train_dataset(self):
        return ToyDataset(self.n, self.seed)

    def collate(self, samples: Sequence[dict]) -> dict:
        return {
            k: (torch.stack([s[k] for s in samples]) if k not in ("index", "caption") else [s[k] for s in samples])
            for k in samples[0]
        }

    def encode_batch(self, batch: dict, device: torch.device):
        self.encoded += 1
        if self.fail_after is not None and self.encoded > self.fail_after:
            raise RuntimeError("simulated crash")
        self.seen_indices.append(list(batch["index"]))
        return batch["x0"].to(device), batch["cond"].to(device)

    def null_cond(self, batch_size: int, device: torch.device):
        return torch.zeros(batch_size, COND_DIM, device=device)

    def validation_images(self, model: nn.Module, device: torch.device):
        from soarflow.sampling import sample_euler

        g = torch.Generator().manual_seed(0)
        noise = torch.randn(4, *SHAPE, generator=g).to(device)
        cond = torch.randn(4, COND_DIM, generator=g).to(device)
        x = sample_euler(model, noise, cond, num_steps=4)
        images = torch.cat([x, x[:, :1]], dim=1)  # 2 channels -> 3 for the RGB grid
        return images.clamp(-1, 1), [f"sample {i}" for i in range(4)]

    def save_model(self, model: nn.Module, path: Path) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path / "toy.safetensors"))

    def load_model_weights(self, model: nn.Module, path: Path) -> None:
        model.load_state_dict(load_file(str(Path(path) / "toy.safetensors")))


def toy_reward(images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
    """A reward for method grpo on the toy task: the mean of the first channel (higher is better)."""
    return images[:, 0].flatten(1).mean(1)
