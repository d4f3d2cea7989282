"""What a sampled cache's builder stores (hld.distill.signals.sampled.sampled_rows): per window, the
positions' uniforms from window_rng(window id), the ids drawn from softmax(z / tau), and importance weights
c_i p_i / q_i normalised per position; here p / q is computed from the two softmaxes in float64 (the code
uses z_i (1 - 1/tau) up to a row constant), the counts with np.unique, on several windows and row blocks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hld.distill.signals import sampled
from hld.distill.signals.sampled import draw, sampled_rows, window_rng


@pytest.mark.parametrize("tau", [1.0, 2.0, 0.7])
def test_sampled_rows_store_the_importance_weights_of_the_draws(tau, monkeypatch):
    monkeypatch.setattr(sampled, "ROWS", 3)  # blocks of 3 positions: 7 = 3 + 3 + 1 per window
    T, V, K, slots = 7, 30, 9, 9
    windows = np.array([5, 2])
    z_all = torch.randn(len(windows) * T, V, generator=torch.Generator().manual_seed(4), dtype=torch.float64) * 2
    ids, w = sampled_rows(lambda sl: z_all[sl].float(), windows, T, samples=K, tau=tau, slots=slots)
    assert ids.dtype == torch.int32 and w.dtype == torch.float32 and ids.shape == w.shape == (len(windows) * T, slots)
    for j, wid in enumerate(windows):
        u = window_rng(int(wid)).random((T, K))
        for t in range(T):
            row = j * T + t
            z = z_all[row]
            drawn = draw(z[None].float(), u[t : t + 1], tau=tau)[0].numpy()
            uniq, counts = np.unique(drawn, return_counts=True)
            p = torch.softmax(z, -1).numpy()
            q = torch.softmax(z / tau, -1).numpy()
            want = counts * p[uniq] / q[uniq]
            want /= want.sum()
            got_ids, got_w = ids[row].numpy(), w[row].double().numpy()
            n = len(uniq)
            assert list(got_ids[:n]) == list(uniq), (wid, t)
            np.testing.assert_allclose(got_w[:n], want, rtol=2e-6, atol=1e-7)
            assert (got_w[n:] == 0).all()
