"""The one exception type for errors a user can cause (bad image, unsupported model, nothing found)."""


class ConceptExpressError(Exception):
    """A problem with the user's input or settings. The message says what went wrong and what to do."""
