"""The built-in tasks by name, which of them may choose a default (development) and which
are only reported (held out), and loading a task by name or from a file.

The split is fixed before any tuning on the new tasks, and written down in
docs/results.md ("The task suite"): a default is chosen by development tasks only, and
held-out tasks are reported, never tuned on. The three original preferences (brevity,
emoji, opener) chose every default so far, so they are development tasks by history.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path

from .preferences import bullets, cheerful, follow_up, french, lowercase, numbered, pirate
from .tasks import Task, brevity, counting, emoji, no_markdown, opener, two_cluster

# Preferences a default may be chosen by, and preferences that are only reported, each of
# a different kind (format has one of each: numbered steps, bullets). "plain" is no
# preference here: the bundled model's answers to these questions are plain prose already.
DEVELOPMENT = ("brevity", "emoji", "opener", "cheerful", "numbered")
HELD_OUT = ("bullets", "lowercase", "pirate", "follow-up", "french")

# names that stand for a group of tasks on `gesal-bot eval --task`
GROUPS = {"development": DEVELOPMENT, "held-out": HELD_OUT, "suite": DEVELOPMENT + HELD_OUT}

BUILTIN: dict[str, Callable[[], Task]] = {
    "brevity": brevity,
    "emoji": emoji,
    "opener": opener,
    "plain": no_markdown,
    "cheerful": cheerful,
    "numbered": numbered,
    "bullets": bullets,
    "lowercase": lowercase,
    "pirate": pirate,
    "follow-up": follow_up,
    "french": french,
    "counting": counting,
    "two-cluster": two_cluster,
}


def task_specs(spec: str) -> list[str]:
    """``--task``'s value as task specs: a group name (`GROUPS`), or one or more task
    names or ``file.py:Name`` specs separated by commas."""
    specs = [t.strip() for t in spec.split(",") if t.strip()]
    if not specs:
        raise ValueError("no task given")
    return [name for t in specs for name in GROUPS.get(t, (t,))]


def group_of(name: str) -> str:
    """ "development", "held out" or "other" (counting, two-cluster, a user's task)."""
    return "development" if name in DEVELOPMENT else "held out" if name in HELD_OUT else "other"


def load_task(spec: str) -> Task:
    """A built-in name, or ``path/to/file.py:Name`` (a Task, a class or a factory)."""
    if spec in BUILTIN:
        return BUILTIN[spec]()
    path, _, name = spec.rpartition(":")
    if not path or not name:
        raise ValueError(f"unknown task {spec!r}: use one of {sorted(BUILTIN)} or file.py:Name")
    module_path = Path(path)
    if not module_path.is_file():
        raise ValueError(f"task file not found: {module_path}")
    mod_spec = importlib.util.spec_from_file_location(
        f"gesal_user_task_{module_path.stem}", module_path
    )
    module = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(module)
    obj = getattr(module, name, None)
    if obj is None:
        raise ValueError(f"{module_path} has no {name!r}")
    task = obj() if callable(obj) and not isinstance(obj, Task) else obj
    return task if isinstance(task, Task) else _as_task(task, spec)


def _as_task(obj, spec: str) -> Task:
    """A user's task object as a `Task`: the four documented attributes are required, the
    optional ones default (docs/results.md, "Evaluating a preference of your own"), and a
    bad value is named."""
    missing = [a for a in ("name", "train", "heldout", "complies") if not hasattr(obj, a)]
    if missing:
        raise ValueError(
            f"{spec}: a task needs {', '.join(map(repr, missing))} "
            "(see docs/results.md, 'Evaluating a preference of your own')"
        )
    train, heldout = list(obj.train), list(obj.heldout)
    for label, prompts in (("train", train), ("heldout", heldout)):
        if not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
            raise ValueError(f"{spec}: {label!r} must be a non-empty list of non-empty strings")
    for attr in ("complies", "vote", "predict", "correct"):
        if getattr(obj, attr, None) is not None and not callable(getattr(obj, attr)):
            raise ValueError(f"{spec}: {attr!r} must be a function")
    level = getattr(obj, "constant_answer_level", None)
    return Task(
        name=str(obj.name),
        description=str(getattr(obj, "description", None) or f"a user task from {spec}"),
        train=train,
        heldout=heldout,
        complies=obj.complies,
        constant_answer=None if level is None else (lambda _prompts: float(level)),
        predict=getattr(obj, "predict", None),
        correct=getattr(obj, "correct", None),
        facts=getattr(obj, "facts", None),
        voter=getattr(obj, "vote", None),
    )
