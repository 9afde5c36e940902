"""One exception type for every user-facing problem: a one-line message naming it and the fix."""


class LorakitError(ValueError):
    """Bad input to lorakit (config, model, data or file). The message names the problem and the fix."""
