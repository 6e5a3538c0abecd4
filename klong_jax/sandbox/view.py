"""What the sandbox can see: a read-only view of the system, its episode directory and a private /tmp.

Both backends build the same view from a ViewSpec: bubblewrap from command-line flags, the unshare
fallback from fallback_init.py. Nothing else of the host is visible: no /root, /home, /work, /var, /run,
host /tmp or other episodes' directories.
"""
from __future__ import annotations

import dataclasses
import os
import sys

# Top-level system paths shown read-only when present; symlinks (merged /usr) are recreated as symlinks.
SYSTEM_PATHS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc")
# Device nodes bound into the sandbox's /dev (the fallback; bubblewrap's --dev makes the same set).
DEVICE_NODES = ("null", "zero", "full", "random", "urandom", "tty")
# The shell every command runs in, as found inside the view (launcher.py executes it).
BASH = "/bin/bash"
AGENT_USER = "agent"


@dataclasses.dataclass(frozen=True)
class ViewSpec:
    episode_dir: str                # absolute host path, mounted read-write at the same path
    uid: int                        # the unprivileged uid commands run as
    tmp_bytes: int                  # size of the private /tmp
    shm_bytes: int                  # size of the private /dev/shm
    extra_ro_paths: tuple[str, ...]  # more host paths shown read-only at the same path (e.g. a venv)
    passwd_file: str                # host file shown as /etc/passwd (names the agent uid)
    group_file: str                 # host file shown as /etc/group

    def system_entries(self) -> list[tuple[str, str, str]]:
        """(kind, path, target) for each system path: kind is "symlink" or "dir"."""
        entries = []
        for path in SYSTEM_PATHS:
            if os.path.islink(path):
                entries.append(("symlink", path, os.readlink(path)))
            elif os.path.isdir(path):
                entries.append(("dir", path, path))
        return entries

    def to_json_dict(self) -> dict:
        return dataclasses.asdict(self) | {"system_entries": self.system_entries(),
                                           "device_nodes": list(DEVICE_NODES)}


def write_identity_files(directory: str, uid: int, home: str) -> tuple[str, str]:
    """/etc/passwd and /etc/group for the view: the host's entries plus one naming the agent uid, so
    tools that look the user up (whoami, pwd.getpwuid, ssh, some ML libraries) work."""
    passwd_path = os.path.join(directory, "passwd")
    group_path = os.path.join(directory, "group")
    with open("/etc/passwd") as f:
        passwd = [line for line in f.read().splitlines()
                  if line and not line.startswith(f"{AGENT_USER}:")]
    with open("/etc/group") as f:
        group = [line for line in f.read().splitlines()
                 if line and not line.startswith(f"{AGENT_USER}:")]
    passwd.append(f"{AGENT_USER}:x:{uid}:{uid}:sandboxed agent:{home}:{BASH}")
    group.append(f"{AGENT_USER}:x:{uid}:")
    for path, lines in ((passwd_path, passwd), (group_path, group)):
        with open(path, "w") as f:
            f.write("\n".join(lines) + "\n")
        os.chmod(path, 0o644)
    return passwd_path, group_path


def _under(path: str, parent: str) -> bool:
    return path == parent or path.startswith(parent.rstrip("/") + "/")


def _ancestor_dirs(path: str) -> list[str]:
    """bubblewrap creates missing parents of a mount point with mode 0700, which the sandbox uid could
    not traverse: create them first, world-traversable (parents inside a system path already exist)."""
    args = []
    parts = path.strip("/").split("/")[:-1]
    for i in range(1, len(parts) + 1):
        ancestor = "/" + "/".join(parts[:i])
        if not any(_under(ancestor, system) for system in SYSTEM_PATHS):
            args += ["--perms", "0755", "--dir", ancestor]
    return args


def check_episode_dir(path: str) -> None:
    if path == "/" or any(_under(path, system) for system in SYSTEM_PATHS + ("/proc", "/dev", "/sys")):
        raise ValueError(f"episode directory {path!r} must not be / or inside a system directory "
                         f"({', '.join(SYSTEM_PATHS)}, /proc, /dev, /sys)")


def bwrap_view_args(spec: ViewSpec) -> list[str]:
    args = []
    for kind, path, target in spec.system_entries():
        args += ["--symlink", target, path] if kind == "symlink" else ["--ro-bind", path, path]
    args += ["--ro-bind", spec.passwd_file, "/etc/passwd", "--ro-bind", spec.group_file, "/etc/group"]
    args += ["--dev", "/dev", "--perms", "1777", "--size", str(spec.shm_bytes), "--tmpfs", "/dev/shm",
             "--proc", "/proc"]
    args += ["--perms", "1777", "--size", str(spec.tmp_bytes), "--tmpfs", "/tmp"]
    # After /tmp, so paths under /tmp are mounted on top of the private tmpfs.
    for path in spec.extra_ro_paths:
        args += [*_ancestor_dirs(path), "--ro-bind", path, path]
    args += [*_ancestor_dirs(spec.episode_dir), "--bind", spec.episode_dir, spec.episode_dir]
    return args


def command_env(spec: ViewSpec, extra: dict[str, str] | None) -> dict[str, str]:
    """The whole environment a command sees (nothing leaks from the host's environment)."""
    env = {
        "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "HOME": spec.episode_dir,
        "USER": AGENT_USER,
        "LOGNAME": AGENT_USER,
        "LANG": "C.UTF-8",
        "TERM": "dumb",
        "TMPDIR": "/tmp",
        # Tool caches (pip, matplotlib, ...) go to the private /tmp, not into the submission.
        "XDG_CACHE_HOME": "/tmp/.cache",
        "PYTHONUNBUFFERED": "1",
    }
    env.update(extra or {})
    for key in env:
        if not key or "=" in key:
            raise ValueError(f"bad environment variable name {key!r}")
    return env


def host_python() -> tuple[tuple[str, ...], str]:
    """(extra_ro_paths, python) with which a sandbox runs this process's own interpreter, with its
    virtual environment's packages, read-only: Sandbox(dir, extra_ro_paths=paths, python=python).
    Only the installation directories become visible, not the project around them."""
    paths = []
    for prefix in (sys.prefix, sys.base_prefix):
        real = os.path.realpath(prefix)
        if real not in paths and not any(_under(real, system) for system in SYSTEM_PATHS):
            paths.append(real)
    return tuple(paths), sys.executable
