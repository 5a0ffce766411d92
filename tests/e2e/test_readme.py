"""The README's shell commands run as written, in bash and in zsh, after the quick start's activation.

Cheap ones run for real (`memtrain --help`, `--print-config`); training and launch commands run up to the point
where they would start work: `--print-config` appended (the config and every override resolve), `memtrain
launch --dry-run` (the launcher command is built), `--help` for tools that need a trained checkpoint. Commands
with placeholders (`...`), `make`, `sbatch`, `tensorboard` and benchmarks are left out.
"""
from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SKIP = ("make ", "sbatch ", "tensorboard ", "python benchmarks/", ".venv/bin/python -m pytest")


def readme_commands() -> list[str]:
    """Every command line of the README's ```bash blocks (continuations joined, comments dropped)."""
    text = (ROOT / "README.md").read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()
            if line and not line.startswith("#"):
                commands.append(line)
    return commands


def cheap_form(command: str) -> str | None:
    """The command as the test runs it (see the module docstring), or None to leave it out."""
    if "..." in command or command.startswith(SKIP):
        return None
    if command.startswith("source ") or command == "memtrain --help":
        return command
    if command.startswith("torchrun "):  # the same trainer arguments, one process, config only
        return "memtrain train " + command.split("-m memtrain.train", 1)[1] + " --print-config"
    if command.startswith(("memtrain train ", "memtrain experiment ")):
        return command + " --print-config"
    if command.startswith("memtrain launch "):
        return command.replace("memtrain launch ", "memtrain launch --dry-run ", 1)
    if command.startswith(("memtrain export-hf", "memtrain import-hf", "memtrain inspect")):
        return command + " --help"
    return None


def test_the_readme_has_the_commands_this_test_covers():
    forms = [cheap_form(c) for c in readme_commands()]
    assert forms[0] is not None and sum(f is not None for f in forms) >= 10, forms
    assert any(f and f.startswith("source .venv/bin/activate") for f in forms)


@pytest.mark.slow
@pytest.mark.parametrize("shell", ["bash", "zsh"])
def test_readme_commands_run_as_written(shell, tmp_path):
    if shutil.which(shell) is None:
        pytest.skip(f"{shell} is not installed (.ci/run installs it)")
    venv = ROOT / ".venv"
    if not (venv / "bin" / "activate").is_file() or Path(sys.prefix).resolve() != venv.resolve():
        pytest.skip("the README's activation needs the project's .venv (make setup), and the tests running in it")
    # the commands run from a copy of the layout they expect: configs/ and the checkout's hostfile example
    work = tmp_path / "work"
    work.mkdir()
    for name in ("configs", "memtrain", ".venv"):
        (work / name).symlink_to(ROOT / name)
    (work / "hosts").write_text("node0 slots=1\nnode1 slots=1\n")
    lines = [cheap_form(c) for c in readme_commands()]
    # "after the quick start": the README's own activation line first, then every command in README order
    script = ["set -e", "source .venv/bin/activate"] + [f"printf '%s\\n' {shlex.quote('>>> ' + line)}; {line} > /dev/null"
                           for line in lines if line is not None]
    proc = subprocess.run([shell, "-c", "\n".join(script)], cwd=work, capture_output=True, text=True, timeout=900,
                          env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    ran = [line[4:] for line in proc.stdout.splitlines() if line.startswith(">>> ")]
    assert proc.returncode == 0, f"{shell} stopped at: {ran[-1] if ran else '?'}\n{proc.stderr[-3000:]}"
    assert len(ran) == sum(line is not None for line in lines)


def test_no_readme_command_needs_quoting_it_lacks():
    """Brackets and braces in an unquoted word are globs in zsh ("no matches found"): the README quotes them."""
    for command in readme_commands():
        for word in shlex.split(command, posix=True) if "'" not in command else []:
            assert not re.search(r"[\[\]{}*?]", word), f"quote {word!r} in: {command}"
