"""Research-Factory ingest: papers (Markdown, LaTeX source, PDF) -> PaperBench-layout task directories.

    paper = load_paper("papers/2402.14758v2.pdf")     # Paper: .markdown, .title, .arxiv_id, .paper_id, ...
    write_task_dir(paper, "out/converted/<id>")        # paper.md, addendum.md, blacklist.txt, config.yaml
    task_dirs = run_ingest(papers_dir, out_dir, manifest, eval_set)   # both stages, resumable

Input kinds, one per entry of the papers directory (names starting with "." are ignored):
  - `*.md` / `*.markdown`: taken as is; title from YAML front matter `title:`, else the first `#`
    heading, else the first non-empty line;
  - a directory with `.tex` files (or a single `*.tex` file): the main file is the one with an
    uncommented `\\documentclass` and `\\begin{document}` (several: the one named main/paper/ms.tex);
    `\\input`/`\\include`/`\\subfile` are followed (relative to the main file's directory, never outside
    the source directory, each file at most once on a path: cycles are cut and noted), comments
    dropped, `\\newcommand`/`\\def` macros expanded, `\\bibliography` replaced by the `.bbl` when there
    is one; then converted by a small LaTeX -> Markdown converter (`latex_to_markdown`): title, authors,
    abstract, `\\section`/`\\subsection`/`\\subsubsection` -> `#`/`##`/`###`, itemize/enumerate/
    description -> lists, `\\textbf` -> `**`, `\\emph`/`\\textit` -> `*`, `\\texttt` -> backticks, math kept
    as `$...$` / `$$...$$` (align-like environments as `aligned`), tabular -> pipe tables, captions,
    `\\cite{a,b}` -> `[a, b]`, `\\ref{x}` -> `[x]`, `\\url`/`\\href` -> links, footnotes inline; unknown
    environments and unknown commands keep their content; figures, TikZ pictures and the like are
    dropped and listed in addendum.md;
  - a directory without `.tex` files but with `paper.md`: that Markdown file;
  - `*.pdf`: the text of each page (pypdf `PdfReader`, `page.extract_text()`), end-of-line hyphens
    joined; the title from the PDF metadata or the first line of page 1.

Extracted: title; arXiv id (`\\d{4}\\.\\d{4,5}(v\\d+)?` with a valid month) from the file name, else an
arXiv stamp (`arXiv:ID [cs.LG]`) or an `arxiv: ID` line near the top; never from the references (a
cited paper's id is not the paper's own). Code links (github, gitlab, bitbucket, codeberg, anonymous
4open) in the title/abstract region or in an own-code sentence ("our code", "code is available at",
"we release") go to blacklist.txt (the agent must not copy the authors' code); other code links are
listed in addendum.md, not blacklisted. Paper id: slug of the title + "-" + the first 8 hex digits of
the source's sha256 (for a directory: over its files' relative paths and bytes).

Errors: a file that cannot be used (unreadable or text-less PDF, empty file, LaTeX without a main
file, fewer than `min_words` words after conversion, unsupported kind) raises IngestError naming
the file and the fix; `run_ingest` records it as a failed stage and goes on with the other papers.
Imports no JAX.
"""
from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import os
import pathlib
import re
import shutil
import time
import unicodedata
from typing import Callable

from klong_jax.factory import decontaminate as decon
from klong_jax.factory.manifest import Manifest, atomic_write_text, hash_inputs

INGEST_VERSION = "ingest/v1"
MIN_WORDS = 20
TASK_FILES = ("paper.md", "addendum.md", "blacklist.txt", "config.yaml")
CONVERTED_DIR = "converted"   # OUT/converted/<id>: every converted paper (decontamination input)
TASKS_DIR = "tasks"           # OUT/tasks/<id>: the papers that passed decontamination
_MAX_INPUT_DEPTH = 32
_MAX_MACRO_EXPANSIONS = 50_000
_MAX_NESTED_EXPANSIONS = 64    # expansions in a row at one place: deeper is a recursive definition


class IngestError(ValueError):
    """A paper that cannot be ingested; the message names the file and what to do."""


@dataclasses.dataclass
class Paper:
    """A converted paper. `notes` lists what the conversion dropped or approximated (for addendum.md)."""

    source: pathlib.Path
    kind: str                       # "markdown" | "latex" | "pdf"
    markdown: str
    title: str
    source_sha256: str
    authors: list[str] = dataclasses.field(default_factory=list)
    arxiv_id: str | None = None
    notes: list[str] = dataclasses.field(default_factory=list)
    files: list[str] = dataclasses.field(default_factory=list)   # LaTeX: files read, main first
    blacklist: list[str] = dataclasses.field(default_factory=list)
    other_code_links: list[str] = dataclasses.field(default_factory=list)

    @property
    def paper_id(self) -> str:
        return make_paper_id(self.title, self.source_sha256)


# ---- small helpers ------------------------------------------------------------------------------
def slugify(text: str, max_len: int = 60) -> str:
    """ASCII, lower case, words joined by '-', cut at a word boundary within max_len; 'paper' if empty."""
    text = unicodedata.normalize("NFKD", text or "").encode("ascii", "ignore").decode()
    parts = re.findall(r"[a-z0-9]+", text.lower())
    slug = ""
    for p in parts:
        if len(slug) + len(p) + (1 if slug else 0) > max_len:
            break
        slug = f"{slug}-{p}" if slug else p
    return slug or (parts[0][:max_len] if parts else "paper")


def make_paper_id(title: str, sha256: str) -> str:
    return f"{slugify(title)}-{sha256[:8]}"


