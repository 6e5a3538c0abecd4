"""The submission files an LLM judge reads, chosen and cut to a bounded size."""
from __future__ import annotations

import os
import re
import stat

# Files a reproduction is judged by first (PaperBench's judge reads reproduce.sh and its log).
_FIRST = ("reproduce.sh", "reproduce.log", "README.md", "README")
_TEXT_SUFFIXES = (".py", ".sh", ".md", ".txt", ".json", ".yaml", ".yml", ".toml", ".cfg", ".ini",
                  ".csv", ".tsv", ".log", ".ipynb", ".c", ".cc", ".cpp", ".h", ".rs", ".go", ".js",
                  ".ts", ".java", ".jl", ".r", ".tex", "")
_SKIP_DIRS = {".git", "__pycache__", ".venv", "venv", "node_modules", ".ipynb_checkpoints"}
_MAX_LISTED = 300


def cut_middle(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    head = limit // 2
    tail = limit - head
    return f"{text[:head]}\n[... {len(text) - limit} characters omitted ...]\n{text[-tail:]}"


def read_head_and_tail(path: str, limit: int) -> str:
    """The file's text if it fits in `limit` characters, else its head and tail with a marker; reads
    O(limit) bytes whatever the file's size (logs can be gigabytes)."""
    with _open_no_follow(path) as f:
        size = os.fstat(f.fileno()).st_size
        if size <= limit:
            return f.read(limit).decode("utf-8", errors="replace")
        head = f.read(limit // 2).decode("utf-8", errors="replace")
        f.seek(size - (limit - limit // 2))
        tail = f.read(limit - limit // 2).decode("utf-8", errors="replace")
    return f"{head}\n[... {size - limit} bytes omitted ...]\n{tail}"


def _is_text(path: str) -> bool:
    if os.path.splitext(path)[1].lower() not in _TEXT_SUFFIXES:
        return False
    try:
        with _open_no_follow(path) as f:
            return b"\0" not in f.read(4096)
    except OSError:
        return False


def _open_no_follow(path: str):
    """The grader runs as root over files an agent wrote: never follow a symlink out of the
    submission (e.g. to /etc/shadow), and never block on a FIFO."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(f"{path} is not a regular file")
    return os.fdopen(fd, "rb")


def collect_files(episode_dir: str, requirement: str, *, max_file_chars: int, max_total_chars: int
                  ) -> tuple[str, list[str]]:
    """Returns (text for the prompt, relative paths included). Order: files named in the requirement,
    then reproduce.sh / its log / README, then other text files, smallest first (more files fit)."""
    listing: list[tuple[str, int]] = []
    for root, dirs, files in os.walk(episode_dir):
        dirs[:] = sorted(d for d in dirs if d not in _SKIP_DIRS)
        for name in sorted(files):
            path = os.path.join(root, name)
            try:
                size = os.lstat(path).st_size
            except OSError:
                continue
            if not os.path.islink(path):
                listing.append((os.path.relpath(path, episode_dir), size))
    words = set(re.findall(r"[\w./-]+", requirement))

    def priority(item: tuple[str, int]) -> tuple[int, int]:
        rel, size = item
        if rel in words or os.path.basename(rel) in words:
            return 0, size
        if rel in _FIRST:
            return 1, _FIRST.index(rel)
        return 2, size

    parts = ["Files in the submission (path, bytes):"]
    parts += [f"  {rel} ({size})" for rel, size in listing[:_MAX_LISTED]]
    if len(listing) > _MAX_LISTED:
        parts.append(f"  ... and {len(listing) - _MAX_LISTED} more")
    used = sum(len(p) + 1 for p in parts)
    included = []
    for rel, _ in sorted(listing, key=priority):
        if used >= max_total_chars:
            break
        path = os.path.join(episode_dir, rel)
        if not _is_text(path):
            continue
        try:
            body = read_head_and_tail(path, min(max_file_chars, max_total_chars - used))
        except OSError:
            continue
        block = f"\n===== {rel} =====\n{body}\n"
        parts.append(block)
        used += len(block)
        included.append(rel)
    return "\n".join(parts), included
