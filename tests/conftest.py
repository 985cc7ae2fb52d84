"""Test-session settings.

One intra-op thread per process: the models under test are tiny, and the distributed tests run two
processes on CI's two cores, where two threads each would oversubscribe the machine and stall.
"""

import torch

torch.set_num_threads(1)
