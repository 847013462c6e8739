"""GGUF exports in llama.cpp itself (issue 18): the merged model and the LoRA adapter GGUF
load there, tokenize as the transformers tokenizer does, and answer as the model does.

These need llama-cpp-python (the `[llamacpp]` extra; `make test` installs it and sets
FINETUNE_REQUIRE_LLAMACPP=1 so that a missing build fails here instead of skipping).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from helpers import ROOT, build_tokenizer, date_rows, run_main, with_llamacpp, write_jsonl

from finetune import export, inference, targets
from finetune.errors import UserError
from finetune.export import checks, gguf_file, gguf_vocab, llamacpp, merging
from finetune.recipe import load_recipe
from finetune.train import train

needs_llamacpp = pytest.mark.skipif(not with_llamacpp(), reason=llamacpp.INSTALL_HINT)


def make_run(root: Path, model_dir: Path, name: str, adapter: dict, lr: float = 5e-3) -> Path:
    data = write_jsonl(root / "train.jsonl", date_rows(24))
    recipe = {
        "model": {"path": str(model_dir)},
        "adapter": adapter,
        "data": {"path": str(data), "format": "instruction", "max_length": 64},
        "train": {"max_steps": 4, "lr": lr, "micro_batch_size": 4, "seed": 0},
        "output": {"dir": str(root / name)},
        "eval": {"max_examples": 2, "max_new_tokens": 4},
    }
    (root / f"{name}.yaml").write_text(yaml.safe_dump(recipe))
    train(load_recipe(root / f"{name}.yaml"))
    return root / name


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_model_dir):
    # alpha 16 on r 4 with rsLoRA off: llama.cpp's scale alpha / rank is peft's exactly.
    adapter = {"method": "lora", "r": 4, "alpha": 16}
    return make_run(tmp_path_factory.mktemp("lora"), tiny_model_dir, "run", adapter)


def adapter_session(run: Path):
    target = targets.resolve_target(str(run))
    spec = target.model.model_copy(update={"quantization": "none", "dtype": "float32"})
    return inference.load(target, device="cpu", spec=spec)


def llama_answers(path: Path, session, lora: Path | None = None) -> llamacpp.Comparison:
    """An independent look, not the exporter's own report: llama.cpp against the adapter
    model in transformers on the probe prompts."""
    texts = [inference.render_prompt(session.tokenizer, p) for p in checks.PROBE_PROMPTS]
    return llamacpp.compare(path, lora, session.model, session.tokenizer, texts)


def metadata(path: Path) -> dict:
    from gguf import GGUFReader

    fields = GGUFReader(path).fields
    keys = ("general.type", "tokenizer.ggml.pre", "adapter.type", "adapter.lora.alpha")
    return {k: fields[k].contents() for k in keys if k in fields}


# ------------------------------------------------------------------------ pre-tokenizer


def test_pre_tokenizer_is_named_as_llamacpp_names_it():
    from tokenizers import normalizers

    tokenizer = build_tokenizer()
    # A vocabulary of our own: no chkhsh table knows it, but its pre-tokenizer is GPT-2's.
    assert gguf_vocab.pre_tokenizer(tokenizer) == "gpt-2"
    tokenizer.backend_tokenizer.normalizer = normalizers.Lowercase()
    with pytest.raises(UserError, match=r"llama.cpp does not know this tokenizer's pre-tokenizer"):
        gguf_vocab.pre_tokenizer(tokenizer)


# ------------------------------------------------------------------------ merged model


@needs_llamacpp
def test_merged_gguf_runs_in_llamacpp_as_in_transformers(lora_run, tmp_path):
    session = adapter_session(lora_run)
    reports = {}
    for gguf_type in ("f32", "f16", "q8_0"):
        path = tmp_path / f"{gguf_type}.gguf"
        reports[gguf_type] = export.export(str(lora_run), path, "gguf", gguf_type=gguf_type)
        check = reports[gguf_type].check
        assert check.runner.startswith("llama.cpp"), check
        assert check.tokens_identical and check.pre_tokenizer == "gpt-2"
        assert metadata(path)["tokenizer.ggml.pre"] == "gpt-2"
        found = llama_answers(path, session)
        assert found.tokens_identical and found.positions > 30
        assert found.max_logit_diff < checks.GGUF_TOLERANCE[gguf_type]
    # f32 and f16 answer exactly as transformers does, token for token.
    for gguf_type in ("f32", "f16"):
        assert reports[gguf_type].check.greedy_identical == len(checks.PROBE_PROMPTS)
    assert reports["f32"].check.max_logit_diff < 1e-3
    assert reports["q8_0"].size_bytes < reports["f32"].size_bytes / 2


@needs_llamacpp
def test_the_old_metadata_is_what_llamacpp_refuses(lora_run, tmp_path):
    """Issue 18: 'gpt2' is no pre-tokenizer llama.cpp knows; the check reports its reason."""
    import gguf

    session = adapter_session(lora_run)
    model = session.model.merge_and_unload()
    path = tmp_path / "old.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    gguf_file.add_hparams(writer, model.config, "old")
    tokens, types = gguf_vocab.vocabulary(session.tokenizer, model.config.vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt2")  # what finetune wrote before
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    spec = json.loads(session.tokenizer.backend_tokenizer.to_str())
    writer.add_token_merges([" ".join(m) for m in spec["model"]["merges"]])
    for name, tensor in gguf_file.model_tensors(model):
        gguf_file.add_tensor(writer, name, tensor, gguf.GGMLQuantizationType.F32)
    gguf_file.finish(writer)
    with pytest.raises(llamacpp.LoadFailed, match=r"unknown pre-tokenizer type: 'gpt2'"):
        llamacpp.run(llamacpp.Request(path))


# ------------------------------------------------------------------------ adapter GGUF


@needs_llamacpp
def test_adapter_gguf_on_the_base_gguf_answers_as_the_merged_model(
    lora_run, tiny_model_dir, tmp_path, capsys
):
    status, _, err = run_main(
        capsys, "export", str(tiny_model_dir), "--format", "gguf", "--out", str(tmp_path / "b.gguf")
    )
    assert status == 0, err
    status, out, err = run_main(
        capsys,
        "export",
        str(lora_run),
        "--format",
        "gguf-adapter",
        "--out",
        str(tmp_path / "a.gguf"),
        "--base-gguf",
        str(tmp_path / "b.gguf"),
    )
    assert status == 0, err
    assert re.search(
        r"adapter GGUF on .*b.gguf checked with llama.cpp .*greedy answers identical "
        r"on 3/3",
        " ".join(out.split()),
    ), out
    facts = metadata(tmp_path / "a.gguf")
    assert facts["general.type"] == "adapter" and facts["adapter.type"] == "lora"
    assert facts["adapter.lora.alpha"] == 16.0
    # llama.cpp, base + adapter, against the merged model in transformers.
    merged = merging.build_merged(targets.resolve_target(str(lora_run)))
    found = llama_answers(tmp_path / "b.gguf", merged, lora=tmp_path / "a.gguf")
    assert found.tokens_identical and found.greedy_identical == found.prompts
    assert found.max_logit_diff < 0.5  # f16 base
    # Without the adapter llama.cpp answers as the base does: the adapter is what changed it.
    bare = llama_answers(tmp_path / "b.gguf", merged)
    assert bare.max_logit_diff > 10 * found.max_logit_diff


def test_without_llamacpp_the_export_says_which_check_it_ran(
    lora_run, tiny_model_dir, tmp_path, monkeypatch
):
    """As on a machine without the binding: the transformers round trip for the model, the
    weight updates rebuilt from the file for the adapter, and a note saying so."""
    monkeypatch.setattr(llamacpp, "available", lambda: False)
    model = export.export(str(lora_run), tmp_path / "m.gguf", "gguf", gguf_type="f32")
    assert model.check.runner == "transformers" and model.check.max_logit_diff < 1e-4
    assert "llama.cpp is not installed" in model.check.note
    export.export(str(tiny_model_dir), tmp_path / "b.gguf", "gguf")
    adapter = export.export(
        str(lora_run), tmp_path / "a.gguf", "gguf-adapter", base_gguf=tmp_path / "b.gguf"
    )
    assert adapter.check.runner == "the gguf reader" and adapter.check.max_logit_diff < 1e-5
    assert "llama.cpp is not installed" in adapter.check.note
    assert "checked the weight updates" in adapter.check.note


# ------------------------------------------------------------------------ llama.cpp crashing

# The child that llama.cpp runs in, replaced by one that is killed by a real signal when the
# model it is asked to run matches CRASH_ON, and runs the real child otherwise.
CRASHING_CHILD = """
import json, os, runpy, signal, sys
request = json.load(open(sys.argv[1]))
if {crash_on!r} in request["model"]:
    os.kill(os.getpid(), signal.{signal})
