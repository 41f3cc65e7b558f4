"""Exceptions raised by transferkit; the CLI turns them into one-line errors."""


class TransferkitError(Exception):
    """Base class for every error transferkit raises on purpose."""


class DataError(TransferkitError, ValueError):
    """Bad input data: unreadable image, empty class folder, bad manifest row."""


class WeightsError(TransferkitError):
    """No usable weights were found, or a weights file does not fit the model."""


class ModelError(TransferkitError, ValueError):
    """Unknown model name, layer, stage or pooling."""


class ParameterError(ModelError):
    """A parameter outside its limits (transferkit.runtime.params): names it, what it must be and what it got."""
