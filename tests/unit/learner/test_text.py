"""The frozen MiniLM sentence encoder (the real one, from its PyPI package) and its caches."""

from pathlib import Path

import numpy as np
import pytest
from conftest import HashEmbedder

from learner.text import EmbeddingTable, SentenceEncoder


@pytest.fixture(scope="module")
def encoder() -> SentenceEncoder:
    return SentenceEncoder()


def test_minilm_embeddings_are_unit_384d_and_meaningful(encoder: SentenceEncoder) -> None:
    texts = ["open the drawer", "pull the drawer open", "press the button from the top"]
    v = encoder.embed(texts)
    assert v.shape == (3, 384) and v.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    assert v[0] @ v[1] > v[0] @ v[2]  # paraphrases are closer than different tasks


def test_each_instruction_goes_through_bert_once(encoder: SentenceEncoder) -> None:
    before = encoder.encoder_runs
    a = encoder.embed(["put the puck on the shelf", "put the puck on the shelf"])
    b = encoder.embed(["put the puck on the shelf"])
    assert encoder.encoder_runs - before == 1
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[0], a[1])
    assert encoder.embed([]).shape == (0, 384)


def test_disk_cache_spares_the_next_process_the_model(tmp_path: Path, encoder: SentenceEncoder) -> None:
    first = SentenceEncoder(cache_dir=tmp_path)
    first._model, first._tokenizer = encoder._model, encoder._tokenizer  # reuse the loaded BERT: keeps the test fast
    v = first.embed(["close the box"])
    second = SentenceEncoder(cache_dir=tmp_path)
    np.testing.assert_array_equal(second.embed(["close the box"]), v)
    assert second.encoder_runs == 0 and second._model is None
    assert set(second.table()) == {"close the box"}


def test_embedding_table_round_trip_and_fallback(tmp_path: Path) -> None:
    fake = HashEmbedder()
    table = EmbeddingTable({"open the drawer": fake.embed(["open the drawer"])[0]})
    table.save(tmp_path / "t.npz")
    loaded = EmbeddingTable.load(tmp_path / "t.npz")
    np.testing.assert_array_equal(loaded.embed(["open the drawer"]), fake.embed(["open the drawer"]))
    with pytest.raises(KeyError, match="no embedding"):
        loaded.embed(["unknown"])
    with_fallback = EmbeddingTable.load(tmp_path / "t.npz", fallback=HashEmbedder)
    np.testing.assert_array_equal(with_fallback.embed(["unknown"]), fake.embed(["unknown"]))
    assert "unknown" in with_fallback and len(with_fallback) == 2
