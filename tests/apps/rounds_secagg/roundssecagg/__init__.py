"""roundssecagg: Flower's SecAgg+ pattern on a NumPy model."""
