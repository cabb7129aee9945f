"""The one exception type for mistakes a user can fix (bad flags, missing files, gated repos)."""


class UserInputError(Exception):
    """A problem with the user's input, reported as one sentence: what is wrong, where, how to fix it.

    Entry points catch it and exit non-zero without a traceback; genuine bugs keep raising normally.
    """