def source_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes; for a directory, over every file's relative path and bytes (sorted;
    hidden files and directories skipped), so any edit, addition or removal changes it."""
    path = pathlib.Path(path)
    h = hashlib.sha256()
    if path.is_dir():
        for f in _walk_files(path):
            h.update(f.relative_to(path).as_posix().encode("utf-8") + b"\0")
            h.update(hashlib.sha256(f.read_bytes()).digest())
        return h.hexdigest()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _walk_files(root: pathlib.Path) -> list[pathlib.Path]:
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        out += [pathlib.Path(dirpath) / f for f in sorted(filenames) if not f.startswith(".")]
    return out


def _read_text(path: pathlib.Path, notes: list[str] | None = None, label: str | None = None) -> str:
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        text = data.decode("latin-1")
        if notes is not None:
            notes.append(f"{label or path.name} is not UTF-8; read as Latin-1")
    return text.replace("\r\n", "\n").replace("\r", "\n")


def detect_kind(path: str | os.PathLike) -> str:
    """'markdown', 'latex' or 'pdf' for an entry of the papers directory; IngestError otherwise."""
    path = pathlib.Path(path)
    if path.is_dir():
        if any(f.suffix == ".tex" for f in _walk_files(path)):
            return "latex"
        if (path / "paper.md").is_file():
            return "markdown"
        raise IngestError(f"{path}: a directory with neither .tex files nor paper.md; a paper is a .md or .pdf "
                          f"file, a .tex file, or a directory of LaTeX sources")
    suffix = path.suffix.lower()
    if suffix in (".md", ".markdown"):
        return "markdown"
    if suffix == ".tex":
        return "latex"
    if suffix == ".pdf":
        return "pdf"
    raise IngestError(f"{path}: unsupported input kind {suffix or '(no extension)'!r}; supported: .md/.markdown, "
                      f".pdf, .tex, or a directory of LaTeX sources (convert other formats to one of these)")


# ---- arXiv ids and code links ------------------------------------------------------------------
_ARXIV_ID = r"(\d{2}(?:0[1-9]|1[0-2])\.\d{4,5}(?:v\d+)?)"
_ARXIV_IN_NAME = re.compile(r"(?<![\d.])" + _ARXIV_ID + r"(?![\d])")
_ARXIV_STAMP = re.compile(r"arXiv:\s*" + _ARXIV_ID + r"\s*\[[A-Za-z.\-]+\]")
_ARXIV_DECL = re.compile(r"^[\s>*_-]*(?:arxiv(?:[ _-]?id)?)\s*[:=]\s*[\"']?(?:arxiv:)?" + _ARXIV_ID,
                         re.IGNORECASE | re.MULTILINE)


def extract_arxiv_id(name: str, text: str, *, head_chars: int | None = 5000) -> str | None:
    """The paper's own arXiv id: from the file name, else an arXiv stamp or an `arxiv: ID` line within
    the first `head_chars` characters of the text. Ids elsewhere in the text (citations) are ignored."""
    m = _ARXIV_IN_NAME.search(name)
    if m:
        return m.group(1)
    head = text if head_chars is None else text[:head_chars]
    m = _ARXIV_STAMP.search(head) or _ARXIV_DECL.search(head)
    return m.group(1) if m else None


_CODE_URL = re.compile(
    r"(?:https?://)?(?:www\.)?(github\.com|gitlab\.com|bitbucket\.org|codeberg\.org|anonymous\.4open\.science/r)"
    r"/([A-Za-z0-9_.\-]+)(?:/([A-Za-z0-9_.\-]+))?", re.IGNORECASE)
_NOT_OWNERS = {"features", "about", "pricing", "topics", "orgs", "sponsors", "marketplace", "explore"}
_OWN_CODE_CUE = re.compile(
    r"\b(our|my)\s+(source\s+)?(code|implementation|repository|repo|software|library|package|project\s+page)"
    r"|\b(code|implementation|repository|source\s+code|codebase)s?\s*(?:\([^)]*\)\s*)?"
    r"(is|are|will\s+be|has\s+been|have\s+been)"
    r"\s+(made\s+)?(publicly\s+|freely\s+|openly\s+)?(available|released|open[- ]?sourced|accessible|hosted)"
    r"|\bwe\s+(publicly\s+)?(release|open[- ]?source|make\s+\w+(\s+\w+)?\s+available|provide\s+(our\s+)?code)"
    r"|\bcode\s*(:|available\s+at|can\s+be\s+found\s+at|at)\s*$"
    r"|\b(code|implementation)\s+(of|for)\s+(this|the\s+proposed|our)\s+(paper|work|method|approach)",
    re.IGNORECASE)
_INTRO = re.compile(r"^\s*(?:#{1,6}\s*)?(?:(?:\d+|[IVX]+)\.?\s+)?introduction\s*$", re.IGNORECASE | re.MULTILINE)


def _front_region_end(markdown: str) -> int:
    """Where the title/abstract region ends: the Introduction heading, else the first heading after an
    Abstract heading, else 3000 characters."""
    m = _INTRO.search(markdown)
    if m:
        return m.start()
    m = re.search(r"^#{1,6}\s*abstract\s*$", markdown, re.IGNORECASE | re.MULTILINE)
    if m:
        nxt = re.compile(r"^#{1,6}\s", re.MULTILINE).search(markdown, m.end())
        if nxt:
            return nxt.start()
    return min(len(markdown), 3000)


def find_code_links(markdown: str) -> tuple[list[str], list[str]]:
    """(own, other) repository URLs, normalised to https://host/owner[/repo]. Own: in the title/abstract
    region, or in a sentence that presents the paper's own code; other: every other code link."""
    front = _front_region_end(markdown)
    own: dict[str, None] = {}
    other: dict[str, None] = {}
    for m in _CODE_URL.finditer(markdown):
        host, owner, repo = m.group(1).lower(), m.group(2), m.group(3)
        owner = owner.rstrip(".")
        if not owner or owner.lower() in _NOT_OWNERS:
            continue
        repo = (repo or "").rstrip(".").removesuffix(".git")
        url = f"https://{host}/{owner}" + (f"/{repo}" if repo else "")
        sentence_start = max(markdown.rfind(". ", 0, m.start()), markdown.rfind("\n\n", 0, m.start()),
                             m.start() - 300)
        context = markdown[sentence_start:m.start()].rstrip(" <([`*\n")
        if m.start() < front or _OWN_CODE_CUE.search(context):
            own[url] = None
        else:
            other[url] = None
    return list(own), [u for u in other if u not in own]


# ---- LaTeX: files, comments, macros -------------------------------------------------------------
_VERBATIM_ENVS = ("verbatim", "verbatim*", "Verbatim", "lstlisting", "minted", "comment")


def strip_comments(text: str) -> str:
    """Drop `%` comments (an unescaped %, i.e. preceded by an even number of backslashes, to the end of
    the line, and the newline with it, as TeX does); verbatim-like environments are left untouched."""
    out: list[str] = []
    in_verb: str | None = None
    for line in text.split("\n"):
        if in_verb is not None:
            out.append(line + "\n")
            if f"\\end{{{in_verb}}}" in line:
                in_verb = None
            continue
        m = re.search(r"\\begin\{(" + "|".join(re.escape(e) for e in _VERBATIM_ENVS) + r")\}", line)
        cut = None
        i = 0
        while True:
            j = line.find("%", i)
            if j < 0:
                break
            k = j
            while k > 0 and line[k - 1] == "\\":
                k -= 1
            if (j - k) % 2 == 0 and not (m and m.start() < j):
                cut = j
                break
            i = j + 1
        if m and f"\\end{{{m.group(1)}}}" not in line[m.end():] and (cut is None or m.start() < cut):
            in_verb = m.group(1)
        if cut is None:
            out.append(line + "\n")
        elif line[:cut].strip():
            out.append(line[:cut])
        # a whole-line comment disappears together with its newline
    return "".join(out)


def _has_main_markers(text: str) -> bool:
    stripped = strip_comments(text)
    return bool(re.search(r"\\documentclass", stripped)) and bool(re.search(r"\\begin\s*\{document\}", stripped))


def find_main_tex(root: pathlib.Path) -> pathlib.Path:
    """The main file of a LaTeX source directory (see the module docstring); IngestError when none or
    when several candidates remain."""
    tex_files = [f for f in _walk_files(root) if f.suffix == ".tex"]
    candidates = [f for f in tex_files if _has_main_markers(_read_text(f))]
    if not candidates:
        shown = ", ".join(f.relative_to(root).as_posix() for f in tex_files[:10])
        raise IngestError(f"{root}: LaTeX source without a main file: none of its .tex files ({shown}"
                          f"{', ...' if len(tex_files) > 10 else ''}) has both \\documentclass and "
                          f"\\begin{{document}}; add the main file (as arXiv ships it) or give the paper as PDF")
    if len(candidates) == 1:
        return candidates[0]
    preferred = [f for f in candidates if f.stem.lower() in ("main", "paper", "ms", "article")]
    if len(preferred) == 1:
        return preferred[0]
    shown = ", ".join(f.relative_to(root).as_posix() for f in candidates)
    raise IngestError(f"{root}: several LaTeX main files ({shown}); keep one, or name the real one main.tex")


_INPUT_CMD = re.compile(r"\\(input|include|subfile)\b\s*(?:\{([^{}]*)\}|([^\s{}\\]+))")


def _resolve_input(name: str, root: pathlib.Path, main_dir: pathlib.Path, cur_dir: pathlib.Path
                   ) -> pathlib.Path | None:
    for base in (main_dir, cur_dir):
        for cand in (base / name, base / f"{name}.tex"):
            if cand.is_file():
                return cand.resolve()
    return None


def expand_inputs(main: pathlib.Path, root: pathlib.Path, notes: list[str], files: list[str]) -> str:
    """The main file with comments dropped and \\input/\\include/\\subfile replaced by the (recursively
    expanded) files. A file already open on the current inclusion path (a cycle), a missing file and a
    file outside `root` are left out with a note."""
    root = root.resolve()
    main = main.resolve()

    def rel(p: pathlib.Path) -> str:
        return p.relative_to(root).as_posix() if p.is_relative_to(root) else str(p)

    def expand(path: pathlib.Path, stack: tuple[pathlib.Path, ...]) -> str:
        if rel(path) not in files:
            files.append(rel(path))
        text = strip_comments(_read_text(path, notes, rel(path)))

        def repl(m: re.Match) -> str:
            cmd, name = m.group(1), (m.group(2) or m.group(3) or "").strip()
            target = _resolve_input(name, root, main.parent, path.parent)
            if target is None:
                notes.append(f"\\{cmd}{{{name}}} in {rel(path)}: file not found, left out")
                return ""
            if not target.is_relative_to(root):
                notes.append(f"\\{cmd}{{{name}}} in {rel(path)}: outside the source directory, left out")
                return ""
            if target in stack:
                cycle = " -> ".join(rel(p) for p in (*stack, target))
                notes.append(f"\\{cmd} cycle {cycle}: the repeated inclusion was left out")
                return ""
            if len(stack) >= _MAX_INPUT_DEPTH:
                notes.append(f"\\{cmd}{{{name}}} in {rel(path)}: nesting deeper than {_MAX_INPUT_DEPTH}, left out")
                return ""
            return "\n" + expand(target, (*stack, target)) + "\n"

        return _INPUT_CMD.sub(repl, text)

    return expand(main, (main,))


