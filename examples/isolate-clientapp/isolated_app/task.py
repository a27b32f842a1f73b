"""Data and model shapes, in NumPy only: imported by the ServerApp and the ClientApp.

Data: scikit-learn's bundled 8x8 digits (no download). Model: a 64-64-10 MLP,
whose PyTorch version lives in client_app.py; this module never imports torch.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

HIDDEN = 64
CLASSES = 10
PARTITION_SEED = 42


@lru_cache(maxsize=1)
def _splits() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    x = (x - x.mean()) / x.std()  # standardised pixels: FedAvg learns much faster
    y = digits.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.2, stratify=y, random_state=0)
    return x_train, y_train, x_test, y_test


def test_split() -> tuple[np.ndarray, np.ndarray]:
    """The held-out split the ServerApp evaluates the global model on."""
    _, _, x_test, y_test = _splits()
    return x_test, y_test


def load_partition(partition_id: int, num_partitions: int, split: str) -> tuple[np.ndarray, np.ndarray]:
    """One client's IID share of the "train" or "test" split."""
    if not 0 <= partition_id < num_partitions:
        raise ValueError(f"partition-id {partition_id} is not in [0, {num_partitions})")
    x_train, y_train, x_test, y_test = _splits()
    x, y = (x_train, y_train) if split == "train" else (x_test, y_test)
    order = np.random.default_rng(PARTITION_SEED).permutation(len(y))
    share = np.array_split(order, num_partitions)[partition_id]
    return x[share], y[share]


def initial_arrays(seed: int) -> list[np.ndarray]:
    """Initial weights in the order of the PyTorch model's state_dict.

    Same scheme as ``torch.nn.Linear``'s default: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
    """
    rng = np.random.default_rng(seed)
    arrays = []
    for fan_in, fan_out in ((64, HIDDEN), (HIDDEN, CLASSES)):
        bound = 1.0 / np.sqrt(fan_in)
        arrays.append(rng.uniform(-bound, bound, (fan_out, fan_in)).astype(np.float32))
        arrays.append(rng.uniform(-bound, bound, (fan_out,)).astype(np.float32))
    return arrays


def evaluate_numpy(arrays: list[np.ndarray], x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """(loss, accuracy) of the MLP on (x, y), computed with NumPy."""
    w1, b1, w2, b2 = arrays
    logits = np.maximum(x @ w1.T + b1, 0.0) @ w2.T + b2
    logits = logits - logits.max(axis=1, keepdims=True)
    log_probs = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    loss = float(-log_probs[np.arange(len(y)), y].mean())
    accuracy = float((logits.argmax(axis=1) == y).mean())
    return loss, accuracy
