"""Research-Factory ingest, decontamination and manifest: real papers made in tmp_path (Markdown, a LaTeX
directory, a hand-written PDF), converted into PaperBench-layout task directories."""
import json
import os
import pathlib
import subprocess
import sys

import pytest

from klong_jax.factory import decontaminate as decon
from klong_jax.factory import ingest
from klong_jax.factory.manifest import (Manifest, ManifestError, StageIncomplete, build_report,
                                        format_report, hash_inputs, write_report)

FILLER = ("The method is evaluated on three benchmark datasets with standard splits and compared with "
          "strong baselines under equal compute budgets across several random seeds.")

MARKDOWN_PAPER = f"""# Gradient Noise Schedules for Small Transformers

## Abstract

We study how gradient noise schedules change the training of small transformers. {FILLER}

## Method

We add Gaussian noise to every gradient with a variance that decays as $\\sigma_t^2 = \\eta / (1 + t)^{{0.55}}$.
"""

MAIN_TEX = r"""\documentclass{article}
\usepackage{amsmath}
% \title{A commented-out wrong title}
\newcommand{\ours}{FastNet}
\newcommand{\norm}[1]{\lVert #1 \rVert}
\title{Fast Networks for Sparse Data}
\author{Alice Smith \\ University A \and Bob Jones \\ Lab B}
\begin{document}
\maketitle
\begin{abstract}
We present \ours{}, a network for sparse data that costs 5\% less. % a trailing comment
Code is available at \url{https://github.com/alice/fastnet}.
\end{abstract}
\section{Introduction}\label{sec:intro}
\ours\ improves on prior work~\cite{smith2020,jones2021}, see Section~\ref{sec:method} and Eq.~\eqref{eq:loss}.
""" + FILLER + r"""
\input{sections/method}
\end{document}
"""

METHOD_TEX = r"""\section{Method}\label{sec:method}
We minimise $\norm{x - y}^2$ with
\begin{equation}
  L(\theta) = \sum_i \ell(f_\theta(x_i), y_i) \label{eq:loss}
\end{equation}
Our contributions:
\begin{itemize}
  \item \textbf{Speed}: it is \emph{fast}.
  \item Sparsity, in two steps:
  \begin{enumerate}
    \item prune
    \item regrow
  \end{enumerate}
\end{itemize}
\subsection{Details}
We build on the library of \citet{lib} (\url{https://github.com/other/sparselib}).
\begin{mybox}
Text of an unknown environment stays.
\end{mybox}
\input{sections/loop_a}
"""

PDF_LINES = ["Sparse Attention for Long Documents",
             "arXiv:2501.01234v1 [cs.CL] 3 Jan 2025",
             "Abstract",
             "We study sparse attention over long documents and report results on three long-context bench-",
             "marks with strong baselines under equal compute budgets across several random seeds.",
             "Our code is available at https://github.com/carol/sparseattn for everyone."]


def write_pdf(path: pathlib.Path, lines: list[str]) -> None:
  """A minimal valid one-page PDF: catalog, page tree, one page whose content stream draws `lines` in
  Helvetica (one per line via the T* operator), and a correct cross-reference table."""
  def esc(t):
    return t.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)")
  stream = "\n".join(["BT", "/F1 11 Tf", "14 TL", "72 740 Td"] + [f"({esc(x)}) Tj T*" for x in lines]
                     + ["ET"]).encode("latin-1")
  objs = [b"<< /Type /Catalog /Pages 2 0 R >>",
          b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
          b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R "
          b"/Resources << /Font << /F1 5 0 R >> >> >>",
          b"<< /Length %d >>\nstream\n" % len(stream) + stream + b"\nendstream",
          b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica /Encoding /WinAnsiEncoding >>"]
  out = bytearray(b"%PDF-1.4\n")
  offsets = []
  for n, body in enumerate(objs, 1):
    offsets.append(len(out))
    out += b"%d 0 obj\n" % n + body + b"\nendobj\n"
  xref = len(out)
  out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objs) + 1)
  out += b"".join(b"%010d 00000 n \n" % off for off in offsets)
  out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objs) + 1, xref)
  path.write_bytes(bytes(out))


