"""The errors rung reports to users: the CLI prints these as one line and exits non-zero, without a traceback."""


class RungError(Exception):
    """A problem the user can fix: bad config, missing input, unusable data."""


class ConfigError(RungError):
    """A config value is invalid. `field` is the dotted path of the offending field, so the message can name it."""

    def __init__(self, field: str, message: str):
        self.field = field
        self.message = message
        super().__init__(f"{field}: {message}" if field else message)

    def under(self, prefix: str) -> "ConfigError":
        """The same error seen from an enclosing config, so nested fields are reported by their full path."""
        return ConfigError(f"{prefix}.{self.field}" if self.field else prefix, self.message)


class DataError(RungError):
    """A corpus, tokenizer or shard directory that cannot be used."""
