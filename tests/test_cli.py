"""hf_lorax's commands print their own output only: a third-party import message never reaches the user.

The chatter is simulated (a ``sitecustomize`` that makes ``import peft`` log, warn and print, as bitsandbytes
logs on CPUs with AVX512-BF16), so these tests prove the behaviour on every host, whatever it logs itself.

The control, a user's own program that imports hf_lorax and still sees the chatter, is asserted on the plain-peft
runs of tests/test_isolation.py::test_plain_peft_and_trainer_run_bit_identically_with_hf_lorax_imported (case 7:
importing hf_lorax changes nothing for code that does not use it).
"""

import logging
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest

from hf_lorax.cli import main_module, quiet_imports

ROOT = Path(__file__).resolve().parents[1]
CHATTER = ("chatty-log: kernel not found", "chatty-warn: deprecated", "chatty-print-err", "chatty-print-out")

# imported by Python at start-up from PYTHONPATH: the first `import peft` logs, warns and prints
SITECUSTOMIZE = textwrap.dedent('''
    import importlib.abc, logging, sys, warnings

    class Chatty(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "peft":
                sys.meta_path.remove(self)
                logging.getLogger("chatty").warning("chatty-log: kernel not found")
                warnings.warn("chatty-warn: deprecated", UserWarning)
                print("chatty-print-err", file=sys.stderr)
                print("chatty-print-out")
            return None

    sys.meta_path.insert(0, Chatty())
''')


def _run(tmp_path, *args, debug=False):
    (tmp_path / "sitecustomize.py").write_text(SITECUSTOMIZE)
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}", "HF_HUB_OFFLINE": "1"}
    env.pop("HF_LORAX_DEBUG", None)
    if debug:
        env["HF_LORAX_DEBUG"] = "1"
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)


@pytest.mark.parametrize(("args", "message"), [
    (["-m", "hf_lorax.export", "--engine", "vlm"], "error: argument --engine: invalid choice: 'vlm'"),
    ([str(ROOT / "scripts" / "run_glue.py"), "--preset", "roberta-huge/sst2"], "error: Unknown preset 'roberta-huge/sst2'"),
    ([str(ROOT / "scripts" / "run_e2e.py"), "--num_train_epochs", "-1"], "error: --num_train_epochs -1.0"),
    ([str(ROOT / "scripts" / "push_adapter.py"), "/no/such/adapter"], "error: the following arguments are required: --repo_id"),
])
def test_commands_print_one_line_despite_third_party_chatter(tmp_path, args, message):
    """Each kind of command (hf_lorax, a task script, a tool script) and each kind of mistake (argparse's, a
    range, a bad value); every process imports torch, so the list stays short."""
    proc = _run(tmp_path, *args)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith(message), proc.stderr


def test_help_shows_only_the_usage(tmp_path):
    proc = _run(tmp_path, "-m", "hf_lorax.export", "--help")
    assert proc.returncode == 0 and proc.stderr == "" and proc.stdout.startswith("usage: python -m hf_lorax.export")


def test_debug_shows_third_party_messages(tmp_path):
    proc = _run(tmp_path, "-m", "hf_lorax.export", "--engine", "vlm", debug=True)
    assert "chatty-log: kernel not found" in proc.stderr


def test_quiet_imports_holds_back_only_the_import(tmp_path, monkeypatch, capfd, caplog):
    (tmp_path / "chatty_mod.py").write_text(
        "import logging, os, warnings\n"
        "logging.getLogger('chatty').warning('import log')\n"
        "warnings.warn('import warning')\n"
        "os.write(2, b'import output on fd 2\\n')\n"
        "os.write(1, b'import output on fd 1\\n')\n")
    (tmp_path / "broken_mod.py").write_text("import os\nos.write(2, b'why it broke\\n')\nraise ImportError('no')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with quiet_imports():
        import chatty_mod  # noqa: F401
    assert capfd.readouterr() == ("", "")
    # after the block, warnings and log records show as before
    with pytest.warns(UserWarning, match="later"):
        warnings.warn("later", UserWarning, stacklevel=1)
    with caplog.at_level(logging.WARNING):
        logging.getLogger("chatty").warning("after")
    assert "after" in caplog.text
    # a failing import keeps its explanation
    with pytest.raises(ImportError, match="no"), quiet_imports():
        import broken_mod  # noqa: F401
    assert "why it broke" in capfd.readouterr().err


COMMAND = textwrap.dedent('''
    __hf_lorax_command__ = True  # as scripts/*.py declare it
    import logging, warnings
    import hf_lorax
    from transformers.utils import logging as transformers_logging
    transformers_logging.get_logger("transformers.probe").warning("transformers warning after start-up")
    logging.getLogger("mine").warning("log record after start-up")
    warnings.warn("python warning after start-up")
    print("result")
''')


def test_a_command_keeps_every_warning_after_start_up(tmp_path):
    """Only the import is quiet: transformers' log handler, bound to stderr while importing, still reaches it."""
    (tmp_path / "command.py").write_text(COMMAND)
    proc = _run(tmp_path, str(tmp_path / "command.py"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout == "result\n" and "chatty" not in proc.stderr
    for line in ("transformers warning after start-up", "log record after start-up", "python warning after start-up"):
        assert line in proc.stderr


@pytest.mark.parametrize(("argv", "module"), [
    (["python", "-m", "hf_lorax.export", "a"], "hf_lorax.export"),
    (["python", "-X", "importtime", "-mhf_lorax.analysis"], "hf_lorax.analysis"),
    (["python", "scripts/run_glue.py", "-m", "x"], None),
    (["python", "-c", "import hf_lorax", "-m", "x"], None),
])
def test_main_module(argv, module):
    assert main_module(argv) == module


@pytest.mark.parametrize(("module", "argv", "instead"), [
    ("hf_lorax.export.__main__", ["src", "dst", "--engine", "vllm", "--dora", "svd"], "--dora was removed; use --merge"),
    ("hf_lorax.export.__main__", ["src", "dst", "--heads=beside"], "--heads was removed; use --merge"),
    ("hf_lorax.analysis.__main__", ["adapter", "--against", "other"],
     "--against was removed; use hf_lorax.analysis.subspace_similarity"),
])
def test_a_removed_flag_is_named_with_what_replaces_it(module, argv, instead, capsys):
    import importlib

    with pytest.raises(SystemExit) as exited:
        importlib.import_module(module).main(argv)
    err = capsys.readouterr().err
    assert exited.value.code == 2 and err.startswith(f"error: {instead}") and err.count("\n") == 1
    assert "CHANGELOG.md" in err