def _read_group(s: str, i: int) -> tuple[str, int] | None:
    """The content of the brace group starting at s[i] == '{' and the index after its '}'; None if s[i]
    is not '{'. An unbalanced group runs to the end of s."""
    if i >= len(s) or s[i] != "{":
        return None
    depth, j = 0, i
    while j < len(s):
        c = s[j]
        if c == "\\":
            j += 2
            continue
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return s[i + 1:j], j + 1
        j += 1
    return s[i + 1:], len(s)


def _read_optional(s: str, i: int) -> tuple[str | None, int]:
    """An optional [..] argument at s[i] (after spaces), brace-aware; (None, i) when there is none."""
    j = i
    while j < len(s) and s[j] in " \t":
        j += 1
    if j >= len(s) or s[j] != "[":
        return None, i
    depth, k = 0, j + 1
    while k < len(s):
        c = s[k]
        if c == "\\":
            k += 2
            continue
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
        elif c == "]" and depth == 0:
            return s[j + 1:k], k + 1
        k += 1
    return None, i


def _skip_ws(s: str, i: int, newlines: bool = True) -> int:
    while i < len(s) and (s[i] in " \t" or (newlines and s[i] == "\n" and not s.startswith("\n\n", i))):
        i += 1
    return i


_TOKEN = re.compile(r"\\([A-Za-z@]+|.)", re.DOTALL)
_CMD = re.compile(r"\\([A-Za-z@]+)(\*?)|\\(.)", re.DOTALL)
_ITEM = re.compile(r"\\item(?![A-Za-z])")
_DIMEN = re.compile(r"\s*=?\s*-?[\d.]+\s*(?:pt|in|cm|mm|em|ex|bp|pc|sp|mu|\\[A-Za-z]+)"
                    r"(?:\s*(?:plus|minus)\s*-?[\d.]+\s*(?:pt|in|cm|mm|em|ex|fil+|\\[A-Za-z]+))*")


def _read_arg(s: str, i: int) -> tuple[str, int]:
    """A required argument: a brace group, or else a single token (a command name or one character)."""
    i = _skip_ws(s, i)
    g = _read_group(s, i)
    if g is not None:
        return g
    if i < len(s) and s[i] == "\\":
        m = _TOKEN.match(s, i)
        return m.group(0), m.end()
    return (s[i], i + 1) if i < len(s) else ("", i)


_NEWCOMMAND = re.compile(r"\\(?:newcommand|renewcommand|providecommand|DeclareRobustCommand)\*?\s*")
_DEF = re.compile(r"\\(?:def|gdef|edef|xdef)\s*(\\[A-Za-z@]+)((?:#\d)*)\s*")


def collect_macros(text: str, notes: list[str]) -> tuple[dict[str, tuple[int, str | None, str]], str]:
    """Parse and remove \\newcommand/\\renewcommand/\\providecommand/\\def definitions. Returns
    ({name: (n_args, default_of_first_optional_arg, body)}, text without the definitions)."""
    macros: dict[str, tuple[int, str | None, str]] = {}
    out: list[str] = []
    i = 0
    while True:
        m1 = _NEWCOMMAND.search(text, i)
        m2 = _DEF.search(text, i)
        m = min((x for x in (m1, m2) if x is not None), key=lambda x: x.start(), default=None)
        if m is None:
            out.append(text[i:])
            break
        out.append(text[i:m.start()])
        j = m.end()
        if m is m2:
            name, nargs = m.group(1)[1:], len(re.findall(r"#\d", m.group(2)))
            body = _read_group(text, _skip_ws(text, j))
            if body is None:
                notes.append(f"\\def\\{name}: a parameter text this converter does not parse; the macro is not expanded")
                i = j
                continue
            macros[name] = (nargs, None, body[0])
            i = body[1]
            continue
        g = _read_group(text, j)
        if g is not None:
            name, j = g[0].strip(), g[1]
        else:
            nm = re.match(r"\\[A-Za-z@]+", text[j:])
            if nm is None:
                i = j
                continue
            name, j = nm.group(0), j + nm.end()
        nargs_s, j = _read_optional(text, j)
        default, j = _read_optional(text, j)
        body = _read_group(text, _skip_ws(text, j))
        if body is None or not name.startswith("\\"):
            i = j
            continue
        try:
            nargs = int(nargs_s) if nargs_s else 0
        except ValueError:
            nargs = 0
        macros[name[1:]] = (nargs, default, body[0])
        i = body[1]
    return macros, "".join(out)


def expand_macros(text: str, macros: dict[str, tuple[int, str | None, str]], notes: list[str]) -> str:
    """Replace uses of the collected macros by their bodies (#1.. substituted), rescanning the result;
    stops with a note after a fixed number of expansions (a recursive definition)."""
    if not macros:
        return text
    names = sorted((re.escape(n) for n in macros), key=len, reverse=True)
    pat = re.compile(r"\\(" + "|".join(names) + r")(?![A-Za-z@])")
    count = 0
    same_place = 0
    last_start = -1
    i = 0
    while True:
        m = pat.search(text, i)
        if m is None:
            return text
        count += 1
        same_place = same_place + 1 if m.start() == last_start else 0
        last_start = m.start()
        if same_place > _MAX_NESTED_EXPANSIONS:
            notes.append(f"\\{m.group(1)} expands into itself (a recursive macro); left unexpanded")
            i = m.end()
            continue
        if count > _MAX_MACRO_EXPANSIONS:
            notes.append(f"macro expansion stopped after {_MAX_MACRO_EXPANSIONS} expansions")
            return text
        nargs, default, body = macros[m.group(1)]
        j = m.end()
        args: list[str] = []
        if nargs and default is not None:
            opt, j = _read_optional(text, j)
            args.append(default if opt is None else opt)
        while len(args) < nargs:
            a, j = _read_arg(text, j)
            args.append(a)
        expansion = body
        for k, a in enumerate(args, 1):
            expansion = expansion.replace(f"#{k}", a)
        if nargs == 0 and j < len(text) and text[j] in " \t" and re.match(r"[A-Za-z]", text[m.start() + 1]):
            expansion += " "  # TeX eats the space after a control word; keep one so words do not glue
            j = _skip_ws(text, j, newlines=False)
        text = text[:m.start()] + expansion + text[j:]
        i = m.start()


# ---- LaTeX -> Markdown -------------------------------------------------------------------------
_SECTION_LEVEL = {"part": 1, "chapter": 1, "section": 1, "subsection": 2, "subsubsection": 3}
_MATH_ENVS = {"equation": None, "displaymath": None, "math": None, "align": "aligned", "flalign": "aligned",
              "alignat": "aligned", "eqnarray": "aligned", "gather": "gathered", "multline": None,
              "split": "split"}
_LIST_ENVS = {"itemize": "-", "enumerate": "1.", "description": "-", "compactitem": "-", "compactenum": "1.",
              "inparaenum": "1.", "asparaenum": "1.", "asparaitem": "-"}
_TABLE_ENVS = {"tabular", "tabular*", "tabularx", "tabulary", "longtable", "array"}
_FLOAT_ENVS = {"figure": "Figure", "figure*": "Figure", "wrapfigure": "Figure", "subfigure": "Figure",
               "table": "Table", "table*": "Table", "wraptable": "Table", "algorithm": "Algorithm",
               "algorithm*": "Algorithm"}
_DROP_ENVS = {"comment", "tikzpicture", "pgfpicture", "picture", "pspicture", "axis", "icmlauthorlist"}
_ENV_ARGS = {"subfigure": 1, "minipage": 1, "wrapfigure": 2, "wraptable": 2, "tabular": 1, "tabular*": 2,
             "tabularx": 2, "tabulary": 2, "longtable": 1, "array": 1, "multicols": 1, "thebibliography": 1,
             "alignat": 1, "alignat*": 1, "minted": 1, "adjustbox": 1, "list": 2, "tcolorbox": 0}
_THEOREMS = {n: n.capitalize() for n in ("theorem", "lemma", "corollary", "proposition", "definition",
                                        "remark", "example", "assumption", "conjecture", "claim", "fact",
                                        "observation", "hypothesis", "problem", "question", "note")}
