"""Decontamination: a training paper that is (a version of) an evaluation paper is never used.

    eval_set = default_eval_set()                 # PaperBench's papers (below), titles and arXiv ids
    eval_set = load_eval_set("evals.json")        # or a JSON list / a directory of paper dirs
    reason = eval_set.check(title, arxiv_id, text)    # None, or why the paper matches

A candidate matches an evaluation paper when any of these holds (checked in this order):
  1. title: the normalised titles are equal (Unicode NFKD, accents and case dropped, every run of
     non-alphanumerics one space), against the eval paper's title and its aliases (earlier titles);
  2. arXiv id: equal ignoring the version suffix and an "arXiv:" prefix (2402.14758v2 == 2402.14758);
  3. n-gram overlap (only for eval papers that come with text): the share of the candidate's distinct
     n-word shingles (n = 13 by default; words are runs of [a-z0-9] after lower-casing, so Markdown,
     LaTeX and PDF renderings of the same sentence agree) that also occur in the eval paper's text is
     at least `threshold` (default 0.1). A paper citing or quoting an eval paper shares a few
     shingles (well under 1% of its own); a workshop or journal version of it shares most.

The evaluation set file given by --eval_set replaces the default:
  - a JSON list of {"title": str, "arxiv_id"?: str, "id"?: str, "aliases"?: [str],
    "text"?: str, "text_file"?: path relative to the JSON file};
  - a directory of paper directories in the PaperBench layout, each with config.yaml (id, title and
    optionally arxiv_id) and optionally paper.md (its text, for the n-gram check). A paper directory
    whose config.yaml has no arxiv_id but whose id or title is one of PaperBench's gets the arXiv id
    from the built-in table, so pointing --eval_set at PaperBench's data/papers keeps id matching.
Imports no JAX.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
import re
import unicodedata

DEFAULT_NGRAM = 13
DEFAULT_THRESHOLD = 0.1
DECONTAMINATE_VERSION = "decontaminate/v1"

# PaperBench's papers (openai/frontier-evals, project/paperbench): ids and titles from
# data/papers/<id>/config.yaml at commit 51052cede8cc608f95bb00346635e03759013e5a; split "main" is
# experiments/splits/all.txt (the 20 ICML 2024 papers of the benchmark), "dev" is
# experiments/splits/dev.txt (3 papers used for developing agents and judges). The repository does not
# list arXiv ids; they were looked up per title (arXiv abstract pages, the papers' own READMEs and
# citations) and checked against the title. "bridging-data-gaps" is on arXiv under its earlier title,
# kept as an alias. Both splits are excluded by default: training on dev papers contaminates the dev
# scores used to tune agents.
PAPERBENCH_PAPERS: tuple[dict, ...] = (
    {"id": "adaptive-pruning", "split": "main", "arxiv_id": "2401.12200",
     "title": "APT: Adaptive Pruning and Tuning Pretrained Language Models for Efficient Training and Inference"},
    {"id": "all-in-one", "split": "main", "arxiv_id": "2404.09636",
     "title": "All-in-one simulation-based inference"},
    {"id": "bam", "split": "main", "arxiv_id": "2402.14758",
     "title": "Batch and match: black-box variational inference with a score-based divergence"},
    {"id": "bbox", "split": "main", "arxiv_id": "2402.08219",
     "title": "BBox-Adapter: Lightweight Adapting for Black-Box Large Language Models"},
    {"id": "bridging-data-gaps", "split": "main", "arxiv_id": "2308.11948",
     "title": "Bridging Data Gaps in Diffusion Models with Adversarial Noise-Based Transfer Learning",
     "aliases": ("Efficient Transfer Learning in Diffusion Models via Adversarial Noise",)},
    {"id": "fre", "split": "main", "arxiv_id": "2402.17135",
     "title": "Unsupervised Zero-Shot Reinforcement Learning via Functional Reward Encodings"},
    {"id": "ftrl", "split": "main", "arxiv_id": "2402.02868",
     "title": "Fine-tuning Reinforcement Learning Models is Secretly a Forgetting Mitigation Problem"},
    {"id": "lbcs", "split": "main", "arxiv_id": "2311.08675",
     "title": "Refined Coreset Selection: Towards Minimal Coreset Size under Model Performance Constraints"},
    {"id": "lca-on-the-line", "split": "main", "arxiv_id": "2407.16067",
     "title": "LCA-on-the-Line: Benchmarking Out-of-Distribution Generalization with Class Taxonomies"},
    {"id": "mechanistic-understanding", "split": "main", "arxiv_id": "2401.01967",
     "title": "A Mechanistic Understanding of Alignment Algorithms: A Case Study on DPO and Toxicity"},
    {"id": "pinn", "split": "main", "arxiv_id": "2402.01868",
     "title": "Challenges in Training PINNs: A Loss Landscape Perspective"},
    {"id": "rice", "split": "main", "arxiv_id": "2405.03064",
     "title": "RICE: Breaking Through the Training Bottlenecks of Reinforcement Learning with Explanation"},
    {"id": "robust-clip", "split": "main", "arxiv_id": "2402.12336",
     "title": "Robust CLIP: Unsupervised Adversarial Fine-Tuning of Vision Embeddings for Robust Large "
              "Vision-Language Models"},
    {"id": "sample-specific-masks", "split": "main", "arxiv_id": "2406.03150",
     "title": "Sample-specific Masks for Visual Reprogramming-based Prompting"},
    {"id": "sapg", "split": "main", "arxiv_id": "2407.20230",
     "title": "SAPG: Split and Aggregate Policy Gradients"},
    {"id": "sequential-neural-score-estimation", "split": "main", "arxiv_id": "2210.04872",
     "title": "Sequential Neural Score Estimation: Likelihood-Free Inference with Conditional Score Based "
              "Diffusion Models"},
    {"id": "stay-on-topic-with-classifier-free-guidance", "split": "main", "arxiv_id": "2306.17806",
     "title": "Stay on topic with Classifier-Free Guidance"},
    {"id": "stochastic-interpolants", "split": "main", "arxiv_id": "2310.03725",
     "title": "Stochastic Interpolants with Data-Dependent Couplings"},
    {"id": "test-time-model-adaptation", "split": "main", "arxiv_id": "2404.01650",
     "title": "Test-Time Model Adaptation with Only Forward Passes"},
    {"id": "what-will-my-model-forget", "split": "main", "arxiv_id": "2402.01865",
     "title": "What Will My Model Forget? Forecasting Forgotten Examples in Language Model Refinement"},
    {"id": "self-composing-policies", "split": "dev", "arxiv_id": "2506.14811",
     "title": "Self-Composing Policies for Scalable Continual Reinforcement Learning"},
    {"id": "self-expansion", "split": "dev", "arxiv_id": "2403.18886",
     "title": "Self-Expansion of Pre-trained Models with Mixture of Adapters for Continual Learning"},
    {"id": "semantic-self-consistency", "split": "dev", "arxiv_id": "2410.07839",
     "title": "Semantic Self-Consistency: Enhancing Language Model Reasoning via Semantic Weighting"},
)

_ARXIV_NEW = re.compile(r"^(\d{4}\.\d{4,5})(v\d+)?$")
_ARXIV_OLD = re.compile(r"^([a-z\-]+(?:\.[a-z]{2})?/\d{7})(v\d+)?$")
_WORD = re.compile(r"[a-z0-9]+")


class EvalSetError(ValueError):
    """An evaluation set file that cannot be used; the message names the file, entry and field."""


def normalize_title(title: str) -> str:
    """Case, accents, punctuation and whitespace removed: 'Batch and Match:  Black-box VI' ->
    'batch and match black box vi'."""
    text = unicodedata.normalize("NFKD", title or "")
    text = "".join(ch for ch in text if not unicodedata.combining(ch)).lower()
    return " ".join(re.findall(r"[a-z0-9]+", text))


def normalize_arxiv_id(arxiv_id: str | None) -> str | None:
    """'arXiv:2402.14758v2' -> '2402.14758' (also old style 'hep-th/9901001v1' -> 'hep-th/9901001');
    None or an unrecognised string -> None."""
    if not arxiv_id:
        return None
    s = str(arxiv_id).strip().lower()
    s = re.sub(r"^(arxiv:|https?://arxiv\.org/(abs|pdf)/)", "", s).removesuffix(".pdf")
    m = _ARXIV_NEW.match(s) or _ARXIV_OLD.match(s)
    return m.group(1) if m else None


def words(text: str) -> list[str]:
    """The word sequence the n-gram check compares: lower-cased runs of [a-z0-9] after NFKD."""
    text = unicodedata.normalize("NFKD", text or "")
    text = "".join(ch for ch in text if not unicodedata.combining(ch)).lower()
    return _WORD.findall(text)


def shingles(text: str, n: int = DEFAULT_NGRAM) -> set[tuple[str, ...]]:
    """The distinct n-word windows of `text` (empty when it has fewer than n words)."""
    w = words(text)
    return {tuple(w[i:i + n]) for i in range(len(w) - n + 1)}


def ngram_overlap(candidate_text: str, eval_text: str, n: int = DEFAULT_NGRAM) -> tuple[int, int, float]:
    """(shared, total, shared / total): how many of the candidate's distinct n-word shingles occur in the
    eval text, out of all of the candidate's distinct shingles (fraction 0.0 when it has none)."""
    cand = shingles(candidate_text, n)
    if not cand:
        return 0, 0, 0.0
    shared = len(cand & shingles(eval_text, n))
    return shared, len(cand), shared / len(cand)