sys.argv = [{real!r}, *sys.argv[1:]]
runpy.run_path({real!r}, run_name="__main__")
"""


@pytest.fixture
def crashing_llamacpp(tmp_path, monkeypatch):
    """make(crash_on, signal): llama.cpp's child process dies of `signal` (SIGSEGV, as the
    native build on an AMX machine did) on every model whose path holds `crash_on`."""

    def make(crash_on: str, signal: str = "SIGSEGV") -> None:
        child = tmp_path / f"crashing_child_{signal}.py"
        real = str(llamacpp.CHILD)
        child.write_text(CRASHING_CHILD.format(crash_on=crash_on, signal=signal, real=real))
        monkeypatch.setattr(llamacpp, "CHILD", child)
        llamacpp.machine_check.cache_clear()

    yield make
    llamacpp.machine_check.cache_clear()


def files_in(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@needs_llamacpp
@pytest.mark.parametrize("signal", ["SIGSEGV", "SIGILL"])
def test_llamacpp_crashing_on_the_file_fails_the_check_in_one_line(
    signal, lora_run, tmp_path, capsys, crashing_llamacpp
):
    """Issue 28: llama.cpp killed finetune with SIGSEGV (exit 139, no message). Now it dies in
    its child process; the export says what crashed, exits 1 as for a failed check, and writes
    nothing (no file, no temporary file). pytest itself is still alive to check."""
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    (out_dir / "keep.txt").write_text("mine")
    crashing_llamacpp("/.f16.", signal)  # the file is written as .f16.XXXX.gguf, then renamed
    status, _, err = run_main(
        capsys, "export", str(lora_run), "--format", "gguf", "--out", str(out_dir / "f16.gguf")
    )
    assert status == 1 and len(err.strip().splitlines()) == 1, err
    assert re.search(rf"llama.cpp .* was killed by {signal} .*nothing was written", err), err
    assert files_in(out_dir) == ["keep.txt"]


@needs_llamacpp
def test_llamacpp_crashing_on_every_model_falls_back_to_transformers(
    lora_run, tiny_model_dir, tmp_path, capsys, crashing_llamacpp
):
    """Where llama.cpp crashes on the embedded model's chat as well, the machine's build is
    what is broken: the export is checked by transformers (the model) or the gguf reader (the
    adapter), and says so."""
    crashing_llamacpp(".gguf")
    model = export.export(str(lora_run), tmp_path / "m.gguf", "gguf", gguf_type="f32")
    assert model.check.runner == "transformers" and model.check.max_logit_diff < 1e-4
    assert re.search(r"crashes on this machine \(it was killed by SIGSEGV", model.check.note)
    export.export(str(tiny_model_dir), tmp_path / "b.gguf", "gguf")
    status, out, err = run_main(
        capsys, "export", str(lora_run), "--format", "gguf-adapter", "--out",
        str(tmp_path / "a.gguf"), "--base-gguf", str(tmp_path / "b.gguf"),
    )  # fmt: skip
    assert status == 0, err
    assert "checked with the gguf reader instead" in " ".join(out.split()), out


@needs_llamacpp
@pytest.mark.slow
def test_llamacpp_answers_a_chat_prompt_on_the_embedded_model():
    """The set-up check (`python -m finetune.export.llamacpp_probe`, run by `make setup`): the
    installed llama.cpp answers a chat completion on the embedded Q4_1 GGUF in a child
    process. The native build crashed exactly here on a Sapphire Rapids machine."""
    llamacpp.machine_check.cache_clear()
    found = llamacpp.machine_check()
    assert found is not None and found.works, found
    assert found.detail and "CPU :" in found.system
    probe = subprocess.run(
        [sys.executable, "-m", "finetune.export.llamacpp_probe"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert probe.returncode == 0 and "answers a chat prompt" in probe.stdout, probe.stderr


@pytest.mark.parametrize(
    ("adapter", "pattern"),
    [
        ({"method": "ia3"}, r"a ia3 adapter; --format gguf-adapter writes plain LoRA"),
        ({"method": "dora", "r": 4, "alpha": 8}, r"a dora adapter; --format gguf-adapter"),
    ],
)
def test_adapters_llamacpp_cannot_hold_are_refused(
    adapter, pattern, tmp_path, tiny_model_dir, capsys
):
    run = make_run(tmp_path, tiny_model_dir, "run", adapter, lr=5e-2)
    out = tmp_path / "a.gguf"
    status, _, err = run_main(
        capsys, "export", str(run), "--format", "gguf-adapter", "--out", str(out)
    )
    assert status == 2 and len(err.splitlines()) == 1 and re.search(pattern, err), err
    assert not out.exists()


def test_adapter_without_a_base_gguf_says_how_to_make_one(lora_run, tmp_path, capsys):
    out = tmp_path / "a.gguf"
    status, _, err = run_main(
        capsys, "export", str(lora_run), "--format", "gguf-adapter", "--out", str(out)
    )
    assert status == 2 and len(err.splitlines()) == 1, err
    assert re.search(r"--base-gguf: .*not a GGUF file.*finetune export .* --format gguf", err)
    assert not out.exists()


# A stand-in for the llama_cpp package, put first on the child's PYTHONPATH: the real child
# process runs and imports it, and it fails the way FAKE_LLAMA says when the model loads.
FAKE_LLAMA_CPP = """
import os, pathlib, time