# commands dropped together with their arguments: name -> number of required arguments
_DROP_ARGS = {"label": 1, "vspace": 1, "hspace": 1, "setlength": 2, "addtolength": 2, "setcounter": 2,
              "addtocounter": 2, "usepackage": 1, "RequirePackage": 1, "documentclass": 1,
              "bibliographystyle": 1, "pagestyle": 1, "thispagestyle": 1, "title": 1, "author": 1, "date": 1,
              "thanks": 1, "icmltitle": 1, "icmltitlerunning": 1, "icmlauthor": 2, "icmlaffiliation": 2,
              "icmlcorrespondingauthor": 2, "icmlsetsymbol": 2, "icmlkeywords": 1, "newtheorem": 2,
              "hypersetup": 1, "graphicspath": 1, "definecolor": 3, "affiliation": 1, "email": 1,
              "address": 1, "institute": 1, "keywords": 1, "color": 1, "bibliography": 1,
              "addbibresource": 1, "pdfinfo": 1, "newenvironment": 3, "renewenvironment": 3,
              "DeclareMathOperator": 2, "crefname": 3, "Crefname": 3, "captionsetup": 1, "newlength": 1,
              "theoremstyle": 1, "lstset": 1, "setcitestyle": 1, "nocite": 1, "pagenumbering": 1,
              "runningtitle": 1, "runningauthor": 1, "shorttitle": 1, "fancyhead": 1, "fancyfoot": 1,
              "icmlaffiliations": 1, "printAffiliationsAndNotice": 1, "orcid": 1, "newcounter": 1, "includepdf": 1}
# commands whose last argument is the text: name -> number of required arguments
_KEEP_LAST = {"textcolor": 2, "colorbox": 2, "resizebox": 3, "scalebox": 2, "raisebox": 2, "parbox": 2,
              "multicolumn": 3, "multirow": 3, "makebox": 1, "framebox": 1, "fbox": 1, "mbox": 1,
              "hbox": 1, "text": 1, "textrm": 1, "textsf": 1, "textnormal": 1, "textup": 1, "textmd": 1,
              "textsc": 1, "underline": 1, "uline": 1, "sout": 1, "hl": 1, "textsuperscript": 1,
              "textsubscript": 1, "ensuremath": 1, "smash": 1, "phantomsection": 0, "subfloat": 1,
              "centerline": 1, "cancel": 1, "boxed": 1}
_TEXT_SYMBOLS = {"LaTeX": "LaTeX", "TeX": "TeX", "ldots": "…", "dots": "…", "textbackslash": "\\", "S": "§",
                 "P": "¶", "textendash": "–", "textemdash": "—", "copyright": "©", "textregistered": "®",
                 "texttrademark": "™", "today": "", "textasciitilde": "~", "textasciicircum": "^",
                 "textbar": "|", "textless": "<", "textgreater": ">", "textbullet": "•", "dag": "†",
                 "ddag": "‡", "i": "ı", "o": "ø", "O": "Ø", "ss": "ß", "ae": "æ", "AE": "Æ", "oe": "œ",
                 "OE": "Œ", "aa": "å", "AA": "Å", "l": "ł", "L": "Ł", "par": "\n\n", "newline": "\n",
                 "linebreak": "\n", "quad": " ", "qquad": " ", "enspace": " ", "thinspace": " ",
                 "textquoteright": "'", "textquoteleft": "'", "textdegree": "°", "checkmark": "✓",
                 "cmark": "✓", "xmark": "✗", "appendix": "\n\n# Appendix\n\n", "newblock": " ",
                 "and": ", ", "AND": ", ", "And": ", "}
_ACCENTS = {"'": "\u0301", "`": "\u0300", "^": "\u0302", '"': "\u0308", "~": "\u0303", "=": "\u0304",
            ".": "\u0307", "c": "\u0327", "v": "\u030c", "u": "\u0306", "H": "\u030b", "k": "\u0328",
            "r": "\u030a"}
_SYMBOL_CMDS = {"%": "%", "&": "&", "_": "_", "#": "#", "$": "$", "{": "{", "}": "}", " ": " ", ",": " ",
                ";": " ", ":": " ", "!": "", "@": "", "-": "", "/": "", "\n": " ", "|": "‖"}
_ALGO_WORDS = {"state": "", "if": "if", "elsif": "else if", "elseif": "else if", "else": "else",
               "endif": "end if", "for": "for", "forall": "for all", "endfor": "end for", "while": "while",
               "endwhile": "end while", "return": "return", "require": "Require:", "ensure": "Ensure:",
               "input": "Input:", "output": "Output:", "procedure": "procedure",
               "endprocedure": "end procedure", "function": "function", "endfunction": "end function",
               "repeat": "repeat", "until": "until", "loop": "loop", "endloop": "end loop", "comment": "//"}
_ALGO_INLINE = {"to": "to", "and": "and", "or": "or", "not": "not", "true": "true", "false": "false",
                "xor": "xor", "downto": "down to", "do": "do", "then": "then"}
_FONT_SWITCH = re.compile(r"^\s*\\(bf|bfseries|em|it|itshape|sl|slshape|tt|ttfamily|sc|scshape|rm|sf|"
                          r"normalfont|upshape|mdseries)(?![A-Za-z])\s*")


def _find_unescaped(s: str, token: str, i: int) -> int:
    while True:
        j = s.find(token, i)
        if j < 0:
            return -1
        k = j
        while k > 0 and s[k - 1] == "\\":
            k -= 1
        if (j - k) % 2 == 0:
            return j
        i = j + 1


def _find_env_end(s: str, i: int, name: str) -> tuple[int, int] | None:
    depth = 1
    for m in re.compile(r"\\(begin|end)\s*\{" + re.escape(name) + r"\}").finditer(s, i):
        depth += 1 if m.group(1) == "begin" else -1
        if depth == 0:
            return m.start(), m.end()
    return None


def _split_top(s: str, sep: str) -> list[str]:
    """Split at `sep` ('\\\\' or '&') outside braces, math and nested environments; `\\&` is not a separator."""
    parts, depth, env_depth, in_math, start, i = [], 0, 0, False, 0, 0
    while i < len(s):
        c = s[i]
        if s.startswith("\\begin", i):
            env_depth += 1
        elif s.startswith("\\end", i):
            env_depth -= 1
        if c == "\\":
            if sep == "\\\\" and s.startswith("\\\\", i) and depth == 0 and env_depth == 0 and not in_math:
                parts.append(s[start:i])
                i += 2
                _, i2 = _read_optional(s, i)   # \\[2pt]
                start = i = i2
                continue
            i += 2
            continue
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
        elif c == "$":
            in_math = not in_math
        elif c == sep and depth == 0 and env_depth == 0 and not in_math:
            parts.append(s[start:i])
            start = i + 1
        i += 1
    parts.append(s[start:])
    return parts