def make_papers(root: pathlib.Path) -> pathlib.Path:
  papers = root / "papers"
  (papers / "fastnet" / "sections").mkdir(parents=True)
  (papers / "noise.md").write_text(MARKDOWN_PAPER)
  (papers / "fastnet" / "main.tex").write_text(MAIN_TEX)
  (papers / "fastnet" / "sections" / "method.tex").write_text(METHOD_TEX)
  # an \input cycle: loop_a -> loop_b -> loop_a
  (papers / "fastnet" / "sections" / "loop_a.tex").write_text("Loop A text.\n\\input{sections/loop_b}\n")
  (papers / "fastnet" / "sections" / "loop_b.tex").write_text("Loop B text.\n\\input{sections/loop_a}\n")
  write_pdf(papers / "sparse.pdf", PDF_LINES)
  return papers


def config_of(task_dir: pathlib.Path) -> dict:
  return ingest.read_task_config(task_dir)


def records(out: pathlib.Path) -> dict:
  return json.loads((out / "manifest.json").read_text())["papers"]


def test_three_kinds_become_task_dirs(tmp_path):
  pypdf = pytest.importorskip("pypdf")
  papers = make_papers(tmp_path)
  # the hand-written PDF really carries text that pypdf extracts back
  extracted = pypdf.PdfReader(str(papers / "sparse.pdf")).pages[0].extract_text()
  assert "Sparse Attention for Long Documents" in extracted and "github.com/carol/sparseattn" in extracted

  out = tmp_path / "out"
  with Manifest(out) as m:
    dirs = ingest.run_ingest(papers, out, m, decon.default_eval_set())
  assert len(dirs) == 3
  by_title = {config_of(d)["title"]: d for d in dirs}
  assert set(by_title) == {"Gradient Noise Schedules for Small Transformers", "Fast Networks for Sparse Data",
                           "Sparse Attention for Long Documents"}
  for d in dirs:
    assert sorted(p.name for p in d.iterdir()) == ["addendum.md", "blacklist.txt", "config.yaml", "paper.md"]
    cfg = config_of(d)
    assert d.name == cfg["id"] and d.parent == out / "tasks"
    # id = title slug + the first 8 hex digits of the source's sha256
    assert cfg["id"] == ingest.slugify(cfg["title"]) + "-" + cfg["source_sha256"][:8]
    assert cfg["source_sha256"] == ingest.source_sha256(papers / cfg["source"])

  md = by_title["Gradient Noise Schedules for Small Transformers"]
  assert config_of(md)["source_kind"] == "markdown" and config_of(md)["arxiv_id"] is None
  assert (md / "paper.md").read_text() == MARKDOWN_PAPER.strip() + "\n"
  assert (md / "blacklist.txt").read_text() == "none\n"

  tex = by_title["Fast Networks for Sparse Data"]
  paper_md = (tex / "paper.md").read_text()
  assert paper_md.startswith("# Fast Networks for Sparse Data\n\nAlice Smith, Bob Jones\n\n# Abstract\n\n")
  assert "# Introduction" in paper_md and "# Method" in paper_md and "\n## Details\n" in paper_md
  assert "\n- **Speed**: it is *fast*.\n- Sparsity, in two steps:\n" in paper_md
  assert "  1. prune\n  2. regrow" in paper_md                      # nested enumerate, indented
  assert "$\\lVert x - y \\rVert^2$" in paper_md                     # \newcommand with an argument, inside $..$
  assert "$$\nL(\\theta) = \\sum_i \\ell(f_\\theta(x_i), y_i)\n$$" in paper_md   # equation, \label dropped
  assert ("FastNet improves on prior work [smith2020, jones2021], see Section [sec:method] and Eq. ([eq:loss])."
          in paper_md)
  assert "costs 5% less." in paper_md and "trailing comment" not in paper_md and "commented-out" not in paper_md
  assert "Text of an unknown environment stays." in paper_md
  assert paper_md.count("Loop A text.") == 1 and paper_md.count("Loop B text.") == 1
  assert (tex / "blacklist.txt").read_text() == "https://github.com/alice/fastnet\n"
  addendum = (tex / "addendum.md").read_text()
  assert ("LaTeX files read: `main.tex`, `sections/method.tex`, `sections/loop_a.tex`, `sections/loop_b.tex`"
          in addendum)
  assert ("cycle main.tex -> sections/method.tex -> sections/loop_a.tex -> sections/loop_b.tex -> "
          "sections/loop_a.tex" in addendum)
  assert "not blacklisted): https://github.com/other/sparselib" in addendum

  pdf = by_title["Sparse Attention for Long Documents"]
  cfg = config_of(pdf)
  assert cfg["source_kind"] == "pdf" and cfg["arxiv_id"] == "2501.01234v1"   # from the arXiv stamp
  assert "long-context benchmarks" in (pdf / "paper.md").read_text()          # end-of-line hyphen joined
  assert (pdf / "blacklist.txt").read_text() == "https://github.com/carol/sparseattn\n"

  rep = json.loads((out / "manifest.json").read_text())
  for pid in rep["papers"]:
    assert {n: r["status"] for n, r in rep["papers"][pid]["stages"].items()} == {"ingest": "done",
                                                                             "decontaminate": "done"}


