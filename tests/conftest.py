import os

# Tiny test models gain nothing from threads, and when the cores are shared an
# oversubscribed OpenMP pool is 10-50x slower. Subprocesses (CLI, torchrun) inherit this.
os.environ["OMP_NUM_THREADS"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture
def tiny_model_cfg():
    from llmforge.config import ModelConfig
    return ModelConfig(vocab_size=97, n_layer=2, n_head=4, n_kv_head=2, d_model=32, max_seq_len=64)


class _NoText:
    """A tokenizer stand-in for engine tests on random weights: no text, no special tokens."""

    def decode(self, ids) -> str:
        return ""

    def token_id(self, name: str) -> int:
        raise KeyError(name)


@pytest.fixture
def no_text():
    return _NoText()
