"""Agents of a ``corral up`` run as root, each as an unprivileged user of its own.

Every agent replica of one identity runs as the system user ``corral-<identity>`` (created
with ``useradd --system`` if missing; ``nobody`` where there is no ``useradd``, shared by
all agents). That user can read none of the seeds in ``<state_dir>/creds`` (0700, root):
the launcher copies the agent's own seed into an anonymous memory file (``memfd``) that
only the child inherits, and points ``CORRAL_CREDS`` at ``/proc/self/fd/N``. Another
user cannot open another process's ``/proc/<pid>/fd``, so one agent cannot read another's
seed. The supervisor and a separate gateway keep the launcher's user: they reach the
embedded PostgreSQL's socket, which is private to it.

Without root none of this is possible: seeds are 0600 in a 0700 directory, so only the
user who runs ``corral up`` can read them, and every child runs as that user and could.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import pwd
import re
import shutil
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from corral.supervisor.errors import LauncherError

logger = logging.getLogger(__name__)

_FALLBACK_USER = "nobody"

_DROP = (
    "import os, sys\n"
    "uid, gid = int(sys.argv[1]), int(sys.argv[2])\n"
    "os.setgroups([])\n"
    "os.setgid(gid)\n"
    "os.setuid(uid)\n"
    "if os.getuid() != uid or os.geteuid() != uid:\n"
    "    sys.exit('cannot drop to uid %d' % uid)\n"
    "os.execv(sys.argv[3], sys.argv[3:])\n"
)


@dataclass
class ChildUser:
    """Who one child runs as, and the memory file that holds its seed."""

    uid: int
    gid: int
    seed_fd: int | None = None
    env: dict[str, str] = field(default_factory=dict)

    def argv(self, argv: Sequence[str]) -> list[str]:
        """``argv`` (its first item the program's path), run as this user: a small Python
        drops the groups, the group and the user, then executes it (uvloop's
        ``subprocess_exec`` takes no ``user``/``group``, and ``preexec_fn`` is unsafe)."""
        return [sys.executable, "-I", "-c", _DROP, str(self.uid), str(self.gid), *argv]

    def popen_kwargs(self) -> dict[str, Any]:
        """What ``create_subprocess_exec`` needs besides ``argv``: the seed's descriptor."""
        return {"pass_fds": (self.seed_fd,) if self.seed_fd is not None else (), "cwd": "/"}

    def close(self) -> None:
        """Close the seed's memory file (children keep their own copy of the descriptor)."""
        if self.seed_fd is not None:
            os.close(self.seed_fd)
            self.seed_fd = None


def user_name(identity: str) -> str:
    """The system user of an identity: ``corral-<identity>``, made a valid user name."""
    name = "corral-" + re.sub(r"[^a-z0-9_-]", "-", identity.lower())
    if len(name) > 32:
        name = "corral-" + hashlib.sha256(identity.encode()).hexdigest()[:16]
    return name


def ensure_user(name: str) -> pwd.struct_passwd:
    """The system user ``name``, created (no home, no shell) if missing; ``nobody`` if it
    cannot be.

    Raises:
        LauncherError: if neither exists.
    """
    try:
        return pwd.getpwnam(name)
    except KeyError:
        pass
    useradd = shutil.which("useradd")
    if useradd is not None:
        result = subprocess.run(
            [
                useradd,
                "--system",
                "--user-group",
                "--no-create-home",
                "--home-dir",
                "/nonexistent",
                "--shell",
                "/usr/sbin/nologin",
                name,
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        try:
            return pwd.getpwnam(name)
        except KeyError:
            logger.warning(
                "cannot create user %s (%s); using %s", name, result.stderr.strip(), _FALLBACK_USER
            )
    try:
        return pwd.getpwnam(_FALLBACK_USER)
    except KeyError as exc:
        raise LauncherError(f"no user {name} and no {_FALLBACK_USER} to run agents as") from exc


def can_read(user: ChildUser, paths: Sequence[Path]) -> bool:
    """Whether ``user`` can read every file of ``paths`` (asked of the kernel, as that user)."""
    probe = "import sys\nfor p in sys.argv[1:]:\n    open(p, 'rb').close()\n"
    result = subprocess.run(
        user.argv([sys.executable, "-I", "-c", probe, *map(str, paths)]),
        capture_output=True,
        cwd="/",
        timeout=30,
        check=False,
    )
    return result.returncode == 0


def config_files(config: Path, relative: Sequence[str]) -> list[Path]:
    """The config file and the files it names relative to itself that exist."""
    found = [config]
    for name in relative:
        path = config.parent / name
        with contextlib.suppress(OSError):
            if path.is_file():
                found.append(path)
    return found


def child_user(identity: str, seed: Path | None) -> ChildUser:
    """The user an agent identity runs as, with its seed in an inheritable memory file."""
    entry = ensure_user(user_name(identity))
    child = ChildUser(uid=entry.pw_uid, gid=entry.pw_gid, env={"HOME": "/nonexistent", "USER": entry.pw_name})
    if seed is not None:
        fd = os.memfd_create(f"corral-{identity}.nk", os.MFD_CLOEXEC)
        os.write(fd, seed.read_bytes())
        child.seed_fd = fd
        child.env["CORRAL_CREDS"] = f"/proc/self/fd/{fd}"
    return child
