"""What the student workers print: the students' step lines, once, and nothing else of their own."""

from __future__ import annotations

import builtins
import contextlib
import logging
import sys
import warnings

from ray.train.v2._internal.execution import context as train_context


def console(line: str) -> None:
    """A line on the job's console, once: Ray Train's ``print`` in its workers logs and, as their
    ``sys.stdout`` is wrapped, prints too (each line came out twice); the process's own stdout has it once."""
    sys.__stdout__.write(line + "\n")
    sys.__stdout__.flush()


def quiet(log_level: str) -> None:
    """The workers' console is the students' step lines: DeepSpeed's notices (its own logger, which Ray's log
    level does not reach) and torch's deprecation warnings about the collectives DeepSpeed calls are off, and
    Ray Train's "Reporting training result" line is logged at ``log_level`` (its LoggingConfig's) or above:
    Ray Train logs that line through a logger named by its file's path, outside the ``ray.train`` logger whose
    console handler LoggingConfig sets."""
    # imported here, not by the driver; its import creates the logger at WARNING, so it comes before the level
    from deepspeed.utils import logger as deepspeed_logger

    deepspeed_logger.setLevel(logging.ERROR)
    # DeepSpeed's op loader imports torch's extension builder, which warns "No CUDA runtime is found" on CPU workers
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    logging.getLogger(train_context.__file__).setLevel(log_level)
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed")


@contextlib.contextmanager
def no_prints():
    """``print`` does nothing inside: DeepSpeed prints (not logs) "deepspeed_shm_comm_op built successfully" as
    it sets up its CPU collectives in ``deepspeed.initialize``. (Ray Train's workers replace ``print`` with one
    that logs the line and writes it to stdout too, so neither its logger's level nor a redirected stdout stops it.)"""
    saved, builtins.print = builtins.print, lambda *args, **kwargs: None
    try:
        yield
    finally:
        builtins.print = saved
