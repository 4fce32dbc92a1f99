"""load_model: kernel/head selection and the errors it promises."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from bitserve.engine.loader import ModelFileNotFoundError, load_model
from bitserve.kernels.native import available_kernels


def test_missing_file_and_unknown_head_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(ModelFileNotFoundError, match=r"nope\.gguf"):
        load_model(tmp_path / "nope.gguf")
    with pytest.raises(ValueError, match="unknown head 'int4'"):
        load_model(None, head="int4")


@pytest.mark.skipif(not available_kernels(), reason="the C extension is not built")
def test_int8_head_is_made_at_load_and_close_to_f16(tiny_model_path: Path) -> None:
    f16 = load_model(tiny_model_path, head="f16")
    int8 = load_model(tiny_model_path, head="int8")
    try:
        backend = int8.model.backend
        assert backend.head_mode == "int8"
        assert backend._head_int8 is not None  # quantized at load, not on the first token
        tokens = list(range(1, 40))
        a = f16.model.forward(tokens, f16.model.new_cache(), all_logits=True)
        b = int8.model.forward(tokens, int8.model.new_cache(), all_logits=True)
        assert np.linalg.norm(a - b) / np.linalg.norm(a) < 0.02
        assert (a.argmax(-1) == b.argmax(-1)).mean() >= 0.9
        assert not np.array_equal(a, b)  # it really is a different head
    finally:
        f16.close()
        int8.close()
