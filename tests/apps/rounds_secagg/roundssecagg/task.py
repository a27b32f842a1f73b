"""A linear model y = X w on a few synthetic points per partition (NumPy only, offline)."""

import numpy as np

TRUE_WEIGHTS = np.array([1.0, -2.0, 0.5])


def load_data(partition_id: int, num_examples: int = 20):
    rng = np.random.default_rng(partition_id)
    x = rng.normal(size=(num_examples, TRUE_WEIGHTS.size))
    return x, x @ TRUE_WEIGHTS + 0.01 * rng.normal(size=num_examples)


def mse(weights: np.ndarray, x: np.ndarray, y: np.ndarray) -> float:
    return float(np.mean((x @ weights - y) ** 2))


def step(weights: np.ndarray, x: np.ndarray, y: np.ndarray, lr: float = 0.1) -> np.ndarray:
    return weights - lr * 2 * x.T @ (x @ weights - y) / len(y)