@dataclasses.dataclass(frozen=True)
class EvalPaper:
    """One evaluation paper: title (and earlier titles as aliases), arXiv id, optional full text."""

    id: str
    title: str
    arxiv_id: str | None = None
    aliases: tuple[str, ...] = ()
    text: str | None = None


class EvalSet:
    """The papers a training paper must not match, with the n-gram parameters.

    `check(title, arxiv_id, text) -> str | None` returns the reason of the first match (title, then arXiv
    id, then n-gram overlap) or None. `fingerprint()` hashes everything the verdict depends on; a stage
    that decontaminates puts it in its input hash, so a changed eval set re-checks every paper."""

    def __init__(self, papers: list[EvalPaper] | tuple[EvalPaper, ...], *, name: str,
                 ngram: int = DEFAULT_NGRAM, threshold: float = DEFAULT_THRESHOLD):
        if ngram < 1:
            raise ValueError(f"EvalSet {name}: ngram must be >= 1, got {ngram}")
        if not 0.0 < threshold <= 1.0:
            raise ValueError(f"EvalSet {name}: threshold must be in (0, 1], got {threshold}")
        self.papers = tuple(papers)
        self.name, self.ngram, self.threshold = name, ngram, threshold
        self._by_title: dict[str, EvalPaper] = {}
        self._by_arxiv: dict[str, EvalPaper] = {}
        for p in self.papers:
            for t in (p.title, *p.aliases):
                if normalize_title(t):
                    self._by_title.setdefault(normalize_title(t), p)
            if normalize_arxiv_id(p.arxiv_id):
                self._by_arxiv.setdefault(normalize_arxiv_id(p.arxiv_id), p)
        self._shingles: dict[str, set] | None = None

    def __len__(self) -> int:
        return len(self.papers)

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        h.update(json.dumps([DECONTAMINATE_VERSION, self.ngram, self.threshold]).encode())
        for p in sorted(self.papers, key=lambda p: (p.id, p.title)):
            text_hash = hashlib.sha256(p.text.encode("utf-8")).hexdigest() if p.text else None
            h.update(json.dumps([p.id, normalize_title(p.title), sorted(normalize_title(a) for a in p.aliases),
                                 normalize_arxiv_id(p.arxiv_id), text_hash]).encode())
        return h.hexdigest()

    def _eval_shingles(self) -> dict[str, set]:
        if self._shingles is None:
            self._shingles = {p.id: shingles(p.text, self.ngram) for p in self.papers if p.text}
        return self._shingles

    def check(self, title: str | None, arxiv_id: str | None, text: str | None) -> str | None:
        """Why the candidate matches an eval paper (a sentence naming the paper and the evidence), or None."""
        key = normalize_title(title or "")
        if key and key in self._by_title:
            p = self._by_title[key]
            which = "title" if normalize_title(p.title) == key else "earlier title"
            return f"title {title!r} matches the {which} of {self.name} paper '{p.id}' ({p.title!r})"
        aid = normalize_arxiv_id(arxiv_id)
        if aid and aid in self._by_arxiv:
            p = self._by_arxiv[aid]
            return f"arXiv id {arxiv_id} matches {self.name} paper '{p.id}' ({p.title!r}, arXiv {p.arxiv_id})"
        if text:
            cand = shingles(text, self.ngram)
            if cand:
                for pid, ev in self._eval_shingles().items():
                    shared = len(cand & ev)
                    if shared / len(cand) >= self.threshold:
                        return (f"{self.ngram}-gram overlap with {self.name} paper '{pid}': {shared} of the paper's "
                                f"{len(cand)} distinct {self.ngram}-word shingles occur in it "
                                f"({shared / len(cand):.3f} >= threshold {self.threshold})")
        return None


