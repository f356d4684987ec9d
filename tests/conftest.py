import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

from tiny import chat_rows, make_llama, make_tokenizer  # noqa: E402


@pytest.fixture
def tokenizer():
    return make_tokenizer()


@pytest.fixture
def tiny_llama():
    return make_llama(0)


@pytest.fixture
def chat_data():
    return chat_rows(6)
