"""The built-in digits DiT: shipped weights load, sample recognisable digits, and stay small."""
import time

import pytest
import torch

pytest.importorskip("sklearn")

from xdit_compile.builtin import digits as D  # noqa: E402


def test_weights_are_small():
    files = list(D.TRANSFORMER_DIR.glob("*.safetensors"))
    assert len(files) == 1, files
    assert files[0].stat().st_size < 10 * 2**20
    assert (D.TRANSFORMER_DIR / "config.json").exists()


def test_null_label_row():
    m = D.load_transformer()
    for block in m.transformer_blocks:
        emb = block.norm1.emb.class_embedder
        assert emb.embedding_table.num_embeddings == D.NULL_LABEL + 1 and emb.dropout_prob == 0.0


def test_samples_are_recognisable():
    torch.set_num_threads(2)
    m = D.load_transformer()
    labels = torch.arange(10).repeat_interleave(10)          # 100 samples, 10 per class
    t0, c0 = time.time(), time.process_time()
    imgs = D.sample(m, labels, steps=20, guidance=4.0, seed=0)
    dt, dc = time.time() - t0, time.process_time() - c0
    assert imgs.shape == (100, 1, 16, 16) and imgs.min() >= 0 and imgs.max() <= 1
    acc = D.accuracy(imgs, labels)
    print(f"sampling 100 images: {dt:.1f}s wall, {dc:.1f}s CPU, accuracy {acc:.3f}")
    assert acc >= 0.9
