"""Errors the engine raises for bad input.

Every problem a user can cause (a missing file, a corrupt safetensors header, an
adapter that does not fit its base, an unsupported ``peft_type`` ...) is raised as
:class:`InputError`, which names the offending file or source and says what is
wrong in one plain sentence. The command line prints ``str(error)`` and exits 2;
the dashboard shows it in the page. Anything else is a bug.
"""

from __future__ import annotations


class InputError(Exception):
    """A problem with user-supplied input.

    Parameters
    ----------
    source : object
        The file, folder or hub id the problem is in, as the user would recognise it.
    problem : str
        One plain sentence saying what is wrong (no traceback, no repr soup).
    """

    def __init__(self, source: object, problem: str) -> None:
        self.source = str(source)
        problem = say_once(self.source, problem)
        self.problem = problem
        super().__init__(f"{self.source}: {problem}")


class AnalysisCancelled(Exception):
    """Raised inside the pipeline when the caller asked it to stop."""


def say_once(subject: str, message: str) -> str:
    """``message`` without leading repeats of ``subject`` ("x: x: no such file" -> "no such file").

    Errors name their source (``InputError``: "source: problem"); a caller that names
    the subject itself shows the rest, so each thing is said once.
    """
    subject = subject.strip()
    while subject and message.startswith(subject + ": "):
        message = message[len(subject) + 2 :]
    return message
