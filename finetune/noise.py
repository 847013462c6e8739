"""Third-party output a normal run should not show, and the functions that silence it.

Nothing happens on import: the command line's entry point calls `silence_third_party()`
once, before any command runs, and loading a model calls `quiet_transformers()`. Code
that uses finetune as a library keeps its own logging and warnings settings.

Silenced by the libraries' own settings, never by matching their words (a reworded notice
in the next release would come back): each library's logger level, its verbosity setting,
and warnings filters by category and the module that issues them. Where finetune itself
caused a notice (a deprecated argument, an adapter deleted while active), the cause is
removed instead; tests/test_quiet.py runs every command and fails on any foreign line.
"""

from __future__ import annotations

import logging
import os
import warnings

# Loggers whose warnings are notices about the library itself: bitsandbytes (its int8 cast
# on the CPU, an optional kernel it cannot fetch) and kernels (its hub trust check, which
# it skips with a warning whenever HF_HUB_OFFLINE=1). Errors still show.
QUIET_LOGGERS = ("bitsandbytes", "kernels")
# Libraries whose Deprecation/Future/User warnings speak to their own callers (peft to
# transformers, transformers to peft), not to someone running finetune.
QUIET_MODULES = (
    r"(transformers|peft|accelerate|bitsandbytes|kernels|huggingface_hub|datasets)(\.|$)"
)
QUIET_CATEGORIES = (DeprecationWarning, FutureWarning, UserWarning)


def silence_third_party() -> None:
    """Drop the dependency notices a user can do nothing about. Call it before the libraries
    are imported (bitsandbytes logs at import, transformers reads its verbosity then): the
    CLI does, first thing. A verbosity the user set in the environment is kept."""
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    for category in QUIET_CATEGORIES:
        warnings.filterwarnings("ignore", category=category, module=QUIET_MODULES)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DATASETS_VERBOSITY", "error")
    # tqdm's own default for every bar: transformers' GGUF conversion draws one with tqdm
    # directly, past its disable_progress_bar(), on a model cache's first use (finetune
    # says "converting ... (once)" itself). tqdm reads it when it is imported.
    os.environ.setdefault("TQDM_DISABLE", "1")


def quiet_transformers() -> None:
    """Silence transformers' per-load progress bars and info logs: our own output says what
    happens, and a user error should be the only line on the screen."""
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    transformers_logging.set_verbosity_error()
