"""NumPy arrays as Flower records, with the model's own names."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from flwr.app import Array, ArrayRecord


def named_record(arrays: Mapping[str, Any] | Sequence[Any], names: Sequence[str] | None = None) -> ArrayRecord:
    """An ArrayRecord whose keys are the arrays' names (a state_dict's keys).

    ``arrays``: a mapping name -> ndarray, or a list named in order by ``names``.
    Arrays beyond ``names`` are called ``extra-<i>``, so that the server's
    reply check names what does not match instead of it being cut short.
    """
    if isinstance(arrays, Mapping):
        return ArrayRecord({name: Array(value) for name, value in arrays.items()})
    if names is None:
        return ArrayRecord(list(arrays))
    keys = [names[i] if i < len(names) else f"extra-{i}" for i in range(len(arrays))]
    return ArrayRecord({key: Array(value) for key, value in zip(keys, arrays)})