def test_latex_details(tmp_path):
  src = tmp_path / "p"
  src.mkdir()
  (src / "paper.tex").write_text(r"""\documentclass{article}
\def\R{\mathbb{R}}
\newcommand{\loop}{\loop}
\begin{document}
\title{Tables and Items}
\section*{Setup}
Let $x \in \R^d$ and \(y\) be given, with \[ z = x + y. \]
\begin{description}
\item[Alpha] first term
\item[Beta] second term
\end{description}
\begin{tabular}{lc}
\hline
Name & Value \\ \hline
a\_b & \multicolumn{1}{c}{$1 & 2$} \\
\end{tabular}
{\bf bold words} and {\em emphasis} and \texttt{code\_name} and \href{https://x.org}{a link}.\footnote{A note.}
Caf\'e, na\"ive, \c{c}a. Use \verb|a_b| and \loop.
\vskip 0.2in
\begin{verbatim}
100% raw \textbf{kept}
\end{verbatim}
Enough words here to pass the minimum word count for a converted paper today.
\end{document}
""")
  md, meta = ingest.latex_to_markdown(src)
  assert meta["title"] == "Tables and Items" and meta["main_file"] == "paper.tex"
  assert "# Setup" in md
  assert "Let $x \\in \\mathbb{R}^d$ and $y$ be given, with\n\n$$\nz = x + y.\n$$" in md
  assert "- **Alpha** first term\n- **Beta** second term" in md
  assert "| Name | Value |\n|---|---|\n| a_b | $1 & 2$ |" in md
  assert ("**bold words** and *emphasis* and `code_name` and [a link](https://x.org). (Footnote: A note.)"
          in md)
  assert "Café, naïve, ça. Use `a_b` and" in md
  assert "0.2in" not in md
  assert "```\n100% raw \\textbf{kept}\n```" in md
  assert any("\\loop expands into itself" in n for n in meta["notes"])


