"""Suite-wide settings: at most two intra-op threads (CI has two cores; more threads only contend)."""
import os

import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))
