"""Run README.md's command blocks as a new user would, and check what each line promises.

A block runs when the line before it (blank lines aside) is ``<!-- readme-test -->``. Each
line of it is a shell-free command; what it promises is in its trailing ``# comment``:
- ``(exit N)``: the exit code (else 0);
- text in backticks: printed by the command (stdout or stderr).
A line ending in ``&`` starts in the background, and the next line waits until it printed
``corral is up``. ``a-…`` and ``c-…`` stand for the approval and conversation id printed last.
``pip install … &&`` in front of a command is skipped: the test runs in the installed package.

``python -m tests.readme_runner [README.md]`` runs them in a fresh temporary directory.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path

MARK = "<!-- readme-test -->"
READY = "corral is up"
IDS = {"a-…": re.compile(r"\ba-[0-9a-f]{8,}\b"), "c-…": re.compile(r"\bc-[0-9a-f]{8,}\b")}


@dataclass(frozen=True)
class Line:
    """One command of a README block and what its comment promises."""

    number: int
    command: str
    exit_code: int
    prints: tuple[str, ...]
    background: bool

    @classmethod
    def parse(cls, number: int, text: str) -> Line:
        command, _, comment = text.partition("  # ")
        command = re.sub(r"^pip install \S+ '[^']*' && ", "", command.strip())
        background = command.endswith("&")
        exit_match = re.search(r"\(exit (\d+)\)", comment)
        return cls(
            number=number,
            command=command.rstrip("&").strip(),
            exit_code=int(exit_match.group(1)) if exit_match else 0,
            prints=tuple(re.findall(r"`([^`]+)`", comment)),
            background=background,
        )


def blocks(readme: Path) -> list[list[Line]]:
    """The README's marked blocks, in order."""
    lines = readme.read_text().splitlines()
    found: list[list[Line]] = []
    index = 0
    while index < len(lines):
        if lines[index].strip() != MARK:
            index += 1
            continue
        index += 1
        while index < len(lines) and not lines[index].strip():
            index += 1
        block: list[Line] = []
        while index < len(lines) and (lines[index].startswith("    ") or not lines[index].strip()):
            if lines[index].strip():
                block.append(Line.parse(index + 1, lines[index]))
            index += 1
        found.append(block)
    return found


@dataclass
class Session:
    """A new user's shell in ``directory``: commands run there, one after another."""

    directory: Path
    env: dict[str, str]
    seen: dict[str, str] = field(default_factory=dict)
    background: list[tuple[subprocess.Popen[bytes], Path]] = field(default_factory=list)

    def argv(self, command: str) -> list[str]:
        for placeholder in IDS:
            if placeholder in command:
                assert placeholder in self.seen, f"{command!r}: no {placeholder} printed before it"
                command = command.replace(placeholder, self.seen[placeholder])
        words = shlex.split(command)
        if words[0] == "corral":
            return [sys.executable, "-m", "corral.supervisor", *words[1:]]
        return words

    def run(self, line: Line, timeout: float = 240.0) -> str:
        """Run one line and check its promises; what it printed (for the next lines' ids)."""
        where = f"README.md line {line.number}: {line.command}"
        if line.background:
            log = self.directory / f"background-{line.number}.log"
            process = subprocess.Popen(
                self.argv(line.command),
                cwd=self.directory,
                env=self.env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
            )
            self.background.append((process, log))
            ready = threading.Event()
            threading.Thread(target=_tee, args=(process, log, ready), daemon=True).start()
            # Set once the ready line is out, or the output ended (the process exited).
            assert ready.wait(timeout), f"{where}: no {READY!r} within {timeout}s\n{log.read_text()}"
            output = log.read_text()
            assert READY in output, f"{where}: exited {process.wait()}\n{output}"
        else:
            result = subprocess.run(
                self.argv(line.command),
                cwd=self.directory,
                env=self.env,
                capture_output=True,
                text=True,
                timeout=timeout,
            )
            output = result.stdout + result.stderr
            assert result.returncode == line.exit_code, (
                f"{where}: exit {result.returncode}, the README says {line.exit_code}\n{output}"
            )
        flat = " ".join(output.split())
        for promised in line.prints:
            assert " ".join(promised.split()) in flat, f"{where}: does not print {promised!r}\n{output}"
        for placeholder, pattern in IDS.items():
            ids = pattern.findall(output)
            if ids:
                self.seen[placeholder] = ids[-1]
        return output

    def close(self, timeout: float = 60.0, *, failed: bool = False) -> None:
        """Every background command has exited (the README stopped it); stop what has not.

        After a failed line, each is told to stop (SIGTERM) at once instead."""
        leftovers = []
        for process, log in self.background:
            if failed and process.poll() is None:
                process.terminate()
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
                leftovers.append(f"{process.args!r}\n{log.read_text()}")
        self.background.clear()
        assert failed or not leftovers, "still running after the README's last command:\n" + "\n".join(
            leftovers
        )


def _tee(process: subprocess.Popen[bytes], log: Path, ready: threading.Event) -> None:
    """Copy a background command's output to ``log`` as it comes; ``ready`` is set at its
    ready line, or when its output ends."""
    assert process.stdout is not None
    with open(log, "wb") as out:
        for chunk in iter(process.stdout.readline, b""):
            out.write(chunk)
            out.flush()
            if READY.encode() in chunk:
                ready.set()
    ready.set()


def user_env() -> dict[str, str]:
    """The environment of a user on the embedded defaults: no servers configured."""
    env = {k: v for k, v in os.environ.items() if k not in {"NATS_URL", "DATABASE_URL", "CORRAL_STATE_DIR"}}
    env["COLUMNS"] = "100"
    return env


def run_readme(readme: Path, directory: Path) -> None:
    """Run every marked block of ``readme`` in ``directory``, in order."""
    session = Session(directory, user_env())
    try:
        for block in blocks(readme):
            for line in block:
                session.run(line)
    except BaseException:
        session.close(failed=True)
        raise
    session.close()


if __name__ == "__main__":
    path = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).parent.parent / "README.md")
    with tempfile.TemporaryDirectory() as tmp:
        run_readme(path.resolve(), Path(tmp))
    print("every README block gave what it documents")
