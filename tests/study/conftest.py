import pytest
import torch

from soarflow.tasks.shapes import ShapesDataSection, ShapesModelSection, ShapesTask


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    """A tiny random shapes model (one MMDiT block), saved as the base that `study_testing.write_study` names."""
    task = ShapesTask(
        ShapesModelSection(pretrained=None, architecture="mmdit", hidden_size=32, depth=1, num_heads=2),
        ShapesDataSection(),
    )
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("base") / "tiny.safetensors"
    task.save_model(task.build_model(), path)
    return path