class _LatexConverter:
    """The LaTeX -> Markdown converter of one document (collects notes and unknown commands)."""

    def __init__(self, notes: list[str], theorems: dict[str, str]):
        self.notes = notes
        self.theorems = {**_THEOREMS, **theorems}
        self.env_stack: list[str] = []
        self.unknown: collections.Counter = collections.Counter()
        self.figures: list[str] = []
        self.dropped_envs: collections.Counter = collections.Counter()

    def inline(self, s: str) -> str:
        return " ".join(self.render(s).split())

    def render(self, s: str) -> str:
        out: list[str] = []
        i, n = 0, len(s)
        while i < n:
            c = s[i]
            if c == "\\":
                i = self._command(s, i, out)
            elif c == "$":
                if s.startswith("$$", i):
                    j = _find_unescaped(s, "$$", i + 2)
                    if j < 0:
                        out.append("$$")
                        i += 2
                        continue
                    out.append(self._display(s[i + 2:j]))
                    i = j + 2
                else:
                    j = _find_unescaped(s, "$", i + 1)
                    if j < 0:
                        self.notes.append("an unbalanced $ was kept as text")
                        out.append("$")
                        i += 1
                        continue
                    out.append("$" + self._math(s[i + 1:j]).strip() + "$")
                    i = j + 1
            elif c == "{":
                content, i = _read_group(s, i)
                out.append(self._group(content))
            elif c == "}":
                i += 1
            elif c == "~":
                out.append(" ")
                i += 1
            elif c == "&":
                out.append(" ")
                i += 1
            elif c == "\n":
                out.append("\n")
                i += 1
                while i < n and s[i] in " \t":
                    i += 1
            elif s.startswith("``", i) or s.startswith("''", i):
                out.append('"')
                i += 2
            elif s.startswith("---", i):
                out.append("—")
                i += 3
            elif s.startswith("--", i):
                out.append("–")
                i += 2
            else:
                out.append(c)
                i += 1
        return "".join(out)

    # math is kept as LaTeX: only labels and numbering switches go
    def _math(self, m: str) -> str:
        m = re.sub(r"\\label\s*\{[^{}]*\}", "", m)
        m = re.sub(r"\\(nonumber|notag)(?![A-Za-z])", "", m)
        return "\n".join(line.strip() for line in m.strip().split("\n") if line.strip())

    def _display(self, m: str, wrapper: str | None = None) -> str:
        body = self._math(m)
        if wrapper:
            body = f"\\begin{{{wrapper}}}\n{body}\n\\end{{{wrapper}}}"
        return f"\n\n$$\n{body}\n$$\n\n"

    def _group(self, content: str) -> str:
        m = _FONT_SWITCH.match(content)
        if m:
            inner = self.render(content[m.end():]).strip()
            if not inner:
                return ""
            kind = m.group(1)
            if kind in ("bf", "bfseries"):
                return f"**{inner}**"
            if kind in ("em", "it", "itshape", "sl", "slshape"):
                return f"*{inner}*"
            if kind in ("tt", "ttfamily"):
                return f"`{inner}`"
            return inner
        return self.render(content)

    def _command(self, s: str, i: int, out: list[str]) -> int:
        m = _CMD.match(s, i)
        if m is None:
            return i + 1
        if m.group(3) is not None:
            return self._symbol(m.group(3), s, m.end(), out)
        name = m.group(1)
        j = m.end()
        if name in ("vskip", "hskip", "kern", "vspace", "hspace", "hfill", "vfill") and not s.startswith("{", j):
            d = _DIMEN.match(s, j)
            return d.end() if d else j
        if name in ("c", "v", "u", "H", "k", "r") and _skip_ws(s, j) < len(s) and s[_skip_ws(s, j)] == "{":
            return self._accent(name, s, j, out)
        if name in _SECTION_LEVEL or name in ("paragraph", "subparagraph"):
            _, j = _read_optional(s, j)
            title, j = _read_arg(s, j)
            text = self.inline(title)
            if name in _SECTION_LEVEL:
                out.append(f"\n\n{'#' * _SECTION_LEVEL[name]} {text}\n\n")
            else:
                out.append(f"\n\n**{text}** ")
            return j
        if name in ("textbf", "textit", "emph", "textsl", "texttt", "textmd"):
            arg, j = _read_arg(s, j)
            inner = self.inline(arg)
            if not inner:
                return j
            wrap = {"textbf": "**", "texttt": "`"}.get(name, "*")
            out.append(f"{wrap}{inner}{wrap}")
            return j
        if name in ("url", "nolinkurl"):
            arg, j = _read_arg(s, j)
            out.append(f"<{arg.strip()}>")
            return j
        if name == "href":
            url, j = _read_arg(s, j)
            text, j = _read_arg(s, j)
            out.append(f"[{self.inline(text)}]({url.strip()})")
            return j
        if name in ("footnote", "footnotetext"):
            _, j = _read_optional(s, j)
            arg, j = _read_arg(s, j)
            out.append(f" (Footnote: {self.inline(arg)})")
            return j
        if name == "footnotemark":
            _, j = _read_optional(s, j)
            return j
        if name.lower().startswith("cite") or name in ("parencite", "textcite", "autocite", "footcite",
                                                         "citeauthor", "citeyear", "citealp", "citealt"):
            _, j = _read_optional(s, j)
            _, j = _read_optional(s, j)
            keys, j = _read_arg(s, j)
            out.append("[" + ", ".join(k.strip() for k in keys.split(",") if k.strip()) + "]")
            return j
        if name in ("ref", "autoref", "cref", "Cref", "pageref", "nameref", "vref", "Autoref", "subref"):
            keys, j = _read_arg(s, j)
            out.append("[" + ", ".join(k.strip() for k in keys.split(",") if k.strip()) + "]")
            return j
        if name == "eqref":
            key, j = _read_arg(s, j)
            out.append(f"([{key.strip()}])")
            return j
        if name == "includegraphics":
            _, j = _read_optional(s, j)
            f, j = _read_arg(s, j)
            self.figures.append(f.strip())
            return j
        if name == "caption":
            _, j = _read_optional(s, j)
            arg, j = _read_arg(s, j)
            label = next((_FLOAT_ENVS[e] for e in reversed(self.env_stack) if e in _FLOAT_ENVS), "Caption")
            out.append(f"\n\n**{label}:** {self.inline(arg)}\n\n")
            return j
        if name == "verb":
            if j < len(s):
                delim = s[j]
                k = s.find(delim, j + 1)
                if k > 0:
                    out.append(f"`{s[j + 1:k]}`")
                    return k + 1
            return j
        if name == "bibitem":
            _, j = _read_optional(s, j)
            key, j = _read_arg(s, j)
            out.append(f"\n- [{key.strip()}] ")
            return j
        if name == "item":
            label, j = _read_optional(s, j)
            out.append("\n- " + (f"**{self.inline(label)}** " if label else ""))
            return j
        if name == "abstract" and _skip_ws(s, j) < len(s) and s[_skip_ws(s, j)] == "{":
            arg, j = _read_arg(s, j)
            out.append(f"\n\n# Abstract\n\n{self.render(arg).strip()}\n\n")
            return j
        if name == "begin":
            env, j = _read_arg(s, j)
            return self._environment(s, j, env.strip(), out)
        if name == "end":
            _, j = _read_arg(s, j)
            return j
        if name in ("(", "["):
            return j
        if any(e in ("algorithmic", "algorithmic*", "algorithm2e") for e in self.env_stack):
            if name.lower() in _ALGO_INLINE:
                out.append(f" {_ALGO_INLINE[name.lower()]} ")
                return j
            if name.lower() in _ALGO_WORDS:
                args = []
                while _skip_ws(s, j, newlines=False) < len(s) and s[_skip_ws(s, j, newlines=False)] == "{":
                    arg, j = _read_arg(s, j)
                    args.append(self.inline(arg))
                text = " ".join(x for x in (_ALGO_WORDS[name.lower()], *args) if x)
                out.append(("" if out and out[-1].endswith("\n") else "\n") + (text + " " if text else ""))
                return j if text else _skip_ws(s, j, newlines=False)
        if name in _DROP_ARGS:
            for _ in range(2):
                _, j = _read_optional(s, j)
            if name == "newtheorem":
                _, j = _read_optional(s, j)
            for _ in range(_DROP_ARGS[name]):
                _, j = _read_arg(s, j)
                _, j = _read_optional(s, j)
            return j
        if name in _KEEP_LAST:
            _, j = _read_optional(s, j)
            arg = ""
            for _ in range(_KEEP_LAST[name]):
                arg, j = _read_arg(s, j)
                _, j = _read_optional(s, j)
            out.append(self.render(arg) if _KEEP_LAST[name] else "")
            return j
        if name in _TEXT_SYMBOLS:
            out.append(_TEXT_SYMBOLS[name])
            if j < len(s) and s.startswith("{}", j):
                j += 2
            return j
        # unknown command: dropped, its optional arguments dropped, its brace arguments kept as text
        args = []
        k = j
        while True:
            opt, k2 = _read_optional(s, k)
            if opt is not None:
                k = k2
                continue
            if k < len(s) and s[k] == "{":
                arg, k = _read_group(s, k)
                args.append(arg)
                continue
            break
        if args:
            self.unknown[name] += 1
            out.append(" ".join(self.render(a) for a in args))
        return k

    def _symbol(self, ch: str, s: str, j: int, out: list[str]) -> int:
        if ch == "\\":
            _, j = _read_optional(s, j)
            out.append("\n")
            return j
        if ch in _ACCENTS:
            return self._accent(ch, s, j, out)
        if ch == "(":
            k = s.find("\\)", j)
            if k < 0:
                return j
            out.append("$" + self._math(s[j:k]).strip() + "$")
            return k + 2
        if ch == "[":
            k = s.find("\\]", j)
            if k < 0:
                return j
            out.append(self._display(s[j:k]))
            return k + 2
        out.append(_SYMBOL_CMDS.get(ch, ""))
        return j

    def _accent(self, accent: str, s: str, j: int, out: list[str]) -> int:
        arg, j = _read_arg(s, j)
        base = {"\\i": "i", "\\j": "j"}.get(arg.strip(), arg.strip())
        if len(base) == 1:
            out.append(unicodedata.normalize("NFC", base + _ACCENTS[accent]))
        else:
            out.append(self.render(base))
        return j

    def _environment(self, s: str, j: int, env: str, out: list[str]) -> int:
        end = _find_env_end(s, j, env)
        if end is None:
            self.notes.append(f"\\begin{{{env}}} without \\end{{{env}}}: its content runs to the end")
            content_end, after = len(s), len(s)
        else:
            content_end, after = end
        base = env.rstrip("*")
        # environment arguments
        opts: list[str | None] = []
        k = j
        opt, k = _read_optional(s, k)
        opts.append(opt)
        args = []
        for _ in range(_ENV_ARGS.get(env, _ENV_ARGS.get(base, 0))):
            a, k = _read_arg(s, k)
            args.append(a)
        if base in ("minted",):
            args = args or [""]
        content = s[k:content_end]
        if env in _DROP_ENVS or base in _DROP_ENVS:
            if base not in ("comment", "icmlauthorlist"):
                self.dropped_envs[env] += 1
            out.append("\n\n")
            return after
        if base in _MATH_ENVS:
            if base == "math":
                out.append("$" + self._math(content).strip() + "$")
            else:
                out.append(self._display(content, _MATH_ENVS[base]))
            return after
        if base in ("verbatim", "Verbatim", "lstlisting", "minted", "alltt"):
            lang = args[0].strip() if base == "minted" and args else ""
            out.append(f"\n\n```{lang}\n{content.strip(chr(10))}\n```\n\n")
            return after
        self.env_stack.append(env)
        try:
            if base in _LIST_ENVS:
                out.append("\n\n" + self._list(content, base) + "\n\n")
            elif env in _TABLE_ENVS or base in _TABLE_ENVS:
                out.append("\n\n" + self._table(content) + "\n\n")
            elif base == "abstract":
                out.append(f"\n\n# Abstract\n\n{self.render(content).strip()}\n\n")
            elif base == "thebibliography":
                entries: list[str] = []
                for line in self.render(content).strip().split("\n"):
                    if line.startswith("- [") or not entries:
                        entries.append(line.strip())
                    elif line.strip():
                        entries[-1] += " " + line.strip()
                out.append("\n\n# References\n\n" + "\n".join(" ".join(e.split()) for e in entries) + "\n\n")
            elif base == "proof":
                out.append(f"\n\n*Proof.* {self.render(content).strip()}\n\n")
            elif base in self.theorems:
                title = f" ({self.inline(opts[0])})" if opts[0] else ""
                out.append(f"\n\n**{self.theorems[base]}{title}.** {self.render(content).strip()}\n\n")
            elif base in ("quote", "quotation", "displayquote"):
                body = self.render(content).strip()
                out.append("\n\n" + "\n".join(f"> {line}" if line else ">" for line in body.split("\n")) + "\n\n")
            else:   # figures, tables, center, minipage, document, algorithm, unknown environments: content kept
                out.append("\n\n" + self.render(content).strip() + "\n\n")
        finally:
            self.env_stack.pop()
        return after

    def _list(self, content: str, kind: str) -> str:
        items: list[tuple[str | None, str]] = []
        positions = []
        depth = env_depth = 0
        i = 0
        while i < len(content):
            if content.startswith("\\begin", i):
                env_depth += 1
            elif content.startswith("\\end", i):
                env_depth -= 1
            c = content[i]
            if c == "\\":
                if depth == 0 and env_depth == 0 and _ITEM.match(content, i):
                    positions.append(i)
                i += 2
                continue
            if c == "{":
                depth += 1
            elif c == "}":
                depth -= 1
            i += 1
        for a, b in zip(positions, positions[1:] + [len(content)]):
            label, k = _read_optional(content, a + len("\\item"))
            items.append((label, content[k:b]))
        lines: list[str] = []
        for number, (label, body) in enumerate(items, 1):
            marker = f"{number}." if _LIST_ENVS[kind] == "1." else "-"
            text = self.render(body).strip()
            text = re.sub(r"\n{3,}", "\n\n", text)
            if label is not None:
                lab = self.inline(label)
                text = (f"**{lab}** " if kind == "description" else f"{lab} ") + text
            pad = " " * (len(marker) + 1)
            first, *rest = text.split("\n") if text else [""]
            lines.append(f"{marker} {first}".rstrip())
            lines += [(pad + line) if line.strip() else "" for line in rest]
        return "\n".join(lines)

    def _table(self, content: str) -> str:
        content = re.sub(r"\\(hline|toprule|midrule|bottomrule|addlinespace|endhead|endfirsthead|endfoot|"
                         r"endlastfoot)(?![A-Za-z])(\[[^\]]*\])?", "", content)
        content = re.sub(r"\\(cline|cmidrule)(\([^)]*\))?\{[^{}]*\}", "", content)
        rows = []
        for raw in _split_top(content, "\\\\"):
            if not raw.strip():
                continue
            cells = [" ".join(self.render(c).split()).replace("|", "\\|") for c in _split_top(raw, "&")]
            if any(cells):
                rows.append(cells)
        if not rows:
            return ""
        width = max(len(r) for r in rows)
        rows = [r + [""] * (width - len(r)) for r in rows]
        lines = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * width]
        lines += ["| " + " | ".join(r) + " |" for r in rows[1:]]
        return "\n".join(lines)


