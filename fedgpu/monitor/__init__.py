"""Monitoring of a run's processes (host memory); never imports torch."""
