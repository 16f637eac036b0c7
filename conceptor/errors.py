"""The one exception type the CLI turns into a single line and a non-zero exit."""


class ConceptorError(Exception):
    """A problem with the user's input or environment, worded as what is wrong and what to do.

    The CLI prints ``error: <message>`` and exits with code 2, never a traceback. Library callers get
    the exception as usual.
    """
