"""A NumPy-only Flower app whose ClientApp hangs on one node."""
