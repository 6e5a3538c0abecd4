"""The Grain input pipeline: records -> validate -> tokenize + split -> pack -> batch.

    ds = make_dataset(DataConfig(...))          # a grain.IterDataset
    it = iter(ds); batch = next(it)             # dict of numpy [B, T]: input_ids, targets,
                                                # loss_mask, positions, doc_ids, window_ids
    state = it.get_state(); ...; it.set_state(state)   # resumes at exactly the next batch

Order: source -> shard (shard_index::shard_count; default this JAX process) -> shuffle (seeded,
reshuffled every epoch) -> repeat -> parse/validate/split (MapDataset.map, threads) -> rename words
(optional, seeded per record; renaming.py) -> pack
(PackIterDataset: `pack_chunk` trajectories at a time, best-fit) -> batch -> worker processes
(optional; each worker runs the stages above on its slice, so batches come whole from one worker).

Errors: on_error="raise" stops at the first bad record with its file, line and field; "skip" logs
each one and counts it (`skipped` in the packer state, per worker).
"""
from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import grain

from klong_jax.config_mapping import known_items
from klong_jax.data.chat_template import check_chat_template_name, make_chat_template
from klong_jax.data.context import ContextConfig, ContextOverflow, ContextPolicy
from klong_jax.data.packing import PACK_MODES, PackStats, make_docs, pack_docs
from klong_jax.data.renaming import RenameWords, word_ids
from klong_jax.data.sources import JsonlSource, RawRecord
from klong_jax.data.splitting import Window, split
from klong_jax.data.tokenizer import Tokenizer, load_tokenizer
from klong_jax.data.trajectory import END_TOOLS, TrajectoryError, check_on_error, parse_line, without_reasoning

SOURCE_KINDS = ("jsonl", "tfds")


@dataclass(frozen=True)
class DataConfig:
    tokenizer: str                          # .model (SentencePiece), tokenizer.json or .gguf
    context: ContextConfig
    seq_len: int                            # T, row length (>= context.budget_tokens)
    batch_size: int
    source: str = "jsonl"                   # "jsonl" or "tfds" (ArrayRecord via tfds.data_source)
    paths: tuple[str, ...] = ()             # jsonl: files or globs
    tfds_data_dir: str | None = None        # tfds: the data_dir the builder wrote to
    tfds_name: str = "klong_trajectories"
    split: str = "train"
    packing: str = "shared_prefix"          # or "standard"
    pack_chunk: int = 32                    # trajectories packed together
    seed: int = 0
    shuffle: bool = True
    num_epochs: int | None = 1              # None: repeat forever
    on_error: str = "raise"                 # or "skip"
    train_overlap: bool = False
    end_tools: tuple[str, ...] = END_TOOLS
    shard_index: int | None = None          # None: jax.process_index()
    shard_count: int | None = None          # None: jax.process_count()
    num_workers: int = 0                    # Grain worker processes (0: in this process)
    read_threads: int = 1                   # threads for the parse/split map
    drop_remainder: bool = True
    rename_words: tuple[str, ...] = ()      # words renamed consistently per trajectory (renaming.py)
    rename_prob: float = 0.0                # share of trajectories renamed
    chat_template: str = "auto"             # "auto" | "glm45" | "chatml" (chat_template.make_chat_template)
    keep_reasoning: bool = True             # False: assistant reasoning is dropped (trajectory.without_reasoning)

    def __post_init__(self):
        check_on_error(self.on_error)
        check_chat_template_name(self.chat_template, "data.chat_template")
        if self.packing not in PACK_MODES:
            raise ValueError(f"packing={self.packing!r}; choose one of {PACK_MODES}")
        if self.source not in SOURCE_KINDS:
            raise ValueError(f"source={self.source!r}; choose one of {SOURCE_KINDS}")
        if self.seq_len < self.context.budget_tokens:
            raise ValueError(f"seq_len={self.seq_len} must be >= context.budget_tokens="
                             f"{self.context.budget_tokens}: a window must fit one row")
        if self.rename_prob and not self.rename_words:
            raise ValueError(f"data.pipeline.rename_prob={self.rename_prob} needs data.pipeline.rename_words (a comma "
                             "list of the words to rename; the embedded suite fills in its task words)")
        for name in ("batch_size", "pack_chunk", "read_threads"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}={getattr(self, name)} must be positive")

    @classmethod
    def from_mapping(cls, config: Mapping) -> DataConfig:
        """From a dict or ml_collections.ConfigDict (`context` a nested mapping)."""
        items = known_items(config, cls, "data")
        if "context" not in items:
            raise ValueError("the data config needs a 'context' (ContextConfig fields)")
        if not isinstance(items["context"], ContextConfig):
            items["context"] = ContextConfig.from_mapping(items["context"])
        for key in ("paths", "end_tools", "rename_words"):
            if key in items and isinstance(items[key], str):
                items[key] = tuple(p for p in items[key].split(",") if p)
            elif key in items:
                items[key] = tuple(items[key])
        return cls(**items)


