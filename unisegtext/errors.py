"""Exception hierarchy of UniSegText.

Every error raised on user input is a :class:`UniSegError`; messages say what was given,
what was expected and how to fix it. The CLI turns them into a one-line message and a
non-zero exit code.
"""

from __future__ import annotations

from collections.abc import Sequence


class UniSegError(Exception):
    """Base class of every error UniSegText raises on purpose."""


class VolumeError(UniSegError, ValueError):
    """A scan could not be read or is not a usable 3D volume."""


class PromptError(UniSegError, ValueError):
    """The list of prompts is unusable (empty, not strings, too many)."""


class UnknownConceptError(PromptError, KeyError):
    """A prompt or concept id did not resolve to a concept of the knowledge tree.

    Attributes:
        query: the text that was given.
        suggestions: concept ids that are close, best first ("did you mean").
    """

    def __init__(self, message: str, *, query: str = "", suggestions: Sequence[str] = ()):
        super().__init__(message)
        self.query = query
        self.suggestions = list(suggestions)

    def __str__(self) -> str:  # KeyError would quote the message otherwise
        return str(self.args[0]) if self.args else ""


class ModelLoadError(UniSegError, OSError):
    """A checkpoint is missing, incomplete, or does not match its config."""


class ConfigError(UniSegError, ValueError):
    """A model or training configuration is invalid."""


class DataError(UniSegError, ValueError):
    """A dataset descriptor or local dataset copy is invalid."""


class BackendError(UniSegError, ValueError):
    """A model backend is unknown, cannot answer a request, or its weights are unusable.

    Attributes:
        suggestions: close backend names or concept ids, best first ("did you mean").
    """

    def __init__(self, message: str, *, suggestions: Sequence[str] = ()):
        super().__init__(message)
        self.suggestions = list(suggestions)


class UnsafeCheckpointError(ModelLoadError):
    """A foreign checkpoint holds more than tensors and plain values (a pickle that could run code)."""


class ManifestError(UniSegError, ValueError):
    """A cohort manifest (``unisegtext batch``) has problems; all of them are listed at once.

    Attributes:
        problems: one line per problem, each naming the manifest line(s) it concerns.
    """

    def __init__(self, message: str, *, problems: Sequence[str] = ()):
        super().__init__(message)
        self.problems = list(problems)


def did_you_mean(name: str, choices: Sequence[str], n: int = 3) -> str:
    """Return a ' Did you mean: a, b?' suffix for an unknown registered name."""
    import difflib

    close = difflib.get_close_matches(name, list(choices), n=n, cutoff=0.5)
    return f" Did you mean: {', '.join(close)}?" if close else ""
