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
    """A parameter's value is wrong: "The 'pool' parameter of FeatureExtractor must be ... Got 'mean' instead."

    `param` is the Python parameter's name, when the message names one: the CLI names the flag bound to it instead
    ("Invalid value for '--pool': must be ..."). Limits are checked by transferkit.runtime.params.validate.
    """

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param