def llama_log_callback(function):
    return function

def llama_log_set(*args):
    pass

def llama_print_system_info():
    return b"fake"

def fail(mode):
    pathlib.Path(os.environ["FAKE_LLAMA_PID"]).write_text(str(os.getpid()))
    if mode == "hang":
        time.sleep(600)
    if mode == "exit0":
        os._exit(0)
    if mode == "oserror":
        raise OSError(28, "No space left on device")
    if mode == "abort":
        os.abort()

class Llama:
    def __init__(self, **settings):
        fail(os.environ["FAKE_LLAMA"])
"""


@pytest.fixture
def fake_llama(tmp_path, monkeypatch):
    """env(mode): the environment under which llama.cpp's child process fails as `mode` says;
    also set in this process's environment, which in-process commands' children inherit."""
    package = tmp_path / "fake" / "llama_cpp"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(FAKE_LLAMA_CPP)

    def env(mode: str) -> dict[str, str]:
        extra = {
            "PYTHONPATH": str(package.parent),
            "FAKE_LLAMA": mode,
            "FAKE_LLAMA_PID": str(tmp_path / "child.pid"),
        }
        for key, value in extra.items():
            monkeypatch.setenv(key, value)
        llamacpp.machine_check.cache_clear()
        return extra

    yield env
    llamacpp.machine_check.cache_clear()


@needs_llamacpp
@pytest.mark.parametrize(
    ("mode", "pattern"),
    [
        ("exit0", r"process running llama.cpp on the f16 file failed \(exit code 0: no message"),
        ("oserror", r"failed \(exit code 1: OSError: \[Errno 28\] No space left on device\)"),
    ],
)
def test_a_failing_llamacpp_process_is_one_line_naming_its_error(
    mode, pattern, lora_run, tmp_path, capsys, fake_llama
):
    """A Python error in the child (or an exit without an answer) is neither the file's fault
    nor the machine's: the line gives the child's own error, exit 1, nothing written."""
    fake_llama(mode)
    out = tmp_path / "out" / "f16.gguf"
    out.parent.mkdir()
    status, _, err = run_main(
        capsys, "export", str(lora_run), "--format", "gguf", "--out", str(out)
    )
    assert status == 1 and len(err.strip().splitlines()) == 1, err
    assert re.search(pattern, err), err
    assert files_in(out.parent) == []


@needs_llamacpp
def test_a_crash_names_the_innermost_frame(lora_run, tmp_path, fake_llama):
    """faulthandler prints the innermost frame first: that is where llama.cpp was entered."""
    fake_llama("abort")
    model = export.export(str(lora_run), tmp_path / "m.gguf", "gguf", gguf_type="f32")
    assert model.check.runner == "transformers"  # the embedded model's chat aborts too
    assert re.search(
        r"killed by SIGABRT \(aborted\) \(File .*llama_cpp/__init__.py", model.check.note
    )


@needs_llamacpp
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGKILL])
def test_stopping_an_export_stops_llamacpp_and_leaves_nothing(
    signum, lora_run, tmp_path, fake_llama
):
    """Issue 28's red team: SIGTERM (`kill`, `docker stop`) to an export checking in llama.cpp
    left the child running with no timeout, and its files behind. Now SIGTERM unwinds like
    Ctrl-C: exit 143, the child gone, no temporary file in TMPDIR or beside --out. SIGKILL
    cannot clean up, but the child still dies with its parent."""
    env = {**os.environ, **fake_llama("hang"), "TMPDIR": str(tmp_path / "tmp")}
    (tmp_path / "tmp").mkdir()
    out = tmp_path / "out"
    out.mkdir()
    pid_file = Path(env["FAKE_LLAMA_PID"])
    proc = subprocess.Popen(
        [sys.executable, "-m", "finetune", "export", str(lora_run), "--format", "gguf", "--out",
         str(out / "m.gguf")],
        env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 180
    while not pid_file.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert pid_file.exists(), proc.communicate()[1][-2000:]
    child = int(pid_file.read_text())
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == {signal.SIGTERM: 143, signal.SIGINT: 130}.get(signum, -9), err
    for _ in range(50):  # the kernel delivers the parent-death signal asynchronously
        if not alive(child):
            break
        time.sleep(0.1)
    assert not alive(child)
    if signum != signal.SIGKILL:
        assert files_in(tmp_path / "tmp") == [] and files_in(out) == [], err


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except OSError:
        return False
    return state != "Z"  # a zombie has ended; only its exit status waits to be read
