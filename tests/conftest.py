import os

import pytest
import torch
from diffusers_testing import build_tiny_sd3_pipeline, make_imagefolder
from hypothesis import settings

# Property tests explore the same examples on every run, so a CI result never depends on luck; new examples come
# from changing the tests, not from reruns. (A random run found the sigma(1) > 1 rounding fixed in flow.py.)
settings.register_profile("soarflow", derandomize=True, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "soarflow"))

# Small CPU-bound tests: one thread is faster than contending for the two cores, and deterministic.
torch.set_num_threads(int(os.environ.get("SOARFLOW_TEST_THREADS", "1")))


@pytest.fixture(autouse=True)
def restore_environ():
    """Put os.environ back after every test: in-process accelerate runs leave ACCELERATE_*, RANK, MASTER_PORT...
    behind, and later tests (in-process or launched) would inherit them."""
    saved = dict(os.environ)
    yield
    if os.environ != saved:
        os.environ.clear()
        os.environ.update(saved)


@pytest.fixture(scope="module")
def sd3_path(tmp_path_factory):
    """A tiny random SD3 pipeline folder (diffusers_testing), built once per test module."""
    return build_tiny_sd3_pipeline(tmp_path_factory.mktemp("sd3") / "pipe")


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """An imagefolder of 4 captioned 40x48 images (diffusers_testing.make_imagefolder), built once per test module;
    a module that needs other images defines its own `images`."""
    return make_imagefolder(tmp_path_factory.mktemp("data") / "imgs")
