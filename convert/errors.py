"""The one error type the converter raises for bad input; its message is meant for the user."""


class ConvertError(ValueError):
    """Bad input or options: one clear message naming the file, tensor or option at fault."""