def test_title_and_arxiv_match_skip_with_reason(tmp_path):
  papers = tmp_path / "papers"
  papers.mkdir()
  # PaperBench's "bam", with different case, punctuation and spacing
  (papers / "bam.md").write_text("# BATCH and Match -- Black-Box Variational Inference with a Score-based  "
                                 "Divergence\n\n" + FILLER + "\n")
  # any title, but the file name carries PaperBench "fre"'s arXiv id (with a version)
  (papers / "2402.17135v2.md").write_text("# Functional Reward Encodings Revisited\n\n" + FILLER + "\n")
  (papers / "clean.md").write_text("# An Unrelated Study of Sorting Networks\n\n" + FILLER + "\n")
  out = tmp_path / "out"
  with Manifest(out) as m:
    dirs = ingest.run_ingest(papers, out, m, decon.default_eval_set())
    report = write_report(m)
  assert [config_of(d)["title"] for d in dirs] == ["An Unrelated Study of Sorting Networks"]
  reasons = {r["paper_id"].split("-")[0]: r["reason"] for r in report["skipped"]}
  assert set(reasons) == {"batch", "functional"}
  assert "matches the title of PaperBench paper 'bam'" in reasons["batch"]
  assert "arXiv id 2402.17135v2 matches PaperBench paper 'fre'" in reasons["functional"]
  assert report["stages"]["decontaminate"] == {**report["stages"]["decontaminate"], "done": 1, "skipped": 2,
                                               "failed": 0}
  # the skipped papers are converted but never published to OUT/tasks
  assert sorted(p.name for p in (out / "tasks").iterdir()) == [d.name for d in dirs]
  assert len(list((out / "converted").iterdir())) == 3
  text = (out / "report.txt").read_text()
  assert "skipped:" in text and "PaperBench paper 'bam'" in text


def test_ngram_overlap_arithmetic(tmp_path):
  eval_words = [f"e{i}" for i in range(40)]
  new_words = [f"n{i}" for i in range(20)]
  candidate = " ".join(eval_words[:20] + new_words)
  # the candidate has 40 words -> 40 - 13 + 1 = 28 distinct 13-word shingles; the shingles inside its
  # first 20 (copied) words number 20 - 13 + 1 = 8, and all 8 occur in the eval text: 8 / 28 = 0.2857
  assert decon.ngram_overlap(candidate, " ".join(eval_words), 13) == (8, 28, 8 / 28)
  # normalisation: case, punctuation and markup do not matter
  assert decon.ngram_overlap("E0, E1; *E2* $E3$", "e0 e1 e2 e3", 4) == (1, 1, 1.0)
  ev = [decon.EvalPaper(id="ev", title="Eval Paper", text=" ".join(eval_words))]
  assert "8 of the paper's 28 distinct 13-word shingles" in decon.EvalSet(ev, name="t", threshold=0.25).check(
      "Other", None, candidate)
  assert decon.EvalSet(ev, name="t", threshold=0.29).check("Other", None, candidate) is None   # 0.2857 < 0.29

  # end to end, eval texts given by a JSON eval set with text_file
  (tmp_path / "ev.md").write_text(" ".join(eval_words))
  (tmp_path / "evals.json").write_text(json.dumps([{"id": "ev", "title": "Eval Paper", "text_file": "ev.md"}]))
  es = decon.load_eval_set(tmp_path / "evals.json", threshold=0.25)
  papers = tmp_path / "papers"
  papers.mkdir()
  # a paper of title + 40 words: its title words change the shingles, so build the count with them:
  # words = 3 title words + 40 = 43 -> 31 shingles; the 8 inside the copied run are shared: 8/31 = 0.258
  (papers / "copy.md").write_text("# Copied Work Here\n\n" + candidate + "\n")
  out = tmp_path / "out"
  with Manifest(out) as m:
    assert ingest.run_ingest(papers, out, m, es) == []
    rec = next(iter(m.data["papers"].values()))["stages"]["decontaminate"]
  assert rec["status"] == "skipped" and "8 of the paper's 31 distinct 13-word shingles" in rec["reason"]
  assert "0.258 >= threshold 0.25" in rec["reason"]