def default_eval_set(*, ngram: int = DEFAULT_NGRAM, threshold: float = DEFAULT_THRESHOLD,
                     splits: tuple[str, ...] = ("main", "dev")) -> EvalSet:
    """PaperBench's papers (titles and arXiv ids, no text) of the given splits; see PAPERBENCH_PAPERS."""
    papers = [EvalPaper(id=p["id"], title=p["title"], arxiv_id=p["arxiv_id"], aliases=tuple(p.get("aliases", ())))
              for p in PAPERBENCH_PAPERS if p["split"] in splits]
    return EvalSet(papers, name="PaperBench", ngram=ngram, threshold=threshold)


def _builtin_arxiv_id(paper_id: str, title: str) -> str | None:
    key = normalize_title(title)
    for p in PAPERBENCH_PAPERS:
        if p["id"] == paper_id or normalize_title(p["title"]) == key:
            return p["arxiv_id"]
    return None


def _read_text(path: pathlib.Path, where: str) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as e:
        raise EvalSetError(f"{where}: cannot read {path}: {e}") from e
    if text.startswith("version https://git-lfs.github.com/spec/"):
        raise EvalSetError(f"{where}: {path} is a Git LFS pointer, not the paper's text; run `git lfs pull` "
                           f"in that checkout, or list the papers without text in a JSON eval set")
    return text


