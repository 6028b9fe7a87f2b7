"""Errors a user can fix: ``train.py`` prints them as one line, without a traceback."""


class LipschitzLightningError(Exception):
    """Base of the errors whose message alone tells the user what to change."""


class ConfigError(LipschitzLightningError, ValueError):
    """A config value is out of range; the message names the key and what is allowed."""


class DataError(LipschitzLightningError, RuntimeError):
    """Data is missing, unreadable or inconsistent; the message names the file and the fixes."""


class TrainingDiverged(LipschitzLightningError, FloatingPointError):
    """The loss became NaN or infinite; the message names the step."""
