"""The one base class of the errors that mean "your input or settings are wrong" (as opposed to a bug).

Every such error in the package derives from `UserError` (and from the built-in it used to be, ValueError or
RuntimeError, so `except ValueError` still catches it). The command-line scripts catch `USER_ERRORS` and print
the message, which names the file, key or line and the fix, instead of a traceback.
"""


class UserError(Exception):
    """Bad input or settings: the message says what is wrong, where, and what to do."""


USER_ERRORS: tuple[type[BaseException], ...] = (UserError, FileExistsError, FileNotFoundError)
