"""The one exception type that means "the user's input is wrong".

The CLI turns it into exit code 2 and a single line ``<path>: <problem>``.
"""

from pathlib import Path


class InputError(Exception):
    """Bad user input: unreadable file, mismatched geometry, unknown label, ...

    ``path`` names the offending file or folder so the user can find it.
    """

    def __init__(self, path, problem: str):
        self.path = Path(path) if path is not None else None
        self.problem = problem
        super().__init__(f"{self.path}: {problem}" if self.path is not None else problem)

    def __reduce__(self):
        # joblib workers pickle exceptions back to the parent: keep both arguments
        return (InputError, (self.path, self.problem))
