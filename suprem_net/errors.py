"""The one exception type for problems a user can cause (bad file, bad flag, missing weights).

The CLIs turn it into one line on stderr and exit code 2; bugs still raise normally.
"""


class SupremError(Exception):
    """A user-facing error. ``str(err)`` is the one line shown to the user."""


class InputError(SupremError):
    """A bad input file or folder; the message names the file and the problem."""

    def __init__(self, path, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")

    def __reduce__(self):  # picklable, so an error raised in a worker process reaches the CLI intact
        return type(self), (self.path, self.problem)
