"""The seccomp filter every sandboxed command runs under (a classic BPF program, built here by hand).

Contract: `filter_program()` returns the bytes of a `struct sock_filter[]` program for this machine's
architecture. launcher.py installs it (prctl PR_SET_SECCOMP, SECCOMP_MODE_FILTER, after
PR_SET_NO_NEW_PRIVS) just before it executes the command, and the kernel keeps it on every process the
command starts; no process of the agent can remove it.

What it does, in order:
- the calling convention must be the architecture's native one (x86_64 or aarch64): anything else (e.g.
  i386 `int 0x80` from a 64-bit process) kills the process; on x86_64 the x32 syscall range is refused;
- refuses (EPERM) the syscalls that let a process reach outside its sandbox or into another process:
  ptrace and the other process-inspection calls (so an agent process cannot trace the set-up of a later
  command, nor any other process), the kernel keyring (add_key, request_key, keyctl: keys would outlive
  the episode), mounting and namespace changes (mount, pivot_root, unshare, setns, the new mount API),
  clone with any CLONE_NEW* flag (user namespaces would hand the agent capabilities over a fresh
  namespace), kernel modules, kexec, bpf, perf_event_open, userfaultfd, io_uring (whose operations
  bypass seccomp), swap, reboot, accounting, quotas, file handles and the syslog;
- clone3 gets ENOSYS, so that C libraries fall back to clone, whose flags the filter can inspect;
- everything else is allowed.

Like Docker's default profile it blocks the keyring, ptrace, namespaces and mounts; unlike Docker's it is
a deny-list (every syscall not listed stays available), which keeps compilers, interpreters and ML
libraries working. An unknown architecture is refused loudly (SeccompUnsupportedError).
"""
from __future__ import annotations

import errno
import platform
import struct

# struct seccomp_data: int nr; __u32 arch; __u64 instruction_pointer; __u64 args[6].
_NR_OFFSET, _ARCH_OFFSET, _ARG0_LOW_OFFSET = 0, 4, 16
# Classic BPF opcodes.
_LD_W_ABS = 0x20     # BPF_LD | BPF_W | BPF_ABS
_JEQ_K = 0x15        # BPF_JMP | BPF_JEQ | BPF_K
_JGE_K = 0x35        # BPF_JMP | BPF_JGE | BPF_K
_JSET_K = 0x45       # BPF_JMP | BPF_JSET | BPF_K
_RET_K = 0x06        # BPF_RET | BPF_K
RET_KILL_PROCESS = 0x80000000
RET_ERRNO = 0x00050000
RET_ALLOW = 0x7FFF0000

AUDIT_ARCH = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}
_X32_SYSCALL_BIT = 0x40000000
# CLONE_NEWNS | CLONE_NEWCGROUP | CLONE_NEWUTS | CLONE_NEWIPC | CLONE_NEWUSER | CLONE_NEWPID |
# CLONE_NEWNET | CLONE_NEWTIME
CLONE_NAMESPACE_FLAGS = 0x00020000 | 0x02000000 | 0x04000000 | 0x08000000 | 0x10000000 | \
    0x20000000 | 0x40000000 | 0x00000080

