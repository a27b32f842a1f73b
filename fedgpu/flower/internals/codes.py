"""Flower's codes a fedgpu failure is read and written in (flwr 1.42; ``flwr.common.constant`` is not public)."""

from flwr.common.constant import ErrorCode, SubStatus

__all__ = ["ErrorCode", "SubStatus"]
