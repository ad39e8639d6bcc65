"""Run the console scripts as a user would: a fresh interpreter, real argv, captured output (:func:`run_cli`); or,
where what is tested is a command's message and exit code rather than its process, the same command in this
process (:func:`invoke_cli`), without the fresh interpreter's imports (0.3 s for `samf`, 1.5-4 s of CPU for a
`samf-train` command, which imports torch and transformers)."""

import importlib
import os
import subprocess
import sys
import tempfile
import traceback
import warnings

MODULES = {"samf": "samf_cli", "samf-train": "train_cli", "samf-export": "export_cli"}


def run_cli(tool: str, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    code = f"import sys; from samf.cli.{MODULES[tool]} import main; sys.exit(main())"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=timeout)


#: The warning filters of a fresh interpreter (pytest installs its own, and records warnings instead of printing).
_FRESH_FILTERS = (("default", DeprecationWarning, "__main__"), ("ignore", DeprecationWarning, ""),
                  ("ignore", PendingDeprecationWarning, ""), ("ignore", ImportWarning, ""),
                  ("ignore", ResourceWarning, ""))


def _print_warning(message, category, filename, lineno, file=None, line=None):
    sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))


def invoke_cli(tool: str, *args: str) -> subprocess.CompletedProcess:
    """``tool ARGS`` run in this process through click's CliRunner, answered as :func:`run_cli` answers: the exit
    code, stdout and stderr. What a native library writes to file descriptors 1 and 2 is in them too; warnings are
    printed as a fresh interpreter prints them; an exception that would have ended the process with a traceback
    is a traceback in stderr and exit 1. The environment, the warning filters and torch's thread count are as they
    were before. Not for what only a fresh process shows (its start, a hang, signals, its memory): run_cli."""
    from click.testing import CliRunner

    main = importlib.import_module(f"samf.cli.{MODULES[tool]}").main
    env = dict(os.environ)
    torch = sys.modules.get("torch")
    threads = torch.get_num_threads() if torch is not None else None
    with tempfile.TemporaryFile() as fd_out, tempfile.TemporaryFile() as fd_err, warnings.catch_warnings():
        warnings.resetwarnings()
        for action, category, module in reversed(_FRESH_FILTERS):
            warnings.filterwarnings(action, category=category, module=module)
        warnings.showwarning = _print_warning
        sys.stdout.flush()
        sys.stderr.flush()
        saved = os.dup(1), os.dup(2)
        os.dup2(fd_out.fileno(), 1)
        os.dup2(fd_err.fileno(), 2)
        try:
            result = CliRunner().invoke(main, list(args), prog_name=tool, catch_exceptions=True)
        finally:
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])
            os.environ.clear()
            os.environ.update(env)
            if torch is not None:  # a stage command sets its --threads
                torch.set_num_threads(threads)
        fd_out.seek(0)
        fd_err.seek(0)
        native_out = fd_out.read().decode("utf-8", "replace")
        native_err = fd_err.read().decode("utf-8", "replace")
    stderr = result.stderr + native_err
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        stderr += "".join(traceback.format_exception(*result.exc_info))
    return subprocess.CompletedProcess([tool, *args], result.exit_code, result.stdout + native_out, stderr)
