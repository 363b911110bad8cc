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


@pytest.fixture
def ran_cells(monkeypatch):
    """The labels of the cells the study trains or evaluates (its `run_cell` calls), in order."""
    from soarflow.study import runner

    ran = []
    real_run_cell = runner.run_cell

    def counting(spec, cell, *args, **kwargs):
        ran.append(cell.label)
        return real_run_cell(spec, cell, *args, **kwargs)

    monkeypatch.setattr(runner, "run_cell", counting)
    return ran
