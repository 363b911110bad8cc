import os

import torch

# Small CPU-bound tests: one thread is faster than contending for the two cores, and deterministic.
torch.set_num_threads(int(os.environ.get("SOARFLOW_TEST_THREADS", "1")))