def test_resume_and_changed_input(tmp_path):
  pytest.importorskip("pypdf")
  papers = make_papers(tmp_path)
  out = tmp_path / "out"
  with Manifest(out) as m:
    first = ingest.run_ingest(papers, out, m, decon.default_eval_set())
  before = records(out)
  mtimes = {p: p.stat().st_mtime_ns for d in first for p in d.iterdir()}
  # second run: nothing changed -> no stage runs again (same records, files untouched)
  with Manifest(out) as m:
    second = ingest.run_ingest(papers, out, m, decon.default_eval_set())
  assert second == first and records(out) == before
  assert {p: p.stat().st_mtime_ns for d in second for p in d.iterdir()} == mtimes

  # change the Markdown paper: only it reruns, under a new id (new content hash); its old entry is retired
  old_id = next(pid for pid, e in before.items() if e["source"] == "noise.md")
  (papers / "noise.md").write_text(MARKDOWN_PAPER + "\nAn added paragraph.\n")
  with Manifest(out) as m:
    third = ingest.run_ingest(papers, out, m, decon.default_eval_set())
    retired = m.data["retired"]
  after = records(out)
  new_id = next(pid for pid, e in after.items() if e["source"] == "noise.md")
  assert new_id != old_id and new_id.rsplit("-", 1)[0] == old_id.rsplit("-", 1)[0]
  assert [r["paper_id"] for r in retired] == [old_id] and old_id not in after
  assert not (out / "tasks" / old_id).exists() and not (out / "converted" / old_id).exists()
  for pid in before:
    if pid != old_id:
      assert after[pid] == before[pid]                         # untouched: same finished_at, attempts 1
  assert after[new_id]["stages"]["ingest"]["attempts"] == 1
  assert sorted(d.name for d in third) == sorted([new_id] + [d.name for d in first if d.name != old_id])

  # a changed eval set reruns decontaminate only: ingest stays cached
  (tmp_path / "evals.json").write_text(json.dumps([{"title": "fast networks for SPARSE data!"}]))
  with Manifest(out) as m:
    fourth = ingest.run_ingest(papers, out, m, decon.load_eval_set(tmp_path / "evals.json"))
  final = records(out)
  tex_id = next(pid for pid, e in final.items() if e["source"] == "fastnet")
  assert final[tex_id]["stages"]["ingest"] == after[tex_id]["stages"]["ingest"]
  assert final[tex_id]["stages"]["decontaminate"]["status"] == "skipped"
  assert tex_id not in [d.name for d in fourth] and not (out / "tasks" / tex_id).exists()
  # a deleted output is rebuilt: the published dir of the PDF paper
  pdf_id = next(pid for pid, e in final.items() if e["source"] == "sparse.pdf")
  for f in (out / "tasks" / pdf_id).iterdir():
    f.unlink()
  (out / "tasks" / pdf_id).rmdir()
  with Manifest(out) as m:
    ingest.run_ingest(papers, out, m, decon.load_eval_set(tmp_path / "evals.json"))
  assert (out / "tasks" / pdf_id / "paper.md").exists()
  assert records(out)[pdf_id]["stages"]["ingest"] == final[pdf_id]["stages"]["ingest"]


def test_bad_inputs_fail_clearly_and_keep_other_papers(tmp_path):
  pytest.importorskip("pypdf")
  papers = make_papers(tmp_path)
  out = tmp_path / "out"
  with Manifest(out) as m:
    good = ingest.run_ingest(papers, out, m, decon.default_eval_set())
  good_records = records(out)
  (papers / "corrupt.pdf").write_bytes(b"%PDF-1.4\n1 0 obj << /Type /Catalog garbage\n%%EOF\n")
  (papers / "empty.md").write_text("\n  \n")
  (papers / "nomain").mkdir()
  (papers / "nomain" / "intro.tex").write_text("\\section{Intro}\nJust a section file.\n")
  (papers / "short.md").write_text("# A Title\n\nToo short.\n")
  (papers / "slides.pptx").write_bytes(b"PK\x03\x04")
  log: list[str] = []
  with Manifest(out) as m:
    dirs = ingest.run_ingest(papers, out, m, decon.default_eval_set(), log=log.append)
    report = build_report(m)
  assert dirs == good                                                # the good papers are all still there
  now = records(out)
  for pid, entry in good_records.items():
    assert now[pid] == entry
  failed = {e["source"]: e["stages"]["ingest"]["error"] for e in now.values()
            if e["stages"]["ingest"]["status"] == "failed"}
  assert set(failed) == {"corrupt.pdf", "empty.md", "nomain", "short.md", "slides.pptx"}
  assert f"{papers / 'corrupt.pdf'}: unreadable PDF" in failed["corrupt.pdf"]
  assert f"{papers / 'empty.md'}: empty file" in failed["empty.md"]
  assert f"{papers / 'nomain'}: LaTeX source without a main file" in failed["nomain"]
  assert "intro.tex" in failed["nomain"] and "\\documentclass" in failed["nomain"]
  assert "only 2 word(s) of text after conversion (minimum 20)" in failed["short.md"]
  assert "unsupported input kind '.pptx'" in failed["slides.pptx"]
  assert all(e.startswith("IngestError: ") for e in failed.values())
  assert report["stages"]["ingest"]["failed"] == 5 and report["stages"]["ingest"]["done"] == 3
  assert sum("failed" in line for line in log) == 5
  assert "failed:" in format_report(report) and "corrupt.pdf: unreadable PDF" in format_report(report)
  # a failed stage is retried on the next run (it did not finish), and fails the same way
  with Manifest(out) as m:
    ingest.run_ingest(papers, out, m, decon.default_eval_set())
  assert {e["stages"]["ingest"]["attempts"] for e in records(out).values()
          if e["stages"]["ingest"]["status"] == "failed"} == {2}


