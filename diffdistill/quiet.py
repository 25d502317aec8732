"""A quiet transcript: the libraries' own progress bars and load chatter off, ours kept.

transformers draws a "Loading weights" bar for every text encoder it loads and a "Writing
model shards" bar for every save; diffusers a "Loading pipeline components" bar and a
warning on every deliberate dtype cast. The ``diffdistill`` command turns them off unless
``-v`` is given (:func:`quiet_libraries`). It works through environment variables, so worker
processes the demo spawns inherit it, and it imports nothing heavy.
"""

from __future__ import annotations

import logging
import os

#: set by :func:`quiet_libraries`; :func:`apply_to_loaded_libraries` reads it in each process
QUIET_ENV = "DIFFDISTILL_QUIET"


class _EmptyFp32ModulesFilter(logging.Filter):
    """diffusers (0.36+) warns on every ``model.to(dtype)`` that "modules ... should be kept in
    float32: []" even when that list is empty; the toolkit casts UNets on purpose (frozen
    fp16 teacher, fp32 trainable copy), so the empty-list form is dropped. A non-empty list
    still warns."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "should be kept in float32: []" not in record.getMessage()


_FILTER = _EmptyFp32ModulesFilter()


def install_log_filters() -> None:
    """Idempotent: the empty-list dtype warning filter on diffusers' modeling logger."""
    logger = logging.getLogger("diffusers.models.modeling_utils")
    if _FILTER not in logger.filters:
        logger.addFilter(_FILTER)


def quiet_libraries(verbose: bool = False) -> None:
    """Unless ``verbose``: no huggingface / transformers progress bars (read when transformers
    is imported), transformers and diffusers log only errors, and diffusers' bars go off in
    every process that loads a model (:func:`apply_to_loaded_libraries`)."""
    if verbose:
        return
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ[QUIET_ENV] = "1"


def apply_to_loaded_libraries() -> None:
    """Called where models are loaded: diffusers' progress bars off when the process is quiet
    (diffusers has no environment variable for them)."""
    install_log_filters()
    if os.environ.get(QUIET_ENV) == "1":
        from diffusers.utils import logging as diffusers_logging

        diffusers_logging.disable_progress_bar()
