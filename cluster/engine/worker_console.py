"""What the student workers print: the students' step lines, once, and nothing else of their own."""

from __future__ import annotations

import logging
import sys
import warnings


def console(line: str) -> None:
    """A line on the job's console, once: Ray Train's ``print`` in its workers logs and, as their
    ``sys.stdout`` is wrapped, prints too (each line came out twice); the process's own stdout has it once."""
    sys.__stdout__.write(line + "\n")
    sys.__stdout__.flush()


def quiet() -> None:
    """The workers' console is the students' step lines: DeepSpeed's notices (its own logger, which Ray's log
    level does not reach) and torch's deprecation warnings about the collectives DeepSpeed calls are off."""
    logging.getLogger("DeepSpeed").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed")
