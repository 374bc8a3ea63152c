"""Errors every layer may raise, kept apart so that low-level modules need not import the config."""


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message says which key and why."""
