"""untouched: a NumPy-only Flower app that fedgpu must never write into."""
