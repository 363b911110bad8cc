import os

import torch
from hypothesis import settings

# Property tests explore the same examples on every run, so a CI result never depends on luck; new examples come
# from changing the tests, not from reruns. (A random run found the sigma(1) > 1 rounding fixed in flow.py.)
settings.register_profile("soarflow", derandomize=True, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "soarflow"))

# Small CPU-bound tests: one thread is faster than contending for the two cores, and deterministic.
torch.set_num_threads(int(os.environ.get("SOARFLOW_TEST_THREADS", "1")))