# Syscall numbers (x86_64: arch/x86/entry/syscalls/syscall_64.tbl; aarch64: the generic table).
_SYSCALLS = {
    #                      x86_64  aarch64
    "ptrace":             (101,    117),
    "process_vm_readv":   (310,    270),
    "process_vm_writev":  (311,    271),
    "kcmp":               (312,    272),
    "pidfd_getfd":        (438,    438),
    "add_key":            (248,    217),
    "request_key":        (249,    218),
    "keyctl":             (250,    219),
    "mount":              (165,    40),
    "umount2":            (166,    39),
    "pivot_root":         (155,    41),
    "chroot":             (161,    51),
    "open_tree":          (428,    428),
    "move_mount":         (429,    429),
    "fsopen":             (430,    430),
    "fsconfig":           (431,    431),
    "fsmount":            (432,    432),
    "fspick":             (433,    433),
    "mount_setattr":      (442,    442),
    "unshare":            (272,    97),
    "setns":              (308,    268),
    "kexec_load":         (246,    104),
    "kexec_file_load":    (320,    294),
    "init_module":        (175,    105),
    "finit_module":       (313,    273),
    "delete_module":      (176,    106),
    "bpf":                (321,    280),
    "perf_event_open":    (298,    241),
    "userfaultfd":        (323,    282),
    "io_uring_setup":     (425,    425),
    "io_uring_enter":     (426,    426),
    "io_uring_register":  (427,    427),
    "swapon":             (167,    224),
    "swapoff":            (168,    225),
    "reboot":             (169,    142),
    "acct":               (163,    89),
    "quotactl":           (179,    60),
    "quotactl_fd":        (443,    443),
    "open_by_handle_at":  (304,    265),
    "name_to_handle_at":  (303,    264),
    "syslog":             (103,    116),
    "lookup_dcookie":     (212,    18),
    "fanotify_init":      (300,    262),
    "vhangup":            (153,    58),
    "nfsservctl":         (180,    42),
    # x86_64 only
    "iopl":               (172,    None),
    "ioperm":             (173,    None),
    "uselib":             (134,    None),
    "create_module":      (174,    None),
    "get_kernel_syms":    (177,    None),
    "query_module":       (178,    None),
    "_sysctl":            (156,    None),
}
_CLONE = {"x86_64": 56, "aarch64": 220}
_CLONE3 = {"x86_64": 435, "aarch64": 435}
DENIED = tuple(_SYSCALLS)


class SeccompUnsupportedError(RuntimeError):
    """No syscall table for this machine's architecture."""


def machine() -> str:
    arch = platform.machine()
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(arch.lower(), arch)


def _insn(code: int, jt: int, jf: int, k: int) -> bytes:
    return struct.pack("=HBBI", code, jt, jf, k)


def filter_program(arch: str | None = None) -> bytes:
    """The filter for `arch` (default: this machine) as raw `struct sock_filter` records."""
    arch = arch or machine()
    if arch not in AUDIT_ARCH:
        raise SeccompUnsupportedError(
            f"the sandbox's seccomp filter has syscall numbers for {sorted(AUDIT_ARCH)}, not for this "
            f"machine's architecture {arch!r}; add its numbers to klong_jax/sandbox/seccomp.py")
    column = 0 if arch == "x86_64" else 1
    eperm, enosys = RET_ERRNO | errno.EPERM, RET_ERRNO | errno.ENOSYS
    prog = [
        _insn(_LD_W_ABS, 0, 0, _ARCH_OFFSET),
        _insn(_JEQ_K, 1, 0, AUDIT_ARCH[arch]),
        _insn(_RET_K, 0, 0, RET_KILL_PROCESS),
        _insn(_LD_W_ABS, 0, 0, _NR_OFFSET),
    ]
    if arch == "x86_64":
        prog += [_insn(_JGE_K, 0, 1, _X32_SYSCALL_BIT), _insn(_RET_K, 0, 0, eperm)]
    for numbers in _SYSCALLS.values():
        nr = numbers[column]
        if nr is not None:
            prog += [_insn(_JEQ_K, 0, 1, nr), _insn(_RET_K, 0, 0, eperm)]
    prog += [
        _insn(_JEQ_K, 0, 1, _CLONE3[arch]),
        _insn(_RET_K, 0, 0, enosys),
        _insn(_JEQ_K, 0, 3, _CLONE[arch]),
        _insn(_LD_W_ABS, 0, 0, _ARG0_LOW_OFFSET),  # clone's flags (the low 32 bits of its first arg)
        _insn(_JSET_K, 0, 1, CLONE_NAMESPACE_FLAGS),
        _insn(_RET_K, 0, 0, eperm),
        _insn(_RET_K, 0, 0, RET_ALLOW),
    ]
    if len(prog) > 4096:  # BPF_MAXINSNS
        raise AssertionError(f"seccomp program too long: {len(prog)} instructions")
    return b"".join(prog)
