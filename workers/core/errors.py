"""The project's errors that any layer raises: in the core, so that no module imports another just for its error."""


class ConfigError(ValueError):
    """A config that cannot run; the message names the field and the bad value."""
