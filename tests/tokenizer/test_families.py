"""Each ternary family's tokenizer, from the fixture metadata its real file's layout."""

from __future__ import annotations

import pytest

from bitserve.tokenizer import Tokenizer
from bitserve.tokenizer.fixtures import FAMILIES, min_vocab_size, tokenizer_metadata

ROUND_TRIP = "Hello  world,\n\tit's 12345 o'clock! naïve café 你好 😀🦙"


@pytest.mark.parametrize("family", FAMILIES)
def test_fixture_metadata_loads_and_round_trips(family: str) -> None:
    tok = Tokenizer.from_metadata(tokenizer_metadata(family))
    assert tok.vocab_size == min_vocab_size(family)
    ids = tok.encode(ROUND_TRIP)
    prefix = " " if family == "llama-spm" else ""  # SentencePiece's add_space_prefix
    assert tok.decode(ids) == prefix + ROUND_TRIP
    assert len(ids) < len(ROUND_TRIP.encode())


@pytest.mark.parametrize("family", FAMILIES)
def test_fixture_pads_to_vocab_size(family: str) -> None:
    small = Tokenizer.from_metadata(tokenizer_metadata(family))
    size = min_vocab_size(family) + 37
    big = Tokenizer.from_metadata(tokenizer_metadata(family, size))
    assert big.vocab_size == size
    assert big.encode(ROUND_TRIP) == small.encode(ROUND_TRIP)
    if family == "llama-bpe":  # LLaMA-3 keeps its 256 control tokens last
        assert (big.bos_id, big.eos_id, big.eot_id) == (size - 256, size - 255, size - 247)
    else:  # [PADn] unused tokens at the end, never produced, never shown
        assert (big.bos_id, big.eos_id, big.stop_ids) == (
            small.bos_id,
            small.eos_id,
            small.stop_ids,
        )
        assert big.id_to_piece(size - 1) == f"[PAD{size - 1}]" and big.is_special(size - 1)
        assert big.decode([size - 1]) == ""
    with pytest.raises(ValueError, match=f"below the {family} fixture"):
        tokenizer_metadata(family, min_vocab_size(family) - 1)
