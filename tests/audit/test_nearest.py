"""auditing.nearest: faiss's exact index and scikit-learn's brute force find the same neighbours (real images:
scikit-learn's digits), and a set searched in itself leaves each row out of its own list."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.datasets import load_digits

from transferkit.auditing import nearest as nn


@pytest.fixture(scope="module")
def digits() -> np.ndarray:
    x = load_digits().data.astype(np.float32)
    return nn.l2_normalise(x - x.mean(0))  # centred: cosine neighbours that differ


@pytest.mark.parametrize("self_search", [False, True])
def test_faiss_and_scikit_learn_agree(digits, monkeypatch, self_search):
    base, query = digits, (digits if self_search else digits[:300])
    monkeypatch.setattr(nn, "FAISS_FROM", 10**12)
    sk_sims, sk_idx = nn.nearest(base, query, 7, self_search=self_search)
    monkeypatch.setattr(nn, "FAISS_FROM", 1)
    fa_sims, fa_idx = nn.nearest(base, query, 7, self_search=self_search)
    assert sk_idx.shape == fa_idx.shape == (len(query), 7)
    np.testing.assert_allclose(fa_sims, sk_sims, atol=1e-5)  # the same similarities, most similar first
    assert (np.diff(fa_sims, axis=1) <= 1e-6).all()
    assert (fa_idx == sk_idx).mean() > 0.99  # the same rows, but for ties
    brute = query @ base.T
    np.testing.assert_allclose(np.take_along_axis(brute, fa_idx, 1), fa_sims, atol=1e-5)
    if self_search:
        assert not (fa_idx == np.arange(len(query))[:, None]).any()
        assert not (sk_idx == np.arange(len(query))[:, None]).any()


def test_an_exact_copy_crowding_out_a_row_still_leaves_k(digits):
    x = np.concatenate([digits[:50], digits[:1], digits[:1]])  # row 0 three times: its own entry may not come first
    sims, idx = nn.nearest(x, x, 2, self_search=True)
    assert idx.shape == (52, 2) and not (idx == np.arange(52)[:, None]).any()
    assert np.allclose(sims[[0, 50, 51]], 1.0, atol=1e-5)  # each copy's nearest are the other two
