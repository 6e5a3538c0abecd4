"""Resource limits of a sandbox and the result of one command run in it."""
from __future__ import annotations

import dataclasses

GIB = 1 << 30
MIB = 1 << 20


@dataclasses.dataclass(frozen=True)
class SandboxLimits:
    """Limits of an episode and of every command it runs.

    The rlimits (cpu_seconds, address_space_bytes, file_size_bytes, open_files) are per process, as the
    kernel defines them. max_processes is RLIMIT_NPROC of the sandbox's own unprivileged uid, so it
    bounds all live tasks of the episode together (background jobs and threads included: a BLAS library
    starts one thread per core); the episode's cgroup caps its tasks too (pids.max = max_processes plus a
    few for the sandbox's own root-owned helpers). When the episode's tasks stay at that limit, every
    process of the episode is killed (a fork bomb would otherwise make every later command fail).
    memory_bytes caps the memory of the whole episode, all its processes together, including what its
    private /tmp and /dev/shm hold (cgroup memory.max / memory.limit_in_bytes, no swap): past it the
    kernel's OOM killer ends one of the episode's processes and the command's notes say so.
    disk_bytes bounds the space of the episode directory: it becomes a file system of that size (a loop
    mounted ext4 image, copied back into the directory at close()), so any write past the limit fails
    with "No space left on device" (ENOSPC) at once, however many commands or processes write; files
    stay, so the agent can delete some and go on. /tmp is bounded apart by tmp_bytes.
    Where the host lacks cgroups or loop devices the sandbox says so once (logging.warning) and falls
    back to per-process limits and to measuring the directory every few seconds.
    """

    cpu_seconds: int = 3600                 # RLIMIT_CPU, per process
    address_space_bytes: int = 16 * GIB     # RLIMIT_AS, per process
    max_processes: int = 1024               # RLIMIT_NPROC of the episode's uid: all its tasks
    file_size_bytes: int = 4 * GIB          # RLIMIT_FSIZE: largest file a process may write
    open_files: int = 1024                  # RLIMIT_NOFILE, per process
    output_bytes: int = 32_000              # bytes of a command's output kept (head and tail)
    command_timeout_s: float = 600.0        # default wall-clock limit of one command
    episode_timeout_s: float | None = None  # wall-clock limit of the whole episode (None: none)
    disk_bytes: int | None = None           # space of the episode directory (None: not bounded)
    memory_bytes: int | None = 8 * GIB      # memory of all the episode's processes (None: not bounded)
    tmp_bytes: int = 512 * MIB              # size of the sandbox's private /tmp (a tmpfs, in RAM)
    shm_bytes: int = 256 * MIB              # size of its /dev/shm (Python multiprocessing needs it)
    # After the command's main process exits, how long to keep reading output from background
    # processes that still hold it before killing the processes the command started (a command whose
    # jobs all have their output redirected ends at once, and its jobs are kept).
    drain_grace_s: float = 1.0

    def __post_init__(self):
        for name in ("cpu_seconds", "address_space_bytes", "max_processes", "file_size_bytes",
                     "open_files", "output_bytes", "tmp_bytes", "shm_bytes"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"SandboxLimits.{name} must be a positive integer, got {value!r}")
        if self.disk_bytes is not None and (not isinstance(self.disk_bytes, int) or self.disk_bytes <= 0):
            raise ValueError(f"SandboxLimits.disk_bytes must be a positive integer or None, got {self.disk_bytes!r}")
        if self.memory_bytes is not None and (not isinstance(self.memory_bytes, int)
                                              or self.memory_bytes < 16 * MIB):
            raise ValueError(f"SandboxLimits.memory_bytes must be an integer >= {16 * MIB} (16 MiB: a shell "
                             f"and its tools need a few MiB) or None, got {self.memory_bytes!r}")
        if self.disk_bytes is not None and self.disk_bytes < MIB:
            raise ValueError(f"SandboxLimits.disk_bytes must be >= {MIB} (1 MiB, the smallest episode file "
                             f"system) or None, got {self.disk_bytes!r}")
        if self.max_processes < 4:
            raise ValueError(f"SandboxLimits.max_processes must be >= 4 (a shell needs a few), "
                             f"got {self.max_processes}")
        if not self.command_timeout_s > 0:
            raise ValueError(f"SandboxLimits.command_timeout_s must be > 0, "
                             f"got {self.command_timeout_s!r}")
        if self.episode_timeout_s is not None and not self.episode_timeout_s > 0:
            raise ValueError(f"SandboxLimits.episode_timeout_s must be > 0 or None, "
                             f"got {self.episode_timeout_s!r}")
        if self.drain_grace_s < 0:
            raise ValueError(f"SandboxLimits.drain_grace_s must be >= 0, got {self.drain_grace_s!r}")


# Exit code reported when a command was killed at its (or the episode's) time limit, as `timeout` does.
TIMEOUT_EXIT_CODE = 124


@dataclasses.dataclass(frozen=True)
class CommandResult:
    """What one command did.

    exit_code: the shell's exit status; 128+N when killed by signal N; 124 when timed out.
    output: stdout and stderr interleaved, decoded as UTF-8 (invalid bytes replaced); when longer than
      the limit, the head and the tail are kept with a marker line between them saying how much was cut.
    notes: sandbox events worth telling the agent about (also appended to `output`).
    """

    exit_code: int
    output: str
    timed_out: bool
    truncated: bool
    wall_s: float
    notes: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and not self.timed_out

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