def test_manifest_stage_api_and_report(tmp_path):
  out = tmp_path / "out"
  m = Manifest(out)
  calls = []

  def rubric(st):
    calls.append(st.paper_id)
    (out / "r.json").write_text("{}")
    st.add_tokens(prompt=100, completion=20)
    st.done(outputs={"rubric": "r.json"}, metrics={"rubrics": 1})

  h = hash_inputs("rubric/v1", "paper-text")
  assert m.run_stage("p1", "rubric", h, rubric)["status"] == "done"
  assert m.run_stage("p1", "rubric", h, rubric)["status"] == "done" and calls == ["p1"]   # cached
  (out / "r.json").unlink()                                          # a lost output reruns the stage
  m.run_stage("p1", "rubric", h, rubric)
  assert calls == ["p1", "p1"]
  m.run_stage("p1", "rubric", hash_inputs("rubric/v2", "paper-text"), rubric)             # new input hash
  assert calls == ["p1", "p1", "p1"]

  with pytest.raises(RuntimeError, match="judge down"):
    with m.stage("p2", "rubric", h) as st:
      st.add_tokens(prompt=7)
      raise RuntimeError("judge down")
  rec = m.record("p2", "rubric")
  assert rec["status"] == "failed" and rec["error"] == "RuntimeError: judge down" and rec["tokens"]["prompt"] == 7
  with pytest.raises(StageIncomplete):
    with m.stage("p3", "rubric", h):
      pass
  assert m.record("p3", "rubric")["status"] == "failed"
  with pytest.raises(ValueError, match="do not exist"):
    with m.stage("p4", "rubric", h) as st:
      st.done(outputs={"rubric": "missing.json"})

  def rollouts(scores, kept):
    def fn(st):
      st.add_tokens(prompt=1000, completion=500)
      st.done(metrics={"episodes": len(scores), "kept": kept, "scores": scores})
    return fn
  m.run_stage("p1", "rollouts", h, rollouts([0.05, 0.15, 0.15, 1.0], 2))
  m.run_stage("p2", "rollouts", h, rollouts([0.95, 0.5], 1))
  m.run_stage("p5", "rollouts", h, lambda st: st.skip("no rubric"))
  report = write_report(m)
  # 10 bins of width 0.1: 0.05 -> bin 0; 0.15, 0.15 -> bin 1; 0.5 -> bin 5; 0.95 and 1.0 -> bin 9
  assert report["score_histogram"]["counts"] == [1, 2, 0, 0, 0, 1, 0, 0, 0, 2]
  assert report["score_histogram"]["mean"] == pytest.approx((0.05 + 0.15 + 0.15 + 1.0 + 0.95 + 0.5) / 6)
  assert report["episodes_run"] == 6 and report["episodes_kept"] == 3 and report["rubrics_made"] == 1
  # tokens, from each paper's last record per stage: rubric p1 (100 + 20) + failed p2 (7 + 0) + p3, p4
  # (0); rollouts p1, p2: 2 x (1000 + 500)
  assert report["stages"]["rubric"]["tokens"] == {"prompt": 100 + 7, "completion": 20}
  assert report["tokens"] == {"prompt": 107 + 2000, "completion": 20 + 1000, "total": 3127}
  assert report["papers_in"] == 5 and report["stage_order"] == ["rubric", "rollouts"]
  assert report["stages"]["rubric"]["failed"] == 3 and report["stages"]["rollouts"]["skipped"] == 1
  secs = report["stages"]["rollouts"]["seconds_done"]
  assert report["stages"]["rollouts"]["papers_per_min"] == pytest.approx(2 / (secs / 60), rel=1e-3)
  assert json.loads((out / "report.json").read_text())["episodes_run"] == 6
  assert "rollouts" in (out / "report.txt").read_text()
  assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "manifest.lock", "r.json",
                                                   "report.json", "report.txt"]     # no temp files left
  m.close()
  assert not (out / "manifest.lock").exists()
  # a reloaded manifest sees the same records
  assert Manifest(out, lock=False).record("p1", "rollouts")["metrics"]["kept"] == 2


