"""An exception class for tests/test_isolation.py.

The test process must never import this module: only the isolated child does.
"""


class ProbeError(Exception):
    """Raised in a child; its module is not loaded in the parent."""