def read_flat_yaml(path: pathlib.Path) -> dict[str, str]:
    """The top-level `key: scalar` pairs of a simple YAML file (PaperBench's config.yaml is flat);
    quoted values are unquoted. Used instead of a YAML library so the factory has no extra dependency."""
    out: dict[str, str] = {}
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#") or line.startswith((" ", "\t", "-")):
            continue
        key, sep, value = line.partition(":")
        if not sep:
            raise EvalSetError(f"{path}:{lineno}: expected `key: value`, got {line!r}")
        value = value.strip()
        if value[:1] == '"':
            try:
                value = json.loads(value)
            except ValueError as e:
                raise EvalSetError(f"{path}:{lineno}: bad double-quoted value {value!r}: {e}") from e
        elif value[:1] == "'":
            value = value[1:-1].replace("''", "'")
        out[key.strip()] = value
    return out


def load_eval_set(path: str | os.PathLike, *, ngram: int = DEFAULT_NGRAM,
                  threshold: float = DEFAULT_THRESHOLD) -> EvalSet:
    """An evaluation set from a JSON list or a directory of paper directories (see the module docstring)."""
    path = pathlib.Path(path)
    papers: list[EvalPaper] = []
    if path.is_dir():
        for d in sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith(".")):
            cfg_path = d / "config.yaml"
            if not cfg_path.exists():
                raise EvalSetError(f"{d}: an eval paper directory needs config.yaml with `id` and `title`")
            cfg = read_flat_yaml(cfg_path)
            if not cfg.get("title"):
                raise EvalSetError(f"{cfg_path}: field 'title' is missing or empty")
            pid = cfg.get("id") or d.name
            text = _read_text(d / "paper.md", str(d)) if (d / "paper.md").exists() else None
            arxiv = cfg.get("arxiv_id") or _builtin_arxiv_id(pid, cfg["title"])
            papers.append(EvalPaper(id=pid, title=cfg["title"], arxiv_id=arxiv, text=text))
        if not papers:
            raise EvalSetError(f"{path}: no paper directories (each with config.yaml) found")
    elif path.is_file():
        try:
            entries = json.loads(path.read_text(encoding="utf-8"))
        except ValueError as e:
            raise EvalSetError(f"{path}: not valid JSON: {e}") from e
        if not isinstance(entries, list) or not entries:
            raise EvalSetError(f"{path}: expected a non-empty JSON list of {{title, arxiv_id?, text?}} objects")
        for i, e in enumerate(entries):
            where = f"{path}: entry {i}"
            if not isinstance(e, dict):
                raise EvalSetError(f"{where}: expected an object, got {type(e).__name__}")
            unknown = set(e) - {"id", "title", "arxiv_id", "aliases", "text", "text_file"}
            if unknown:
                raise EvalSetError(f"{where}: unknown field(s) {sorted(unknown)}; allowed: id, title, arxiv_id, "
                                   f"aliases, text, text_file")
            if not isinstance(e.get("title"), str) or not e["title"].strip():
                if not e.get("arxiv_id"):
                    raise EvalSetError(f"{where}: field 'title' is missing (and there is no arxiv_id)")
            if e.get("arxiv_id") and normalize_arxiv_id(e["arxiv_id"]) is None:
                raise EvalSetError(f"{where}: field 'arxiv_id' {e['arxiv_id']!r} is not an arXiv id "
                                   f"(like 2402.14758 or 2402.14758v2)")
            text = e.get("text")
            if e.get("text_file"):
                text = _read_text(path.parent / e["text_file"], where)
            papers.append(EvalPaper(id=str(e.get("id") or e.get("title") or e["arxiv_id"]),
                                    title=e.get("title") or "", arxiv_id=e.get("arxiv_id"),
                                    aliases=tuple(e.get("aliases") or ()), text=text))
    else:
        raise EvalSetError(f"--eval_set {path}: no such file or directory")
    return EvalSet(papers, name=f"eval set {path.name}", ngram=ngram, threshold=threshold)


def eval_set_from_flag(value: str | None, *, ngram: int = DEFAULT_NGRAM,
                       threshold: float = DEFAULT_THRESHOLD) -> EvalSet:
    """What launch/factory.py's --eval_set means: empty or "paperbench" -> the default; else a path."""
    if not value or value == "paperbench":
        return default_eval_set(ngram=ngram, threshold=threshold)
    return load_eval_set(value, ngram=ngram, threshold=threshold)
