"""Simulated communities and learning curves: does the bot really learn from votes?

A `Task` is a community: training prompts it asks, held-out prompts it never asks during
training, and the rule by which a member votes on an answer. A method (``none``,
``gesal``, ``svf-single``, ``lora``) runs the same loop under the same vote budget:

    repeat: ask `batch` training prompts -> one member votes on each answer
            -> train on the buffered votes
    at each checkpoint: answer the held-out prompts (without recording them) and measure
            compliance next to answer quality (on-topic rate, degenerate rate, reference NLL)

Learning typically starts only when the first 👍 arrives, so every figure is reported per
seed and as the median over seeds.

User tasks: ``--task path/to/file.py:Name`` where ``Name`` is a `Task` instance, or a
class / zero-argument function returning one. See the README for the interface.

The parts, in the order a run uses them: `tasks` (communities and the judges of
answers), `learners` (the compared methods behind one interface), `harness` (the loop
and its checkpoints), `report` (tables, plots, JSON, ``--merge``), `cli` (``gesal-bot
eval``).
"""

from .cli import add_arguments, run
from .harness import (
    METHODS,
    SAMPLE_SEP,
    Checkpoint,
    EvalConfig,
    Harness,
    RunResult,
    split_samples,
)
from .learners import LORA_LR, EngineLearner, Learner, LoraLearner, adam_update, lora_scorer
from .report import judge_sound, markdown, merge, plot, summarise, write_results
from .suite import BUILTIN, DEVELOPMENT, HELD_OUT, load_task
from .tasks import (
    CREATIVE,
    CREATIVE_HELDOUT,
    HELDOUT_QUESTIONS,
    KEY_FACTS,
    QUESTIONS,
    WORDS,
    Task,
    brevity,
    counting,
    emoji,
    fact_rate,
    no_markdown,
    opener,
    sound_rate,
    states_fact,
    two_cluster,
)

__all__ = [
    "BUILTIN",
    "CREATIVE",
    "CREATIVE_HELDOUT",
    "DEVELOPMENT",
    "HELD_OUT",
    "HELDOUT_QUESTIONS",
    "KEY_FACTS",
    "LORA_LR",
    "METHODS",
    "QUESTIONS",
    "SAMPLE_SEP",
    "WORDS",
    "Checkpoint",
    "EngineLearner",
    "EvalConfig",
    "Harness",
    "Learner",
    "LoraLearner",
    "RunResult",
    "Task",
    "adam_update",
    "add_arguments",
    "brevity",
    "counting",
    "emoji",
    "fact_rate",
    "judge_sound",
    "load_task",
    "lora_scorer",
    "markdown",
    "merge",
    "no_markdown",
    "opener",
    "plot",
    "run",
    "sound_rate",
    "split_samples",
    "states_fact",
    "summarise",
    "two_cluster",
    "write_results",
]
