"""Trajectory datasets as ArrayRecord files, written by a TFDS builder and read with
`tfds.data_source` (no TensorFlow needed for either).

    python -m klong_jax.data.tfds_source --input='runs/*.jsonl' --data_dir=/data/tfds
    DataConfig(source="tfds", tfds_data_dir="/data/tfds", ...)

Each example stores the trajectory's JSON line and where it came from, so the pipeline parses,
validates and reports errors exactly as for JSONL. The builder validates every line while writing
(on_error="raise" stops at the first bad one; "skip" leaves bad lines out and counts them).
"""
from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import tensorflow_datasets as tfds

from klong_jax.data.sources import RawRecord, expand_paths
from klong_jax.data.trajectory import (END_TOOLS, SkipStats, TrajectoryError, check_on_error,
                                       iter_jsonl_lines, parse_line)


class KlongTrajectories(tfds.core.GeneratorBasedBuilder):
    """Agent trajectories (one JSON episode per example)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "JSON line of each trajectory with its source file and line."}

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls):
        # TFDS looks for a checksums file next to the builder's code; this builder downloads
        # nothing. (Its default lookup needs the importlib_resources backport for a class defined
        # inside a package.)
        return None

    def __init__(self, *, input_files: Sequence[str] = (), on_error: str = "raise",
                 end_tools: Sequence[str] = END_TOOLS, **kwargs):
        check_on_error(on_error)
        self._input_files = list(input_files)
        self._on_error = on_error
        self._end_tools = tuple(end_tools)
        self.skip_stats = SkipStats()
        kwargs.setdefault("file_format", "array_record")
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict({
                "json": tfds.features.Text(),
                "source": tfds.features.Text(),
                "line": tfds.features.Scalar(dtype=np.int64),
            }),
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        if not self._input_files:
            raise ValueError("KlongTrajectories needs input_files (JSONL) to build")
        return {"train": self._generate_examples(self._input_files)}

    def _generate_examples(self, paths: Sequence[str]):
        for path in paths:
            for number, raw in iter_jsonl_lines(path):
                try:
                    parse_line(raw, source=path, line=number, end_tools=self._end_tools)
                except TrajectoryError as e:
                    if self._on_error == "raise":
                        raise
                    self.skip_stats.record(e, f"{path}:{number}")
                    continue
                yield f"{path}:{number}", {"json": raw.decode("utf-8").rstrip("\n"),
                                           "source": path, "line": number}


def build(input_files: Sequence[str] | str, data_dir: str, *, on_error: str = "raise",
          end_tools: Sequence[str] = END_TOOLS) -> KlongTrajectories:
    """Validates and writes the JSONL trajectories as ArrayRecord under data_dir."""
    builder = KlongTrajectories(input_files=expand_paths(input_files), on_error=on_error,
                                end_tools=end_tools, data_dir=data_dir)
    builder.download_and_prepare()
    if builder.skip_stats.skipped:
        logging.warning("left out %d invalid trajectories: %s", builder.skip_stats.skipped,
                        dict(builder.skip_stats.by_reason))
    return builder


class TfdsRecordSource:
    """RawRecords of a built dataset, by index (a Grain random-access source)."""

    def __init__(self, data_dir: str, *, split: str = "train", name: str = "klong_trajectories"):
        self._args = (data_dir, split, name)
        self._source = None

    def _open(self):
        if self._source is None:
            data_dir, split, name = self._args
            self._source = tfds.data_source(name, split=split, data_dir=data_dir)
        return self._source

    def __getstate__(self):
        return {"_args": self._args, "_source": None}

    def __len__(self) -> int:
        return len(self._open())

    def __getitem__(self, index: int) -> RawRecord:
        ex = self._open()[index]
        source = ex["source"].decode("utf-8") if isinstance(ex["source"], bytes) else ex["source"]
        data = ex["json"] if isinstance(ex["json"], bytes) else ex["json"].encode("utf-8")
        return RawRecord(source, int(ex["line"]), data)

    def __repr__(self) -> str:
        return f"TfdsRecordSource({self._args[2]}/{self._args[1]} in {self._args[0]})"


def main(argv):
    del argv
    from absl import flags
    f = flags.FLAGS
    builder = build(f.input, f.data_dir, on_error=f.on_error)
    print(f"wrote {builder.info.splits['train'].num_examples} trajectories to {builder.data_dir}"
          f" ({builder.skip_stats.skipped} skipped)")


if __name__ == "__main__":
    from absl import app, flags
    flags.DEFINE_string("input", None, "comma-separated JSONL files or globs")
    flags.DEFINE_string("data_dir", None, "TFDS data_dir to write to")
    flags.DEFINE_enum("on_error", "raise", ["raise", "skip"], "what to do with invalid lines")
    flags.mark_flags_as_required(["input", "data_dir"])
    app.run(main)
