"""Does the installed llama.cpp run on this machine? `python -m finetune.export.llamacpp_probe`
prints one line and exits 1 when it is installed and crashes (`make setup` runs it, so a
broken build is said at set-up, not discovered at the first export)."""

from __future__ import annotations

import sys

from finetune.export import llamacpp


def main() -> int:
    """One line saying whether the installed llama.cpp runs on this machine; exit code 1 when
    it is installed and does not."""
    found = llamacpp.machine_check()
    if found is None:
        print(
            "llama.cpp check: llama-cpp-python or the embedded model is not installed; GGUF "
            "exports are checked with transformers instead"
        )
        return 0
    if found.works:
        print(
            f"llama.cpp check: llama-cpp-python {llamacpp.version()} answers a chat prompt on the "
            f"embedded model ({found.detail[:40]!r}, {found.seconds:.1f} s); {found.system}"
        )
        return 0
    print(
        f"llama.cpp check: BROKEN on this machine: llama-cpp-python {llamacpp.version()} "
        f"{found.detail}. "
        "GGUF exports fall back to the transformers check and the llama.cpp tests fail. "
        f"To {llamacpp.REBUILD}",
        file=sys.stderr,
    )
    return 1


if __name__ == "__main__":
    sys.exit(main())
