"""A task module that exists but does not import: its dependency is missing."""

import no_such_dependency  # noqa: F401

from fedgpu.tasks.digits import DigitsTask


class BrokenDigits(DigitsTask):
    name = "broken-digits"
