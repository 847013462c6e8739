"""Third-party output a normal run should not show, and the functions that silence it.

Nothing happens on import: the command line's entry point calls `silence_third_party()`
once, before any command runs, and loading a model calls `quiet_transformers()`. Code
that uses finetune as a library keeps its own logging and warnings settings.
"""

from __future__ import annotations

import logging
import warnings


class _DropMatmulCastNotice(logging.Filter):
    """bitsandbytes logs a cast notice on every int8 matmul on the CPU; it is expected there."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("MatMul8bitLt: inputs will be cast")


class _DropKernelsHubNotice(logging.Filter):
    """bitsandbytes' CPU backend (backends/cpu/ops.py), on CPUs with AVX512-BF16, tries at
    import to fetch an optional 4-bit kernel from the hub package `kernels` and logs a
    warning when that package is absent: on every command that imports peft (train, eval,
    estimate, merge, ...), before anything else and above every one-line error. The
    built-in path it falls back to is the one we test; only that one notice is dropped."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Failed to load CPU gemm_4bit_forward")


# One instance each: Logger.addFilter skips a filter it already holds, so calling
# silence_third_party() again (the tests run the CLI in-process many times) adds nothing.
_FILTERS = {
    "bitsandbytes.autograd._functions": _DropMatmulCastNotice(),
    "bitsandbytes.backends.cpu.ops": _DropKernelsHubNotice(),
}


def silence_third_party() -> None:
    """Drop the dependency notices a user can do nothing about. Call it before bitsandbytes
    is imported (it logs at import): the CLI does, first thing."""
    for name, notice in _FILTERS.items():
        logging.getLogger(name).addFilter(notice)
    # peft 0.21 still asks transformers 5 the old name; the warning is for peft, not our users.
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated")
    # transformers' generate() passes position ids; peft's prompt tuning drops them (its
    # virtual tokens come first) and says so at every exact-match evaluation.
    warnings.filterwarnings("ignore", message="Position ids are not supported for parameter")
    # transformers 5.24 renamed `past_key_values` to `cache`; peft 0.21.2 still hands prefix
    # tuning's keys and values to forward() under the old name, which transformers renames.
    # (Generation, where the two names collided, is bridged in finetune.peft_compat.)
    warnings.filterwarnings("ignore", message="`past_key_values` is deprecated and will be")


def quiet_transformers() -> None:
    """Silence transformers' per-load progress bars and info logs: our own output says what
    happens, and a user error should be the only line on the screen."""
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    transformers_logging.set_verbosity_error()
