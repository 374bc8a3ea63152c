"""Errors every layer may raise, kept apart so that low-level modules need not import the modules above them."""


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message says which key and why."""


class AttackError(RuntimeError):
    """An attack that cannot go on (a non-finite loss, a run without the networks it needs)."""


class ReportError(ValueError):
    """A run or result file that cannot be reported; the message names the file and field."""


class StoreError(ValueError):
    """A store that is missing, damaged, incomplete or made by another obfuscator; the message names the file."""


class TrainingError(RuntimeError):
    """Training cannot go on (a non-finite loss, a run directory in the wrong state, a device that is not there)."""


class ClientError(ValueError):
    """A client (an exported obfuscator) that cannot be made or used: a random obfuscator, a damaged or foreign
    .onnx file, a missing or altered fingerprint; the message names the file."""