@dataclass(frozen=True)
class SplitRecord:
    source: str
    line: int
    windows: list[Window]


@dataclass(frozen=True)
class Skipped:
    source: str
    line: int
    reason: str


class TrajectoryToWindows:
    """Map transform: one raw record -> its windows (or Skipped under on_error='skip')."""

    def __init__(self, tokenizer: Tokenizer | str, context: ContextConfig, *, on_error: str = "raise",
                 train_overlap: bool = False, end_tools: Sequence[str] = END_TOOLS, chat_template: str = "auto",
                 keep_reasoning: bool = True):
        check_on_error(on_error)
        self.chat_template = check_chat_template_name(chat_template, "data.chat_template")
        self.tokenizer = tokenizer
        self.context = context
        self.on_error = on_error
        self.train_overlap = train_overlap
        self.end_tools = tuple(end_tools)
        self.keep_reasoning = keep_reasoning
        self._policy: ContextPolicy | None = None

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_policy"] = None     # rebuilt in each worker process
        return state

    @property
    def policy(self) -> ContextPolicy:
        if self._policy is None:
            tok = load_tokenizer(self.tokenizer) if isinstance(self.tokenizer, str) else self.tokenizer
            self._policy = ContextPolicy(make_chat_template(tok, self.chat_template), self.context)
        return self._policy

    def __call__(self, record: RawRecord) -> SplitRecord | Skipped:
        try:
            trajectory = parse_line(record.data, source=record.source, line=record.line,
                                    end_tools=self.end_tools)
            if not self.keep_reasoning:
                trajectory = without_reasoning(trajectory)
            try:
                windows = split(trajectory, self.policy, train_overlap=self.train_overlap)
            except ContextOverflow as e:
                raise ContextOverflow(f"{record.source}:{record.line}: {e}") from None
        except (TrajectoryError, ContextOverflow) as e:
            if self.on_error == "raise":
                raise
            logging.warning("skipping %s", e)   # the error names its file and line
            return Skipped(record.source, record.line, f"{type(e).__name__}: {e}")
        return SplitRecord(record.source, record.line, windows)


@dataclass
class _Counters:
    skipped: int = 0
    trajectories: int = 0
    pack: PackStats = field(default_factory=PackStats)

    def as_state(self) -> dict:
        return {"skipped": self.skipped, "trajectories": self.trajectories, **{
            k: v for k, v in self.pack.as_dict().items() if k != "efficiency"}}

    @classmethod
    def from_state(cls, state: dict) -> _Counters:
        pack = PackStats(**{k: state[k] for k in ("rows", "docs", "windows", "real_tokens",
                                                  "row_tokens", "prefix_tokens_saved")})
        return cls(state["skipped"], state["trajectories"], pack)


class _PackIterator(grain.DatasetIterator):
    """Packs `chunk` parent records at a time. Its state is the parent's state at the start of the
    current chunk and the rows already emitted from it: restoring re-reads and re-packs the chunk
    (deterministically) and skips those rows, so it resumes at exactly the next row."""

    def __init__(self, parent: grain.DatasetIterator, seq_len: int, mode: str, chunk: int,
                 pad_id: int):
        super().__init__(parent)
        self._seq_len, self._mode, self._chunk, self._pad_id = seq_len, mode, chunk, pad_id
        self._chunk_state = parent.get_state()
        self._before = _Counters()      # counters as of the start of the current chunk
        self.counters = _Counters()
        self._rows: list = []
        self._next_row = 0

    def _fill(self) -> None:
        self._chunk_state = self._parent.get_state()
        self._before = _Counters.from_state(self.counters.as_state())
        docs, n = [], 0
        while n < self._chunk:
            try:
                record = next(self._parent)
            except StopIteration:
                break
            n += 1
            if isinstance(record, Skipped):
                self.counters.skipped += 1
                continue
            self.counters.trajectories += 1
            docs += make_docs(record.windows, self._seq_len, self._mode)
        if n == 0:
            raise StopIteration
        self._rows, stats = pack_docs(docs, self._seq_len, self._pad_id)
        self.counters.pack.add(stats)
        self._next_row = 0

    def __next__(self) -> dict:
        while self._next_row >= len(self._rows):
            self._fill()
        row = self._rows[self._next_row]
        self._next_row += 1
        return row

    def get_state(self) -> dict:
        return {"parent": self._chunk_state, "next_row": self._next_row,
                "counters": self._before.as_state()}

    def set_state(self, state: dict) -> None:
        self._parent.set_state(state["parent"])
        self.counters = _Counters.from_state(state["counters"])
        self._rows, self._next_row = [], 0
        try:
            self._fill()
        except StopIteration:
            return
        self._next_row = state["next_row"]


