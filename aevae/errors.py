"""The one exception type the CLI prints without a traceback."""


class UserError(Exception):
    """An error caused by the input or the environment; the message says what was wrong and what is accepted."""