def _tidy_markdown(md: str) -> str:
    """Trailing spaces gone, runs of spaces inside text lines collapsed (indentation and code blocks
    kept), at most one blank line in a row, a final newline."""
    out, in_code = [], False
    for line in md.split("\n"):
        if line.startswith("```"):
            in_code = not in_code
            out.append(line)
            continue
        if in_code:
            out.append(line.rstrip())
            continue
        indent = len(line) - len(line.lstrip(" "))
        body = re.sub(r"[ \t]{2,}", " ", line.strip())
        out.append((" " * indent + body) if body else "")
    text = re.sub(r"\n{3,}", "\n\n", "\n".join(out)).strip()
    return text + "\n"


def _latex_field(text: str, names: tuple[str, ...]) -> str | None:
    for name in names:
        m = re.search(r"\\" + name + r"(?![A-Za-z])\s*", text)
        if m:
            _, j = _read_optional(text, m.end())
            g = _read_group(text, _skip_ws(text, j))
            if g is not None:
                return g[0]
    return None


def latex_to_markdown(source: str | os.PathLike) -> tuple[str, dict]:
    """Convert a LaTeX source (a directory, or a single .tex file) to Markdown. Returns (markdown, meta)
    with meta = {"title", "authors", "main_file", "files", "notes"}; IngestError for a source without
    a main file."""
    source = pathlib.Path(source)
    if source.is_dir():
        root, main = source, find_main_tex(source)
    else:
        root, main = source.parent, source
        if not _has_main_markers(_read_text(main)):
            raise IngestError(f"{source}: not a LaTeX main file (no \\documentclass and \\begin{{document}}); "
                              f"give the directory of the sources, or the main file")
    notes: list[str] = []
    files: list[str] = []
    text = expand_inputs(main, root, notes, files)
    if re.search(r"\\(bibliography|printbibliography)(?![A-Za-z])", text):
        bbl = main.with_suffix(".bbl")
        if bbl.is_file():
            bbl_text = strip_comments(_read_text(bbl))
            text = re.sub(r"\\bibliography\s*\{[^{}]*\}", lambda _: "\n" + bbl_text + "\n", text, count=1)
            files.append(bbl.relative_to(root).as_posix() if bbl.is_relative_to(root) else bbl.name)
        else:
            notes.append(f"references: \\bibliography given but no {main.stem}.bbl next to {main.name}; the "
                         f"reference list is left out (citations appear as their keys)")
    macros, text = collect_macros(text, notes)
    text = expand_macros(text, macros, notes)
    theorems = {m.group(1): m.group(2) for m in
                re.finditer(r"\\newtheorem\*?\s*\{([^{}]+)\}(?:\[[^\]]*\])?\s*\{([^{}]+)\}", text)}
    conv = _LatexConverter(notes, theorems)
    title_src = _latex_field(text, ("icmltitle", "title"))
    title = conv.inline(re.sub(r"\\\\(\[[^\]]*\])?", " ", title_src)) if title_src else ""
    authors: list[str] = []
    for m in re.finditer(r"\\icmlauthor\s*\{", text):
        g = _read_group(text, m.end() - 1)
        if g and conv.inline(g[0]):
            authors.append(conv.inline(g[0]))
    if not authors:
        author_src = _latex_field(text, ("author",))
        if author_src:
            for part in re.split(r"\\(?:and|AND|And)(?![A-Za-z])", author_src):
                lines = [line.strip() for line in conv.render(part).split("\n") if line.strip()]
                if lines:
                    authors.append(re.sub(r"[\s,*∗†‡]+$", "", lines[0]))
    begin = re.search(r"\\begin\s*\{document\}", text)
    end = re.search(r"\\end\s*\{document\}", text)
    body = text[begin.end() if begin else 0:end.start() if end else len(text)]
    md_body = conv.render(body)
    if conv.figures:
        shown = ", ".join(conv.figures[:8]) + (", ..." if len(conv.figures) > 8 else "")
        notes.append(f"figures: {len(conv.figures)} image(s) not included ({shown}); their captions are kept")
    if conv.dropped_envs:
        notes.append("drawings left out: " + ", ".join(f"{e} x{n}" for e, n in sorted(conv.dropped_envs.items())))
    if conv.unknown:
        common = ", ".join(f"\\{k} x{v}" for k, v in conv.unknown.most_common(15))
        notes.append(f"commands without a conversion rule (their arguments were kept as text): {common}")
    notes[:] = list(dict.fromkeys(notes))
    header = f"# {title}\n\n" if title else ""
    if authors:
        header += ", ".join(authors) + "\n\n"
    md = _tidy_markdown(header + md_body)
    return md, {"title": title, "authors": authors, "main_file": main.relative_to(root).as_posix(),
                "files": files, "notes": notes}