def test_manifest_single_owner(tmp_path):
  out = tmp_path / "out"
  out.mkdir()
  # a lock held by another live process (our parent) refuses a second owner
  (out / "manifest.lock").write_text(json.dumps({"pid": os.getppid(), "host": os.uname().nodename,
                                                 "since": "x"}))
  with pytest.raises(ManifestError, match=f"owned by pid {os.getppid()}"):
    Manifest(out)
  # a lock whose process is gone is taken over
  dead = subprocess.Popen([sys.executable, "-c", "pass"])
  dead.wait()
  (out / "manifest.lock").write_text(json.dumps({"pid": dead.pid, "host": os.uname().nodename, "since": "x"}))
  with Manifest(out):
    assert json.loads((out / "manifest.lock").read_text())["pid"] == os.getpid()
  (out / "manifest.json").write_text("{not json")
  with pytest.raises(ManifestError, match="manifest.json: not valid JSON"):
    Manifest(out, lock=False)


def test_eval_sets(tmp_path):
  es = decon.default_eval_set()
  assert len(es) == 23 and len(decon.default_eval_set(splits=("main",))) == 20
  assert len({p.arxiv_id for p in es.papers}) == 23
  assert decon.normalize_title("  Stay on Topic -- with Classifier-Free GUIDANCE ") == \
      "stay on topic with classifier free guidance"
  assert decon.normalize_arxiv_id("arXiv:2402.14758v2") == "2402.14758"
  assert decon.normalize_arxiv_id("https://arxiv.org/abs/2402.14758") == "2402.14758"
  assert "earlier title" in es.check("Efficient transfer learning in diffusion models via adversarial noise",
                                     None, None)
  assert es.check("Batch and match", "2402.14759", None) is None
  # a directory of PaperBench-layout paper dirs: texts from paper.md, arXiv ids from the built-in table
  d = tmp_path / "pb"
  (d / "bam").mkdir(parents=True)
  (d / "bam" / "config.yaml").write_text('id: bam\ntitle: "Batch and match: black-box variational '
                                         'inference with a score-based divergence"\n')
  (d / "bam" / "paper.md").write_text("word " * 30)
  loaded = decon.load_eval_set(d)
  assert loaded.papers[0].arxiv_id == "2402.14758" and loaded.papers[0].text.startswith("word")
  assert loaded.fingerprint() != es.fingerprint()
  (d / "bam" / "paper.md").write_text("version https://git-lfs.github.com/spec/v1\noid sha256:abc\n")
  with pytest.raises(decon.EvalSetError, match="Git LFS pointer"):
    decon.load_eval_set(d)
  (tmp_path / "bad.json").write_text(json.dumps([{"title": "x", "arxiv": "1"}]))
  with pytest.raises(decon.EvalSetError, match=r"bad.json: entry 0: unknown field\(s\) \['arxiv'\]"):
    decon.load_eval_set(tmp_path / "bad.json")
  assert decon.eval_set_from_flag(None).fingerprint() == es.fingerprint()


