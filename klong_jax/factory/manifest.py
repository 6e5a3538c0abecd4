"""The Research-Factory manifest: one JSON file in --out that records, per paper and per stage, what ran,
with which inputs, what it produced and what it cost, so every stage is resumable and cached.

Layout of `OUT/manifest.json` (format version 1):

    {"version": 1, "created_at": ISO, "updated_at": ISO,
     "papers": {PAPER_ID: {"source": "name in --papers", "title": str | null,
                           "stages": {STAGE_NAME: RECORD, ...}}},
     "retired": [{"paper_id", "reason", "retired_at", "entry"}]}

    RECORD = {"status": "done" | "skipped" | "failed", "input_hash": str,
              "reason": str | null,         # why it was skipped (status "skipped")
              "error": str | null,          # what went wrong (status "failed")
              "outputs": {name: path},      # paths relative to OUT; all must exist for a cache hit
              "info": {...},                # free-form JSON (e.g. the matched eval paper)
              "metrics": {...},             # numbers; the reserved keys below feed the report
              "tokens": {"prompt": int, "completion": int},
              "started_at": ISO, "finished_at": ISO, "seconds": float, "attempts": int}

Caching rule: a stage reruns for a paper unless its record has status "done" or "skipped", the same
`input_hash`, and every path in `outputs` still exists. A failed stage, one that never finished (the
process died inside it: no record is written until it ends), one whose input changed and one whose
outputs were deleted all rerun. The input hash is the stage's business: hash everything the result
depends on (the source bytes, the previous stage's input hash or output contents, the model/endpoint
and prompt versions, the relevant config) with `hash_inputs(...)`.

How a stage plugs in (stages are identified by name only; the manifest knows nothing of them):

    manifest = Manifest(out_dir)                     # loads OUT/manifest.json or starts empty; takes the lock
    h = hash_inputs("rubric_draft/v1", judge_model, file_sha256(task_dir / "paper.md"))
    with manifest.stage(paper_id, "rubric", h) as st:
      if not st.cached:                              # cached: st.record holds the finished record
        tree = draft_rubric(...)                     # any exception: recorded as failed, then re-raised
        st.add_tokens(prompt=p, completion=c)        # may be called many times, also before a failure
        st.done(outputs={"rubric": f"tasks/{paper_id}/rubric.json"}, metrics={"rubrics": 1})
    record = manifest.run_stage(paper_id, "rollouts", h2, fn)   # same, fn(st) inside; never raises
    manifest.close()                                 # flushes and releases the lock
    report = write_report(manifest)                  # OUT/report.json + OUT/report.txt

Inside the body call exactly one of `st.done(...)`, `st.skip(reason, ...)`, `st.fail(error, ...)`;
a body that returns without one (and was not cached) is a bug: it is recorded as failed and raises.

Reserved metric keys, summed over all records by the report: "rubrics" (rubric trees made),
"episodes" (teacher episodes run), "kept" (episodes kept for training), "scores" (a list of episode
scores in [0, 1], histogrammed in 10 bins). Any other numeric metric is summed per stage as well.

One owner: a manifest has a single writer process. `Manifest(out_dir)` takes `OUT/manifest.lock`
(holding the pid and host); a second process on the same OUT gets a ManifestError naming the owner.
Within the process share one Manifest object: its methods are thread-safe. The file is rewritten
atomically (temp file in OUT, fsync, rename) after every finished stage, so a crash never leaves a
half-written manifest.
"""
from __future__ import annotations

import atexit
import contextlib
import dataclasses
import datetime
import hashlib
import json
import os
import pathlib
import socket
import tempfile
import threading
import time
from typing import Any, Callable, Iterator

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
LOCK_NAME = "manifest.lock"
REPORT_JSON = "report.json"
REPORT_TXT = "report.txt"
STATUSES = ("done", "skipped", "failed")
FINISHED = ("done", "skipped")
RESERVED_METRICS = ("rubrics", "episodes", "kept", "scores")
HISTOGRAM_BINS = 10