# ---- Markdown and PDF ---------------------------------------------------------------------------
def _markdown_title(text: str) -> str:
    fm = re.match(r"^---\n(.*?)\n---\n", text, re.DOTALL)
    if fm:
        m = re.search(r"^title:\s*(.+)$", fm.group(1), re.MULTILINE)
        if m:
            return m.group(1).strip().strip("\"'")
    m = re.search(r"^#\s+(.+?)\s*#*\s*$", text, re.MULTILINE)
    if m:
        return m.group(1).strip()
    for line in text.split("\n"):
        if line.strip() and not line.strip().startswith("---"):
            return line.strip()[:200]
    return ""


_JUNK_PDF_TITLE = re.compile(r"(^untitled$|^microsoft word|\.(pdf|dvi|tex|docx?)$|^arxiv:)", re.IGNORECASE)


def pdf_to_markdown(path: str | os.PathLike) -> tuple[str, dict]:
    """The text of a PDF as Markdown (page texts joined, end-of-line hyphenation undone) and meta
    {"title", "pages", "notes", "first_page"}; IngestError for a PDF pypdf cannot read or that has no text."""
    path = pathlib.Path(path)
    try:
        import pypdf
    except ImportError as e:
        raise IngestError(f"{path}: reading PDFs needs pypdf: install the factory extra "
                          f"(pip install -e '.[factory]', pins pypdf==7.1.0)") from e
    try:
        reader = pypdf.PdfReader(str(path))
        if reader.is_encrypted and not reader.decrypt(""):
            raise IngestError(f"{path}: the PDF is encrypted with a password; give an unencrypted copy")
        pages = [page.extract_text() or "" for page in reader.pages]
        meta_title = (reader.metadata.title if reader.metadata else None) or ""
    except IngestError:
        raise
    except Exception as e:  # pypdf raises many types (PdfReadError, PdfStreamError, KeyError, ...) on bad files
        raise IngestError(f"{path}: unreadable PDF ({type(e).__name__}: {e}); re-download it, or give the "
                          f"paper as LaTeX source or Markdown") from e
    text = "\n\n".join(p.strip() for p in pages if p.strip())
    if not text.strip():
        raise IngestError(f"{path}: the PDF has {len(pages)} page(s) but no extractable text (scanned images?); "
                          f"give the paper as LaTeX source or Markdown")
    text = re.sub(r"(\w)-\n(?=[a-z])", r"\1", text)
    notes = [f"converted from the text layer of a {len(pages)}-page PDF: headings, tables, figures and math "
             f"are approximate (plain text)"]
    title = str(meta_title).strip()
    if not title or _JUNK_PDF_TITLE.search(title):
        title = ""
        for line in pages[0].split("\n") if pages else []:
            line = line.strip()
            if len(line.split()) >= 2 and not _ARXIV_STAMP.search(line):
                title = line[:200]
                break
        notes.append("title taken from the first line of page 1")
    else:
        notes.append("title taken from the PDF metadata")
    return f"# {title}\n\n{text}\n", {"title": title, "pages": len(pages), "notes": notes,
                                       "first_page": pages[0] if pages else ""}


def load_paper(path: str | os.PathLike, *, min_words: int = MIN_WORDS) -> Paper:
    """Read and convert one entry of the papers directory (see the module docstring)."""
    path = pathlib.Path(path)
    if not path.exists():
        raise IngestError(f"{path}: no such file or directory")
    kind = detect_kind(path)
    if path.is_file() and not path.read_bytes().strip():
        raise IngestError(f"{path}: empty file; remove it or replace it with the paper")
    sha = source_sha256(path)
    notes: list[str] = []
    files: list[str] = []
    authors: list[str] = []
    head = ""
    if kind == "markdown":
        md_path = path / "paper.md" if path.is_dir() else path
        markdown = _read_text(md_path, notes, md_path.name).strip() + "\n"
        title = _markdown_title(markdown)
        head = markdown
    elif kind == "latex":
        markdown, meta = latex_to_markdown(path)
        title, authors, notes, files = meta["title"], meta["authors"], meta["notes"], meta["files"]
        head = _read_text(path / meta["main_file"] if path.is_dir() else path)
    else:
        markdown, meta = pdf_to_markdown(path)
        title, notes, head = meta["title"], meta["notes"], meta["first_page"]
    body_words = len(decon.words(markdown)) - len(decon.words(title))
    if body_words < min_words:
        raise IngestError(f"{path}: only {max(body_words, 0)} word(s) of text after conversion (minimum "
                          f"{min_words}); an empty or truncated paper? Check the file")
    if not title:
        title = path.stem
        notes.append("no title found; the file name is used as the title")
    arxiv_id = (extract_arxiv_id(path.name, head, head_chars=None if kind == "pdf" else 5000)
                or extract_arxiv_id("", markdown))
    own, other = find_code_links(markdown)
    return Paper(source=path, kind=kind, markdown=markdown, title=title, source_sha256=sha, authors=authors,
                 arxiv_id=arxiv_id, notes=notes, files=files, blacklist=own, other_code_links=other)


# ---- task directory ------------------------------------------------------------------------------
def _yaml_str(value: str | None) -> str:
    return "null" if value is None else json.dumps(value, ensure_ascii=False)


def task_files(paper: Paper, source_name: str | None = None) -> dict[str, str]:
    """The contents of paper.md, addendum.md, blacklist.txt and config.yaml for a paper."""
    source_name = source_name or paper.source.name
    kind_text = {"markdown": "Markdown file", "latex": "LaTeX source", "pdf": "PDF"}[paper.kind]
    lines = ["# Addendum (written by the Research-Factory ingest stage)", "",
             f"- Source: `{source_name}` ({kind_text}), sha256 `{paper.source_sha256}`."]
    if paper.kind == "latex" and paper.files:
        lines.append(f"- LaTeX files read: {', '.join(f'`{f}`' for f in paper.files)} (main file first).")
    if paper.arxiv_id:
        lines.append(f"- arXiv id: {paper.arxiv_id}.")
    if paper.blacklist:
        lines.append("- The paper's own code (blacklisted: do not use or copy it): "
                     + ", ".join(paper.blacklist) + ".")
    if paper.other_code_links:
        lines.append("- Other code repositories the paper links (not blacklisted): "
                     + ", ".join(paper.other_code_links) + ".")
    if paper.notes:
        lines += ["", "## Conversion notes", ""] + [f"- {n}" for n in paper.notes]
    else:
        lines += ["", "Nothing was dropped in the conversion."]
    config = "\n".join([
        f"id: {_yaml_str(paper.paper_id)}", f"title: {_yaml_str(paper.title)}",
        f"arxiv_id: {_yaml_str(paper.arxiv_id)}", f"source: {_yaml_str(source_name)}",
        f"source_kind: {_yaml_str(paper.kind)}", f"source_sha256: {_yaml_str(paper.source_sha256)}",
        f"ingest_version: {_yaml_str(INGEST_VERSION)}"]) + "\n"
    return {"paper.md": paper.markdown, "addendum.md": "\n".join(lines) + "\n",
            "blacklist.txt": ("\n".join(paper.blacklist) if paper.blacklist else "none") + "\n",
            "config.yaml": config}