class PackIterDataset(grain.IterDataset):
    """Rows of [seq_len] arrays from SplitRecords (see packing.py for the layout)."""

    def __init__(self, parent: grain.IterDataset, *, seq_len: int, mode: str = "shared_prefix",
                 chunk: int = 32, pad_id: int = 0):
        super().__init__(parent)
        if mode not in PACK_MODES:
            raise ValueError(f"packing={mode!r}; choose one of {PACK_MODES}")
        self._args = (seq_len, mode, chunk, pad_id)

    def __iter__(self) -> _PackIterator:
        return _PackIterator(self._parent.__iter__(), *self._args)


def _shard(config: DataConfig) -> tuple[int, int]:
    if config.shard_index is not None and config.shard_count is not None:
        index, count = config.shard_index, config.shard_count
    elif config.shard_index is None and config.shard_count is None:
        by_process = grain.sharding.ShardByJaxProcess(drop_remainder=True)
        index, count = by_process.shard_index, by_process.shard_count
    else:
        raise ValueError("give both shard_index and shard_count, or neither")
    if not 0 <= index < count:
        raise ValueError(f"shard_index={index} not in [0, shard_count={count})")
    return index, count


def make_source(config: DataConfig):
    if config.source == "jsonl":
        if not config.paths:
            raise ValueError("source='jsonl' needs paths")
        return JsonlSource(config.paths)
    from klong_jax.data.tfds_source import TfdsRecordSource
    if not config.tfds_data_dir:
        raise ValueError("source='tfds' needs tfds_data_dir")
    return TfdsRecordSource(config.tfds_data_dir, split=config.split, name=config.tfds_name)


def make_rows(config: DataConfig, *, tokenizer: Tokenizer | None = None) -> grain.IterDataset:
    """The pipeline up to packing: rows of [seq_len] arrays (no batching, no worker processes)."""
    return _rows(config, tokenizer)[0]


def make_dataset(config: DataConfig, *, tokenizer: Tokenizer | None = None) -> grain.IterDataset:
    """The whole pipeline: batches of [batch_size, seq_len]; `tokenizer` overrides
    config.tokenizer (an already loaded one, pickled by content into worker processes)."""
    it_ds, _ = _rows(config, tokenizer)
    it_ds = it_ds.batch(config.batch_size, drop_remainder=config.drop_remainder)
    if config.num_workers > 0:
        it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=config.num_workers))
    return it_ds


def _rows(config: DataConfig, tokenizer: Tokenizer | None):
    tok = tokenizer if tokenizer is not None else load_tokenizer(config.tokenizer)
    source = make_source(config)
    index, count = _shard(config)
    ds = grain.MapDataset.source(source)
    if count > 1:
        # Equal shard sizes keep hosts in step (the remainder records are left out).
        ds = ds[index:len(ds) - len(ds) % count:count]
    if len(ds) == 0:
        raise ValueError(f"shard {index}/{count} of {source!r} is empty")
    ds = ds.seed(config.seed)
    if config.shuffle:
        ds = ds.shuffle()
    if config.num_epochs != 1:
        ds = ds.repeat(config.num_epochs)
    ds = ds.map(TrajectoryToWindows(config.tokenizer if tokenizer is None else tok, config.context,
                                    on_error=config.on_error, train_overlap=config.train_overlap,
                                    end_tools=config.end_tools, chat_template=config.chat_template,
                                    keep_reasoning=config.keep_reasoning))
    if config.rename_prob > 0:
        ds = ds.random_map(RenameWords(word_ids(tok, config.rename_words), tok.vocab_size, config.rename_prob))
    it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=config.read_threads,
                                                 prefetch_buffer_size=4 * config.read_threads))
    it_ds = PackIterDataset(it_ds, seq_len=config.seq_len, mode=config.packing,
                            chunk=config.pack_chunk, pad_id=tok.pad_id)
    return it_ds, tok