def test_arxiv_id_only_from_name_or_stamp():
  cited = "# Title\n\nWe compare with LoRA (arXiv:2106.09685).\n"
  assert ingest.extract_arxiv_id("paper.md", cited) is None          # a citation is not the paper's id
  assert ingest.extract_arxiv_id("2106.09685v3.pdf", "") == "2106.09685v3"
  assert ingest.extract_arxiv_id("2023.12345.md", "") is None         # month 23 is not an arXiv id
  assert ingest.extract_arxiv_id("x.md", "---\narxiv_id: 2310.03725\n---\n") == "2310.03725"


def test_icml_layout(tmp_path):
  src = tmp_path / "icml"
  src.mkdir()
  (src / "main.tex").write_text(r"""\documentclass{article}
\usepackage{icml2024}
\icmltitlerunning{Short}
\begin{document}
\twocolumn[
\icmltitle{Merging Audits: \\ Do Early Layers Stay Put?}
\begin{icmlauthorlist}
\icmlauthor{Ann Lee}{equal,uni}
\icmlauthor{Bo Chen}{uni}
\end{icmlauthorlist}
\icmlaffiliation{uni}{Some University}
\vskip 0.3in
]
\printAffiliationsAndNotice{\icmlEqualContribution}
\begin{abstract}
Merging is cheap.\footnote{Code: \url{https://github.com/ann/merge-audit}}
\end{abstract}
\section{Introduction}
\begin{algorithm}[t]
\caption{Merge}
\begin{algorithmic}[1]
\REQUIRE experts $\theta_k$
\FOR{$k=1$ \TO $K$}
\STATE update
\ENDFOR
\end{algorithmic}
\end{algorithm}
We use ResNet-18 \citep[see][p.~3]{he16}.
\bibliography{refs}
\end{document}
""")
  (src / "main.bbl").write_text("\\begin{thebibliography}{1}\n\\bibitem[He et~al.(2016)]{he16}\nHe, K.\n"
                                "\\newblock Deep residual learning.\n\\end{thebibliography}\n")
  md, meta = ingest.latex_to_markdown(src)
  assert md.startswith("# Merging Audits: Do Early Layers Stay Put?\n\nAnn Lee, Bo Chen\n\n# Abstract\n\n"
                       "Merging is cheap. (Footnote: Code: <https://github.com/ann/merge-audit>)\n\n"
                       "# Introduction")
  assert "**Algorithm:** Merge\n\nRequire: experts $\\theta_k$\nfor $k=1$ to $K$\nupdate\nend for" in md
  assert "We use ResNet-18 [he16]." in md
  assert md.rstrip().endswith("# References\n\n- [he16] He, K. Deep residual learning.")
  assert meta["files"] == ["main.tex", "main.bbl"] and meta["notes"] == []
  assert ingest.find_code_links(md) == (["https://github.com/ann/merge-audit"], [])


def test_duplicate_sources_share_one_paper(tmp_path):
  papers = tmp_path / "papers"
  papers.mkdir()
  (papers / "a.md").write_text(MARKDOWN_PAPER)
  (papers / "b.md").write_text(MARKDOWN_PAPER)                       # the same bytes under another name
  out = tmp_path / "out"
  for _ in range(2):                                                 # the second run is all cached
    with Manifest(out) as m:
      dirs = ingest.run_ingest(papers, out, m, decon.default_eval_set())
    entries = records(out)
    assert len(dirs) == 1 and list(entries) == [dirs[0].name]
    assert entries[dirs[0].name]["source"] == "a.md" and entries[dirs[0].name]["duplicate_sources"] == ["b.md"]
    assert entries[dirs[0].name]["stages"]["ingest"]["attempts"] == 1
  # the first copy removed: the duplicate takes over the same paper id, nothing reruns
  (papers / "a.md").unlink()
  with Manifest(out) as m:
    assert ingest.run_ingest(papers, out, m, decon.default_eval_set()) == dirs
  assert records(out)[dirs[0].name]["source"] == "b.md"
