"""Errors raised by the encoders. Each message says how to fix the problem."""


class EncoderError(ValueError):
    """Base class for model and profile errors."""


class UnknownProfileError(EncoderError, KeyError):
    """A profile name that is not in the registry."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class WeightsNotFoundError(EncoderError, FileNotFoundError):
    """Weights that a profile needs are missing; the message says how to get them."""


class CheckpointError(EncoderError):
    """A checkpoint file that is corrupt or does not fit the model it is loaded into."""
