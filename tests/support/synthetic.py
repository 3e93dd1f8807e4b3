"""Data made in the test: small image sets whose classes a tiny net separates in an epoch."""

import numpy as np


def generated_npz(path, n_train=256, n_test=64, seed=0):
    """8x8 one-channel images in [0, 1]: class c lights row c % 8 (and column c - 8 for c >= 8)."""
    rng = np.random.default_rng(seed)

    def make(n):
        y = rng.integers(0, 10, n)
        x = rng.random((n, 1, 8, 8)).astype(np.float32) * 0.3
        for i, c in enumerate(y):
            x[i, 0, c % 8, :] += 0.7
            if c >= 8:
                x[i, 0, :, c - 8] += 0.7
        return np.clip(x, 0, 1), y

    xtr, ytr = make(n_train)
    xte, yte = make(n_test)
    np.savez(path, x_train=xtr, y_train=ytr, x_test=xte, y_test=yte)
    return path
