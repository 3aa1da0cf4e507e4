"""Errors a user can act on.

The CLI maps each class to an exit code and prints ``str(error)`` as one line (no traceback
unless ``--debug``). Messages say what is wrong and how to fix it.
"""


class EdgecError(Exception):
    """Base class; ``exit_code`` is what the CLI exits with."""

    exit_code = 1


class ConfigError(EdgecError):
    """A config value or CLI option is invalid."""

    exit_code = 2


class InputError(EdgecError):
    """An input file, data set, model or weights file is missing or unusable."""

    exit_code = 2


class ExportError(EdgecError):
    """Conversion to a target format failed."""

    exit_code = 1


class RunError(EdgecError):
    """A run failed a check (accuracy, agreement, budget) or a stage failed."""

    exit_code = 1
