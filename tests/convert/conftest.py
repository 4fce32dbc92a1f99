"""Shared fixtures of the convert tests: the HF tokenizer (trained once per session)."""

from __future__ import annotations

import pytest
from hf_fixtures import hf_tokenizer
from tokenizers import Tokenizer as HFTokenizer


@pytest.fixture(scope="session")
def tokenizer() -> HFTokenizer:
    return hf_tokenizer()
