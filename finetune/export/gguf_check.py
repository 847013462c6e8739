"""How a GGUF file is checked before it is put in place: in llama.cpp where llama-cpp-python is
installed (the model or base + adapter loaded the way a user will, its tokens, logits and
greedy answers compared with the transformers model), and what the check found."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from finetune import inference, outputs
from finetune.export import llamacpp
from finetune.export.checks import PROBE_PROMPTS, CheckFailed
from finetune.export.llama_pre import CHKTXT
from finetune.export.merging import Merged
from finetune.stopping import raise_if_terminated


@dataclass
class GGUFCheck:
    """How a GGUF file was checked, and what the check found."""

    runner: str  # "llama.cpp <version>", or "transformers" where llama.cpp is not installed
    max_logit_diff: float
    tolerance: float
    tokens_identical: bool
    prompts: int
    greedy_identical: int | None = None  # llama.cpp only: greedy answers equal token for token
    pre_tokenizer: str | None = None
    base_gguf: str | None = None  # gguf-adapter: the file the adapter was applied to
    note: str = ""


def write_checked_file(out: Path, write: Callable[[Path], GGUFCheck]) -> GGUFCheck:
    """`write(tmp)` writes and checks a file beside `out`; it replaces `out` only when that
    returns (a failed check raises), so a failure leaves nothing behind. A full disk or a
    read-only folder is one line naming `out`, not the temporary file."""
    with outputs.writing(out):
        out.parent.mkdir(parents=True, exist_ok=True)
        outputs.remove_stale_partials(out)
        prefix = outputs.temporary_prefix(out)
        suffix = f"{outputs.PARTIAL}.gguf"
        fd, tmp_name = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=out.parent)
        os.close(fd)
    tmp = Path(tmp_name)
    try:
        check = write(tmp)
        raise_if_terminated()  # a stopped command publishes nothing
        tmp.chmod(0o644)
        os.replace(tmp, out)
    except BaseException as err:
        # A failed check is a verdict on the file, even when its words mention a full disk
        # (the llama.cpp process's own error): not a failure to write `out`.
        error = None if isinstance(err, CheckFailed) else outputs.write_error(err, out)
        tmp.unlink(missing_ok=True)
        if error is not None:
            raise error from None
        raise
    return check


class LlamaCppUnusable(Exception):
    """llama.cpp crashes on this machine whatever it runs (the embedded model's chat too)."""


def checked_in_llamacpp_or(
    fallback: Callable[[], GGUFCheck],
    path: Path,
    lora: Path | None,
    reference: Merged,
    limit: float,
    what: str,
) -> GGUFCheck:
    """The llama.cpp check where llama.cpp is installed and runs on this machine; else
    `fallback()` (transformers or the gguf reader), with a note saying why.

    Raises:
        CheckFailed: either check failed, or llama.cpp crashed on this file only.
    """
    if not llamacpp.available():
        check = fallback()
        check.note = join_notes(f"llama.cpp is not installed ({llamacpp.INSTALL_HINT})", check.note)
        return check
    try:
        return llamacpp_check(path, lora, reference, limit, what)
    except LlamaCppUnusable as err:
        check = fallback()
        check.note = join_notes(f"{err}: checked with {check.runner} instead", check.note)
        return check


def join_notes(*notes: str) -> str:
    return "; ".join(n for n in notes if n)


def llamacpp_check(
    path: Path, lora: Path | None, reference: Merged, limit: float, what: str
) -> GGUFCheck:
    """Load the file (or base + adapter) in llama.cpp, in a child process, and compare it with
    `reference`.

    Raises:
        CheckFailed: llama.cpp refuses the file, crashes on it (and not on the embedded
            model), splits text differently, or its logits differ by more than `limit`.
        LlamaCppUnusable: llama.cpp crashes on the embedded model too.
    """
    texts = [inference.render_prompt(reference.tokenizer, p) for p in PROBE_PROMPTS]
    try:
        # llama.cpp's own pre-tokenizer test text, tokenized only: it covers what the probe
        # prompts do not (digits, emoji, CJK, runs of whitespace).
        found = llamacpp.compare(path, lora, reference.model, reference.tokenizer, texts, [CHKTXT])
    except llamacpp.LoadFailed as err:
        raise CheckFailed(
            f"GGUF check failed: llama.cpp refused {what}: {err}; nothing was written"
        ) from None
    except llamacpp.Crashed as err:
        raise crash_outcome(str(err), what) from None
    except llamacpp.ChildFailed as err:
        raise CheckFailed(
            f"GGUF check failed: the process running llama.cpp on {what} failed ({err}); "
            "nothing was written"
        ) from None
    check = GGUFCheck(
        runner=llamacpp.runner(),
        max_logit_diff=found.max_logit_diff,
        tolerance=limit,
        tokens_identical=found.tokens_identical,
        prompts=found.prompts,
        greedy_identical=found.greedy_identical,
    )
    if not found.tokens_identical:
        raise CheckFailed(
            f"GGUF check failed: llama.cpp splits text differently from the model's tokenizer "
            f"({found.first_difference}); nothing was written"
        )
    require_within(check, what)
    return check


def crash_outcome(how: str, what: str) -> Exception:
    """llama.cpp died running `what`: is it the file or the machine? The embedded model's chat
    answers where llama.cpp works at all; if it crashes too, the machine's build is broken and
    the check falls back. Otherwise (or with no embedded model to tell) the check fails."""
    runner = llamacpp.runner()
    machine = llamacpp.machine_check()
    if machine is not None and not machine.works:
        return LlamaCppUnusable(
            f"{runner} crashes on this machine (it {how} running {what}, and "
            f"{machine.detail} on the embedded model's chat; {llamacpp.REBUILD})"
        )
    told = (
        "it answers the embedded model's chat on this machine, so the file is what it cannot run"
        if machine is not None
        else f"if it crashes on every model here, {llamacpp.REBUILD}"
    )
    return CheckFailed(
        f"GGUF check failed: {runner} {how} while running {what}; nothing was written ({told})"
    )


def require_within(check: GGUFCheck, what: str) -> None:
    if not check.max_logit_diff <= check.tolerance:
        raise CheckFailed(
            f"GGUF check failed: {what} in {check.runner} differs from the merged model by "
            f"{check.max_logit_diff:.3g} in logits (tolerance {check.tolerance:g}); nothing "
            "was written"
        )
