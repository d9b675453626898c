"""The one exception type for errors a user can cause (bad config, data, certificates...).

The CLI prints such an error as one line and exits with code 2; anything else is a bug
and propagates with its traceback.
"""


class FedcareError(Exception):
    """An error the user can fix; its message says what to fix."""


class ConfigError(FedcareError):
    """A configuration value is unknown, malformed or out of range."""


class DataError(FedcareError):
    """Site data is missing, corrupted or in the wrong format."""


class StoreError(FedcareError):
    """The SQL store cannot be reached or holds something unexpected."""


class PrivacyError(FedcareError):
    """A DP setting is impossible, or a site's privacy budget would be exceeded."""


class PolicyRefusal(FedcareError):
    """A site's policy refuses what the coordinator asked for."""


class ModelError(FedcareError):
    """An exported model folder is missing, malformed, altered or for another task."""


class ExportError(FedcareError):
    """A run cannot be exported as asked (unfinished, no such round, output folder in use)."""
