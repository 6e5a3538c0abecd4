"""The grammar of task sections: each kind is a module with make/spec/initial_files/rubric/plan."""
from types import ModuleType

from klong_jax.tasks.kinds import append, files, function, rename, stats

KINDS: dict[str, ModuleType] = {m.KIND: m for m in (files, append, rename, stats, function)}

# Which kinds a task of each difficulty draws its sections from.
KINDS_BY_DIFFICULTY = {
    1: ("files", "append", "rename"),
    2: ("files", "append", "rename", "stats", "function"),
    3: ("files", "append", "rename", "stats", "function"),
}


def kind_of(section: dict) -> ModuleType:
    try:
        return KINDS[section["kind"]]
    except KeyError:
        raise ValueError(f"section has unknown kind {section.get('kind')!r}; "
                         f"known kinds: {sorted(KINDS)}") from None