def write_task_dir(paper: Paper, dest: str | os.PathLike, source_name: str | None = None) -> pathlib.Path:
    """Write the task directory (TASK_FILES) at `dest`, replacing it as a whole: files are written into a
    temporary sibling directory that is then renamed over `dest`."""
    dest = pathlib.Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    for name, content in task_files(paper, source_name).items():
        (tmp / name).write_text(content, encoding="utf-8")
    if dest.exists():
        old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
        os.replace(dest, old)
        os.replace(tmp, dest)
        shutil.rmtree(old)
    else:
        os.replace(tmp, dest)
    return dest


def _publish(src: pathlib.Path, dest: pathlib.Path) -> None:
    """Copy the task files from the converted directory into the published task directory, each
    atomically; other files already there (a later stage's rubric.json, ...) are left alone."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in TASK_FILES:
        atomic_write_text(dest / name, (src / name).read_text(encoding="utf-8"))


# ---- the runner ----------------------------------------------------------------------------------
def read_task_config(task_dir: str | os.PathLike) -> dict[str, str | None]:
    """config.yaml of a task directory written by this module: {id, title, arxiv_id, source, source_kind,
    source_sha256, ingest_version}, `null` read as None."""
    cfg = decon.read_flat_yaml(pathlib.Path(task_dir) / "config.yaml")
    return {k: (None if v == "null" else v) for k, v in cfg.items()}


def run_ingest(papers_dir: str | os.PathLike, out_dir: str | os.PathLike, manifest: Manifest,
               eval_set: decon.EvalSet, *, min_words: int = MIN_WORDS,
               log: Callable[[str], None] | None = None) -> list[pathlib.Path]:
    """Stages "ingest" and "decontaminate" for every entry of `papers_dir`; returns the published task
    directories OUT/tasks/<id> of the papers that passed (sorted), cached ones included.

    ingest (input hash: INGEST_VERSION, min_words, the source's sha256): convert, write the task
    directory to OUT/converted/<id>. A source whose sha256 changed gets a new id: its old entry is
    retired and its old directories removed. decontaminate (input hash: the ingest hash and the eval
    set's fingerprint): `eval_set.check(title, arxiv_id, paper.md)`; a match is recorded as skipped with
    the reason and OUT/tasks/<id> is removed if it was published before; a clean paper is published to
    OUT/tasks/<id>. A paper that fails is recorded as failed with the error and the loop goes on; nothing
    already produced for other papers is touched. Two entries with the same content and title share one
    id: the second is recorded in the first's `duplicate_sources`."""
    papers_dir, out_dir = pathlib.Path(papers_dir), pathlib.Path(out_dir).resolve()
    if out_dir != manifest.out_dir:
        raise ValueError(f"run_ingest: out_dir {out_dir} is not the manifest's directory {manifest.out_dir}")
    if not papers_dir.is_dir():
        raise IngestError(f"--papers {papers_dir}: not a directory (give the directory holding the papers)")
    say = log or (lambda _msg: None)
    fingerprint = eval_set.fingerprint()
    published: list[pathlib.Path] = []
    for entry in sorted(p for p in papers_dir.iterdir() if not p.name.startswith(".")):
        task_dir = _ingest_one(entry, out_dir, manifest, eval_set, fingerprint, min_words, say)
        if task_dir is not None:
            published.append(task_dir)
    manifest.save()
    return sorted(published)


def _remove_outputs(out_dir: pathlib.Path, paper_id: str) -> None:
    for sub in (CONVERTED_DIR, TASKS_DIR):
        d = out_dir / sub / paper_id
        if d.is_dir():
            shutil.rmtree(d)


def _ingest_one(entry: pathlib.Path, out_dir: pathlib.Path, manifest: Manifest, eval_set: decon.EvalSet,
                fingerprint: str, min_words: int, say: Callable[[str], None]) -> pathlib.Path | None:
    source = entry.name
    t0 = time.monotonic()
    try:
        sha = source_sha256(entry)
    except OSError as e:
        pid = f"{slugify(entry.stem)}-unreadable"
        manifest.set_paper(pid, source=source)
        manifest.run_stage(pid, "ingest", hash_inputs(INGEST_VERSION, source, "unreadable"),
                           lambda st: st.fail(f"{entry}: cannot read: {e}"), force=True)
        say(f"ingest {source}: failed: cannot read: {e}")
        return None
    in_hash = hash_inputs(INGEST_VERSION, min_words, sha)
    previous = manifest.papers_from_source(source)
    pid = next((p for p in previous if manifest.is_cached(p, "ingest", in_hash)), None)
    if pid is not None:
        owner_source = manifest.paper(pid).get("source")
        if owner_source != source and (entry.parent / str(owner_source)).exists():
            say(f"ingest {source}: same paper as {owner_source} ({pid}); a duplicate, left out")
            return None
        manifest.set_paper(pid, source=source)
        say(f"ingest {source}: cached as {pid}")
    else:
        paper, error = None, None
        try:
            paper = load_paper(entry, min_words=min_words)
            pid = paper.paper_id
        except Exception as e:  # recorded below as the failed ingest of this source
            error = e
            pid = make_paper_id(entry.stem, sha)
        owner = manifest.paper(pid)
        if (owner is not None and owner.get("source") not in (None, source)
            and (entry.parent / owner["source"]).exists()):
            dups = sorted(set(owner.get("duplicate_sources", [])) | {source})
            manifest.set_paper(pid, duplicate_sources=dups)
            manifest.save()
            say(f"ingest {source}: same paper as {owner['source']} ({pid}); recorded as its duplicate, left out")
            return None
        for old in previous:
            if old != pid:
                manifest.retire(old, f"source {source} changed (sha256 now {sha[:12]}); it is paper {pid} now")
                _remove_outputs(out_dir, old)
        manifest.set_paper(pid, source=source, title=paper.title if paper else None,
                           kind=paper.kind if paper else None)
        rel = f"{CONVERTED_DIR}/{pid}"
        try:
            with manifest.stage(pid, "ingest", in_hash, force=True, t0=t0) as st:
                if error is not None:
                    raise error
                write_task_dir(paper, out_dir / rel, source)
                st.done(outputs={"task_dir": rel},
                        info={"title": paper.title, "arxiv_id": paper.arxiv_id, "kind": paper.kind,
                              "blacklist": paper.blacklist, "notes": len(paper.notes), "files": paper.files},
                        metrics={"words": len(decon.words(paper.markdown))})
        except Exception as e:
            say(f"ingest {source}: failed: {e}")
            return None
        say(f"ingest {source}: done as {pid} ({paper.kind}, {len(paper.notes)} conversion note(s))")
    # decontaminate
    dec_hash = hash_inputs(in_hash, fingerprint)
    conv_dir = out_dir / CONVERTED_DIR / pid
    pub_rel = f"{TASKS_DIR}/{pid}"
    try:
        with manifest.stage(pid, "decontaminate", dec_hash) as st:
            if st.cached:
                rec = st.record
            else:
                cfg = read_task_config(conv_dir)
                text = (conv_dir / "paper.md").read_text(encoding="utf-8")
                reason = eval_set.check(cfg.get("title"), cfg.get("arxiv_id"), text)
                if reason:
                    if (out_dir / pub_rel).is_dir():
                        shutil.rmtree(out_dir / pub_rel)
                    st.skip(reason, info={"eval_set": eval_set.name, "eval_papers": len(eval_set)})
                else:
                    _publish(conv_dir, out_dir / pub_rel)
                    st.done(outputs={"task_dir": pub_rel}, info={"eval_set": eval_set.name,
                                                                 "eval_papers": len(eval_set)})
                rec = None
    except Exception as e:
        say(f"decontaminate {pid}: failed: {e}")
        return None
    rec = rec or manifest.record(pid, "decontaminate")
    if rec["status"] == "skipped":
        say(f"decontaminate {pid}: skipped: {rec['reason']}")
        return None
    return out_dir / pub_rel