class ManifestError(RuntimeError):
    """A manifest that cannot be read or owned; the message names the file and the fix."""


class StageIncomplete(RuntimeError):
    """A stage body that returned without calling done(), skip() or fail()."""


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds")


def hash_inputs(*parts: Any) -> str:
    """sha256 hex of the canonical JSON of `parts` (strings, numbers, lists, dicts; paths as str)."""
    canon = json.dumps([str(p) if isinstance(p, pathlib.PurePath) else p for p in parts],
                       sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return hashlib.sha256(canon.encode("utf-8")).hexdigest()


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 hex of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write `text` to `path` through a temp file in the same directory, fsync, then rename: readers see
    the old or the new content, never a partial file."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclasses.dataclass
class StageRun:
    """One stage of one paper, handed to the body of `Manifest.stage`.

    `cached` is True when a finished record with the same input hash (and existing outputs) is present:
    then `record` is that record and the body must not redo the work. Otherwise the body does the work
    and calls exactly one of done / skip / fail."""

    manifest: "Manifest"
    paper_id: str
    name: str
    input_hash: str
    cached: bool
    record: dict | None
    started_at: str = ""
    _t0: float = 0.0
    _tokens: dict = dataclasses.field(default_factory=lambda: {"prompt": 0, "completion": 0})
    _outcome: dict | None = None

    def add_tokens(self, prompt: int = 0, completion: int = 0) -> None:
        """Accumulate token counts (kept also when the stage later fails: failed calls cost tokens too)."""
        self._tokens["prompt"] += int(prompt)
        self._tokens["completion"] += int(completion)

    def done(self, outputs: dict[str, str] | None = None, *, metrics: dict | None = None,
             info: dict | None = None, tokens: dict | None = None) -> None:
        """Finish successfully. `outputs`: name -> path relative to OUT (each must exist now)."""
        self._finish("done", outputs=outputs, metrics=metrics, info=info, tokens=tokens)

    def skip(self, reason: str, *, outputs: dict[str, str] | None = None, metrics: dict | None = None,
             info: dict | None = None, tokens: dict | None = None) -> None:
        """Finish by deciding the paper is not used (e.g. contaminated); `reason` says why, for the report."""
        if not reason:
            raise ValueError(f"stage {self.name!r} of paper {self.paper_id!r}: skip() needs a reason")
        self._finish("skipped", reason=reason, outputs=outputs, metrics=metrics, info=info, tokens=tokens)

    def fail(self, error: str, *, metrics: dict | None = None, info: dict | None = None,
             tokens: dict | None = None) -> None:
        """Finish unsuccessfully without raising; the stage reruns next time."""
        self._finish("failed", error=error or "failed (no message)", metrics=metrics, info=info,
                     tokens=tokens)

    def _finish(self, status: str, *, reason: str | None = None, error: str | None = None,
                outputs: dict[str, str] | None = None, metrics: dict | None = None,
                info: dict | None = None, tokens: dict | None = None) -> None:
        if self.cached:
            raise RuntimeError(f"stage {self.name!r} of paper {self.paper_id!r} is cached; its body must not "
                               f"call done/skip/fail (check `st.cached` first)")
        if self._outcome is not None:
            raise RuntimeError(f"stage {self.name!r} of paper {self.paper_id!r} finished twice "
                               f"({self._outcome['status']} then {status})")
        if tokens:
            self.add_tokens(tokens.get("prompt", 0), tokens.get("completion", 0))
        outputs = {str(k): str(v) for k, v in (outputs or {}).items()}
        if status != "failed":
            missing = [f"{k}={v}" for k, v in outputs.items() if not (self.manifest.out_dir / v).exists()]
            if missing:
                raise ValueError(f"stage {self.name!r} of paper {self.paper_id!r} declares outputs that do not "
                                 f"exist under {self.manifest.out_dir}: {', '.join(missing)}")
        self._outcome = {"status": status, "reason": reason, "error": error, "outputs": outputs,
                         "metrics": dict(metrics or {}), "info": dict(info or {})}


class Manifest:
    """The manifest of one factory output directory (see the module docstring for format and API)."""

    def __init__(self, out_dir: str | os.PathLike, *, lock: bool = True):
        self.out_dir = pathlib.Path(out_dir).resolve()
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.out_dir / MANIFEST_NAME
        self._mutex = threading.RLock()
        self._lock_path: pathlib.Path | None = None
        if lock:
            self._acquire_lock()
        self.data = self._load()

    # ---- ownership -------------------------------------------------------------------------------
    def _acquire_lock(self) -> None:
        lock_path = self.out_dir / LOCK_NAME
        me = {"pid": os.getpid(), "host": socket.gethostname(), "since": _now()}
        for _ in range(2):
            try:
                fd = os.open(lock_path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                try:
                    owner = json.loads(lock_path.read_text())
                except (OSError, ValueError):
                    owner = {}
                pid, host = owner.get("pid"), owner.get("host")
                if pid == os.getpid() and host == me["host"]:
                    break  # this process already owns it (one Manifest object per process is the rule)
                if host == me["host"] and isinstance(pid, int) and not _pid_alive(pid):
                    lock_path.unlink(missing_ok=True)  # stale: its owner died
                    continue
                raise ManifestError(
                    f"{lock_path}: the manifest in {self.out_dir} is owned by pid {pid} on {host} since "
                    f"{owner.get('since')}; one process writes a manifest. Stop that run, or if it is gone "
                    f"(another host), delete {lock_path}.")
            else:
                with os.fdopen(fd, "w") as f:
                    json.dump(me, f)
                break
        self._lock_path = lock_path
        atexit.register(self._release_lock)

    def _release_lock(self) -> None:
        if self._lock_path is None:
            return
        try:
            owner = json.loads(self._lock_path.read_text())
            if owner.get("pid") == os.getpid():
                self._lock_path.unlink(missing_ok=True)
        except (OSError, ValueError):
            pass
        self._lock_path = None

    def close(self) -> None:
        """Write the manifest and release the lock. Safe to call twice."""
        with self._mutex:
            self.save()
            self._release_lock()

    def __enter__(self) -> "Manifest":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- file ------------------------------------------------------------------------------------
    def _load(self) -> dict:
        if not self.path.exists():
            now = _now()
            return {"version": FORMAT_VERSION, "created_at": now, "updated_at": now, "papers": {},
                    "retired": []}
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except ValueError as e:
            raise ManifestError(f"{self.path}: not valid JSON ({e}); it is only ever written atomically, so "
                                f"it was edited by hand: fix it or move it away to start over") from e
        if not isinstance(data, dict) or data.get("version") != FORMAT_VERSION:
            version = data.get("version") if isinstance(data, dict) else None
            raise ManifestError(f"{self.path}: field 'version' is {version!r}, expected {FORMAT_VERSION}; move it "
                                f"away to start over")
        if not isinstance(data.get("papers"), dict):
            raise ManifestError(f"{self.path}: field 'papers' must be an object of paper id -> entry")
        data.setdefault("retired", [])
        for pid, entry in data["papers"].items():
            for name, rec in entry.get("stages", {}).items():
                if rec.get("status") not in STATUSES:
                    raise ManifestError(f"{self.path}: papers.{pid}.stages.{name}.status is "
                                        f"{rec.get('status')!r}, expected one of {STATUSES}")
        return data

    def save(self) -> None:
        """Rewrite OUT/manifest.json atomically."""
        with self._mutex:
            self.data["updated_at"] = _now()
            atomic_write_text(self.path, json.dumps(self.data, indent=1, ensure_ascii=False) + "\n")

    # ---- papers ----------------------------------------------------------------------------------
    def paper_ids(self) -> list[str]:
        with self._mutex:
            return sorted(self.data["papers"])

    def paper(self, paper_id: str) -> dict | None:
        """The paper's entry ({"source", "title", "stages"}) or None."""
        with self._mutex:
            return self.data["papers"].get(paper_id)

    def set_paper(self, paper_id: str, **fields: Any) -> dict:
        """Create the paper's entry if needed and set top-level fields (source, title, ...)."""
        if "stages" in fields:
            raise ValueError("set_paper: 'stages' is written by stage() only")
        with self._mutex:
            entry = self.data["papers"].setdefault(paper_id, {"source": None, "title": None, "stages": {}})
            entry.update(fields)
            return entry

    def papers_from_source(self, source: str) -> list[str]:
        """Ids of the papers whose entry came from `source` (a name in --papers), as its source or as one
        of its `duplicate_sources`."""
        with self._mutex:
            return sorted(pid for pid, e in self.data["papers"].items()
                          if e.get("source") == source or source in e.get("duplicate_sources", ()))

    def retire(self, paper_id: str, reason: str) -> None:
        """Move a paper's entry out of `papers` (e.g. its source changed and it got a new id); kept in
        `retired` for the record, left out of the report's counts."""
        with self._mutex:
            entry = self.data["papers"].pop(paper_id, None)
            if entry is not None:
                self.data["retired"].append({"paper_id": paper_id, "reason": reason, "retired_at": _now(),
                                             "entry": entry})
                self.save()

    def record(self, paper_id: str, name: str) -> dict | None:
        """The last finished record of stage `name` for the paper, or None."""
        with self._mutex:
            entry = self.data["papers"].get(paper_id)
            return None if entry is None else entry["stages"].get(name)

    def is_cached(self, paper_id: str, name: str, input_hash: str) -> bool:
        """True when the stage finished (done or skipped) with this input hash and its outputs exist."""
        rec = self.record(paper_id, name)
        if rec is None or rec["status"] not in FINISHED or rec.get("input_hash") != input_hash:
            return False
        return all((self.out_dir / p).exists() for p in rec.get("outputs", {}).values())

    # ---- stages ----------------------------------------------------------------------------------
    @contextlib.contextmanager
    def stage(self, paper_id: str, name: str, input_hash: str, *, force: bool = False,
              t0: float | None = None) -> Iterator[StageRun]:
        """Run (or reuse) stage `name` for a paper; see the module docstring. An exception in the body is
        recorded as a failed record (type and message) and re-raised; `force` ignores the cache. `t0`
        (a time.monotonic() value) backdates the start, for work done before the stage could be keyed
        (ingest learns the paper id by converting the paper)."""
        if not name or not isinstance(name, str):
            raise ValueError(f"stage name must be a non-empty string, got {name!r}")
        cached = (not force) and self.is_cached(paper_id, name, input_hash)
        run = StageRun(self, paper_id, name, input_hash, cached, self.record(paper_id, name) if cached else None)
        if cached:
            yield run
            return
        now = time.monotonic()
        run._t0 = now if t0 is None else t0
        run.started_at = (datetime.datetime.now(datetime.timezone.utc)
                          - datetime.timedelta(seconds=now - run._t0)).isoformat(timespec="milliseconds")
        try:
            yield run
        except BaseException as e:  # noqa: B902 - recorded, then re-raised unchanged
            if run._outcome is None:
                run._outcome = {"status": "failed", "reason": None, "error": f"{type(e).__name__}: {e}",
                                "outputs": {}, "metrics": {}, "info": {}}
            self._commit(run)
            raise
        if run._outcome is None:
            run._outcome = {"status": "failed", "reason": None, "outputs": {}, "metrics": {}, "info": {},
                            "error": "stage body finished without calling done(), skip() or fail()"}
            self._commit(run)
            raise StageIncomplete(f"stage {name!r} of paper {paper_id!r}: the body returned without calling "
                                  f"done(), skip() or fail(); recorded as failed")
        self._commit(run)

    def run_stage(self, paper_id: str, name: str, input_hash: str, fn: Callable[[StageRun], Any], *,
                  force: bool = False) -> dict:
        """`fn(st)` inside `stage(...)`, skipped when cached; an exception from fn is recorded as failed
        and not raised (KeyboardInterrupt and SystemExit still propagate). Returns the stage's record."""
        try:
            with self.stage(paper_id, name, input_hash, force=force) as st:
                if not st.cached:
                    fn(st)
        except Exception:  # recorded by stage()
            pass
        rec = self.record(paper_id, name)
        assert rec is not None
        return rec

    def _commit(self, run: StageRun) -> None:
        seconds = time.monotonic() - run._t0
        with self._mutex:
            entry = self.data["papers"].setdefault(run.paper_id, {"source": None, "title": None, "stages": {}})
            prev = entry["stages"].get(run.name)
            attempts = (prev.get("attempts", 0) if prev and prev.get("input_hash") == run.input_hash else 0) + 1
            entry["stages"][run.name] = {
                "status": run._outcome["status"], "input_hash": run.input_hash,
                "reason": run._outcome["reason"], "error": run._outcome["error"],
                "outputs": run._outcome["outputs"], "info": run._outcome["info"],
                "metrics": run._outcome["metrics"], "tokens": dict(run._tokens),
                "started_at": run.started_at, "finished_at": _now(), "seconds": round(seconds, 6),
                "attempts": attempts,
            }
            self.save()


# ---- report ------------------------------------------------------------------------------------
def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def build_report(manifest: Manifest) -> dict:
    """The factory report over all current (not retired) papers of the manifest:

    papers_in; per stage (in order of first appearance) done/skipped/failed counts, tokens, summed
    numeric metrics, seconds and throughput (done papers per minute of that stage's own time, i.e. the
    summed durations of its done records: serial-equivalent, unaffected by gaps between resumed runs);
    skipped [{paper_id, stage, reason}] and failed [{paper_id, stage, error}]; rubrics_made,
    episodes_run, episodes_kept (the reserved metrics summed); a 10-bin score histogram on [0, 1]
    (bin i holds i/10 <= s < (i+1)/10, s = 1.0 in the last bin); tokens in total."""
    with manifest._mutex:
        papers = json.loads(json.dumps(manifest.data["papers"]))
        retired = len(manifest.data["retired"])
    stage_order: list[str] = []
    stages: dict[str, dict] = {}
    skipped, failed, scores = [], [], []
    totals = {m: 0 for m in ("rubrics", "episodes", "kept")}
    for pid in sorted(papers):
        for name, rec in papers[pid]["stages"].items():
            if name not in stages:
                stage_order.append(name)
                stages[name] = {"done": 0, "skipped": 0, "failed": 0, "tokens": {"prompt": 0, "completion": 0},
                                "metrics": {}, "seconds_done": 0.0}
            s = stages[name]
            s[rec["status"]] += 1
            for k in ("prompt", "completion"):
                s["tokens"][k] += int(rec.get("tokens", {}).get(k, 0))
            if rec["status"] == "done":
                s["seconds_done"] += float(rec.get("seconds", 0.0))
            for key, val in rec.get("metrics", {}).items():
                if key == "scores":
                    scores.extend(float(v) for v in val)
                elif _is_number(val):
                    s["metrics"][key] = s["metrics"].get(key, 0) + val
                    if key in totals:
                        totals[key] += val
            if rec["status"] == "skipped":
                skipped.append({"paper_id": pid, "stage": name, "reason": rec.get("reason")})
            elif rec["status"] == "failed":
                failed.append({"paper_id": pid, "stage": name, "error": rec.get("error")})
    for s in stages.values():
        s["seconds_done"] = round(s["seconds_done"], 6)
        s["papers_per_min"] = (round(s["done"] / (s["seconds_done"] / 60.0), 3)
                               if s["done"] and s["seconds_done"] > 0 else None)
    hist = [0] * HISTOGRAM_BINS
    out_of_range = 0
    for sc in scores:
        if not 0.0 <= sc <= 1.0:
            out_of_range += 1
            continue
        hist[min(int(sc * HISTOGRAM_BINS), HISTOGRAM_BINS - 1)] += 1
    tokens = {k: sum(s["tokens"][k] for s in stages.values()) for k in ("prompt", "completion")}
    return {
        "generated_at": _now(), "manifest": str(manifest.path), "papers_in": len(papers),
        "papers_retired": retired, "stage_order": stage_order, "stages": stages,
        "skipped": skipped, "failed": failed,
        "rubrics_made": totals["rubrics"], "episodes_run": totals["episodes"],
        "episodes_kept": totals["kept"],
        "score_histogram": {"bins": [[i / HISTOGRAM_BINS, (i + 1) / HISTOGRAM_BINS] for i in range(HISTOGRAM_BINS)],
                            "counts": hist, "n": len(scores) - out_of_range, "out_of_range": out_of_range,
                            "mean": (round(sum(s for s in scores if 0 <= s <= 1) / (len(scores) - out_of_range), 6)
                                     if len(scores) > out_of_range else None)},
        "tokens": {**tokens, "total": tokens["prompt"] + tokens["completion"]},
    }


def format_report(report: dict) -> str:
    """The report as a text table (what report.txt holds and launch/factory.py prints)."""
    lines = [f"Research-Factory report ({report['generated_at']})",
             f"papers in: {report['papers_in']}" + (f"  (retired entries: {report['papers_retired']})"
                                                    if report["papers_retired"] else ""), ""]
    header = (f"{'stage':<16}{'done':>7}{'skipped':>9}{'failed':>8}{'tok in':>12}{'tok out':>12}{'sec':>10}"
              f"{'papers/min':>12}")
    lines += [header, "-" * len(header)]
    for name in report["stage_order"]:
        s = report["stages"][name]
        ppm = "-" if s["papers_per_min"] is None else f"{s['papers_per_min']:.2f}"
        lines.append(f"{name[:15]:<16}{s['done']:>7}{s['skipped']:>9}{s['failed']:>8}"
                     f"{s['tokens']['prompt']:>12}{s['tokens']['completion']:>12}{s['seconds_done']:>10.1f}{ppm:>12}")
    lines += ["", f"rubrics made: {report['rubrics_made']}   episodes run: {report['episodes_run']}   "
              f"kept: {report['episodes_kept']}",
              f"tokens: {report['tokens']['prompt']} prompt + {report['tokens']['completion']} completion = "
              f"{report['tokens']['total']}"]
    h = report["score_histogram"]
    if h["n"] or h["out_of_range"]:
        lines += ["", f"score histogram (n={h['n']}, mean={h['mean']}, out of [0,1]: {h['out_of_range']}):"]
        peak = max(h["counts"]) or 1
        for (lo, hi), c in zip(h["bins"], h["counts"]):
            bar = "#" * round(30 * c / peak)
            lines.append(f"  [{lo:.1f}, {hi:.1f}{']' if hi >= 1.0 else ')'} {c:>6} {bar}".rstrip())
    if report["skipped"]:
        lines += ["", "skipped:"] + [f"  {s['paper_id']} [{s['stage']}]: {s['reason']}" for s in report["skipped"]]
    if report["failed"]:
        lines += ["", "failed:"] + [f"  {f['paper_id']} [{f['stage']}]: {f['error']}" for f in report["failed"]]
    return "\n".join(lines) + "\n"


def write_report(manifest: Manifest) -> dict:
    """Build the report and write OUT/report.json and OUT/report.txt (atomically); returns the report."""
    report = build_report(manifest)
    atomic_write_text(manifest.out_dir / REPORT_JSON, json.dumps(report, indent=1, ensure_ascii=False) + "\n")
    atomic_write_text(manifest.out_dir / REPORT_TXT, format_report(report))
    return report
