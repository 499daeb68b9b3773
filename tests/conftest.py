import os

import pytest
import torch

# two cores: keep each test process from oversubscribing them
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture
def tiny_model_cfg():
    from llmforge.config import ModelConfig
    return ModelConfig(vocab_size=97, n_layer=2, n_head=4, n_kv_head=2, d_model=32, max_seq_len=64)
