"""Every setting of the engine, each field with its default and its help text.

`EngineConfig` is fixed when the engine is built: sampling (`SamplingConfig`), a node's
update (`LearningConfig`), the collapse guard (`GuardConfig`) and training rounds.
Per-channel settings an admin may change are `ChannelConfig` (gesal_core/records.py),
kept in the store.

A field's ``metadata`` is its documentation and where a person sets it
(`gesal_core.config_fields`): ``help`` is what users read, ``env`` the deployment's
environment variable (`bot.settings` builds its variables from these), ``flag`` the
option of ``gesal-bot eval``, ``ge``/``gt``/``le``/``lt`` the range checked there. The
figures behind a default are in docs/learning.md, at the section its help names.

This module imports no torch: the bot reads its settings before the model loads.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from .config_fields import setting
from .errors import GesalError
from .records import ChannelConfig

# the precisions an update's products can run in ("auto": bf16 where it is faster)
COMPUTE_DTYPES = ("auto", "float32", "bfloat16")


@dataclass(frozen=True)
class SamplingConfig:
    """How to sample. ``temperature == 0`` means greedy decoding."""

    max_new_tokens: int = setting(128, help="Longest answer, in tokens.")
    temperature: float = setting(0.7, help="Sampling temperature of an answer; 0: greedy.")
    top_p: float = setting(
        0.9,
        help="Nucleus sampling: the smallest set of tokens with this "
        "much probability is sampled from.",
    )
    top_k: int = setting(0, help="Only the k likeliest tokens are sampled from; 0: no limit.")
    repetition_penalty: float = setting(
        1.0, help="Penalty on tokens already in the answer (1: none)."
    )

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError("max_new_tokens must be at least 1")
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0 (0 means greedy)")
        if not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass(frozen=True)
class LearningConfig:
    """How a node's z is updated from its community's feedback (docs/learning.md, "The
    update")."""

    optimizer: Literal["adam", "ngd"] = field(
        default="adam",
        metadata={
            "flag": "--optimizer",
            "help": '"adam": a fresh Adam optimiser per update, whose first steps move every '
            'component of z by about the learning rate; "ngd": normalised gradient descent, '
            "each inner step moving z by the learning rate in L2.",
        },
    )
    lr: float = field(
        default=3e-3,
        metadata={
            "env": "GESAL_LEARNING_RATE",
            "flag": "--lr",
            "gt": 0,
            "le": 0.1,
            "help": "Learning rate of an update. Four Adam steps of 3e-3 move z by about 2.7 "
            'in L2 on the bundled model (docs/learning.md, "The update").',
        },
    )
    inner_steps: int = field(
        default=4,
        metadata={
            "flag": "--inner-steps",
            "ge": 1,
            "help": "Optimiser steps per update, all on the same samples.",
        },
    )
    l2: float = field(
        default=0.0,
        metadata={
            "env": "GESAL_PULL",
            "flag": "--l2",
            "ge": 0,
            "le": 10,
            "help": "Strength λ of the pull (λ/2)‖z − 1‖² towards the base model; 0 turns it "
            "off. A pull strong enough to matter stops learning; the collapse guard keeps "
            'the model itself instead (docs/learning.md, "Tried and rejected").',
        },
    )
    max_grad_norm: float = field(
        default=1.0, metadata={"help": "The gradient of z is clipped to this L2 norm."}
    )
    max_step: float = field(
        default=3.0,
        metadata={
            "env": "GESAL_MAX_STEP",
            "flag": "--max-step",
            "gt": 0,
            "le": 100,
            "help": "Bound on how far one update moves z (‖Δz‖, L2).",
        },
    )
    min_advantage: float = field(
        default=0.2,
        metadata={
            "help": "No step unless some rated sample's |advantage| reaches this, and rated "
            "samples below it stay out of the loss: Adam turns noise into full-size steps."
        },
    )
    baseline_beta: float = field(
        default=0.8,
        metadata={
            "help": "Weight of the old value in the moving average of rewards that is a "
            "node's baseline."
        },
    )
    normalize_advantage: bool = field(
        default=False,
        metadata={"help": "Divide a round's advantages by their standard deviation."},
    )
    is_clip: float = field(
        default=2.0,
        metadata={
            "help": "Upper bound of the importance weight of a sample answered under an older z."
        },
    )
    max_staleness: int = field(
        default=8,
        metadata={"help": "Samples answered under a z more versions old than this are dropped."},
    )
    demo_weight: float = field(
        default=1.0,
        metadata={"help": "Weight β of the corrections' length-normalised likelihood term."},
    )
    demo_focus: float = field(
        default=0.0,
        metadata={
            "flag": "--demo-focus",
            "ge": 0,
            "le": 1,
            "help": "Share (0 to 1) of a correction's weight put on the tokens the member "
            "changed; 0 weighs every token alike. Off by default (docs/learning.md, "
            '"Tried and rejected").',
        },
    )
    replay: int = field(
        default=16,
        metadata={
            "flag": "--replay",
            "ge": 0,
            "help": "Up to this many of a node's earlier liked answers and corrections, "
            "newest first, are learnt again with an update that new feedback calls for; "
            '0 turns replay off (docs/learning.md, "Replay").',
        },
    )
    correction_replaces_vote: bool = field(
        default=False,
        metadata={
            "help": "A corrected reply teaches through its correction only, not also "
            'through its 👎 (docs/learning.md, "Corrections").'
        },
    )
    max_tokens: int = field(
        default=1280,
        metadata={
            "help": "Tokens of one sample, prompt and response. Past it the response is cut "
            "first (the prompt keeps at least half), then the prompt's oldest tokens."
        },
    )
    micro_batch: int = field(
        default=4,
        metadata={
            "help": "Samples per forward/backward pass. Gradients add up exactly over "
            "passes, and waiting answers are served between them."
        },
    )
    settle: bool = field(
        default=True,
        metadata={
            "flag": "--settle",
            "help": "Shrink a node's step as its votes turn positive, to none when no "
            "recent vote is 👎; a new correction always gets a full step "
            '(docs/learning.md, "Settling").',
        },
    )
    settle_min_votes: int = field(
        default=8,
        metadata={
            "help": "Rated replies a node needs before a round can count as contentment "
            "and settle its step."
        },
    )
    rejected_step: float = field(
        default=2.0,
        metadata={
            "env": "GESAL_REJECTED_STEP",
            "flag": "--rejected-step",
            "ge": 1,
            "le": 10,
            "help": "Multiple of the step (learning rate and step bound) for a node whose "
            "recent votes are all 👎, rising from 1 where half of them are; 1 turns it off "
            '(docs/learning.md, "Rejected nodes step further").',
        },
    )
    max_drift: float = field(
        default=0.0,
        metadata={
            "flag": "--max-drift",
            "ge": 0,
            "help": "Bound on a node's total distance from the base model, ‖z − 1‖ over all "
            "its updates; 0: no bound.",
        },
    )
    compute_dtype: Literal["auto", "float32", "bfloat16"] = field(
        default="auto",
        metadata={
            "env": "GESAL_UPDATE_DTYPE",
            "flag": "--compute-dtype",
            "help": 'Precision of an update\'s matrix products: "auto" (bf16 where it runs '
            'faster on this machine, else fp32), "float32" or "bfloat16". z, its gradient, '
            "the optimiser and log-probs stay fp32 "
            '(docs/learning.md, "Precision of updates").',
        },
    )
    compile: bool = field(
        default=False,
        metadata={
            "env": "GESAL_COMPILE_UPDATES",
            "flag": "--compile",
            "help": "Run an update's passes under torch.compile: faster updates, for "
            "minutes of compiling once per process at start-up.",
        },
    )

    def __post_init__(self) -> None:
        if not 0.0 <= self.demo_focus <= 1.0:
            raise GesalError(f"demo_focus must be between 0 and 1, got {self.demo_focus}")
        if not self.rejected_step >= 1.0:  # (also catches NaN)
            raise GesalError(
                f"rejected_step must be at least 1 (1 turns it off), got {self.rejected_step}"
            )


@dataclass(frozen=True)
class GuardConfig:
    """When an update is rolled back (docs/learning.md, "Collapse guard")."""

    enabled: bool = field(
        default=True,
        metadata={
            "flag": "--guard",
            "help": "Check every update on probe answers and roll back one that fails.",
        },
    )
    max_new_tokens: int = field(
        default=32, metadata={"help": "Length in tokens of a greedy probe answer."}
    )
    max_extra_degenerate: int = field(
        default=0,
        metadata={
            "help": "Probe answers allowed to be degenerate where the base model's answer "
            "to the same probe is not."
        },
    )
    max_topic_drop: float = field(
        default=0.15,
        metadata={
            "help": "Allowed drop of the mean question/answer similarity of the probe "
            "answers, against the base model's."
        },
    )
    max_extra_off_topic: int = field(
        default=0,
        metadata={
            "help": "Off-topic answers allowed beyond the base model's: answers that share "
            "no content word with their question or the base answer and sit far from the "
            "question in the embedding (the evaluation's own measure)."
        },
    )
    related_probes: int = field(
        default=4,
        metadata={"help": "How many of the node's most recent prompts are asked as probes."},
    )
    max_fact_drop: float = field(
        default=1.386,
        metadata={
            "help": "A fact is lost when its log-probability where the base answer states "
            "it falls by more than this (1.386 = ln 4: four times less likely)."
        },
    )
    min_fact_logprob: float = field(
        default=-0.7,
        metadata={
            "help": "Only facts the base model states with at least this log-probability "
            "count: less certain ones shift with style, not with forgetting "
            '(docs/learning.md, "Fact probes").'
        },
    )
    min_facts_lost: int = field(
        default=2,
        metadata={
            "help": "Lost facts that fail an update; a single lost fact is mostly a shift "
            'of style (docs/learning.md, "Fact probes").'
        },
    )
    sampled: bool = field(
        default=False,
        metadata={
            "env": "GESAL_GUARD_SAMPLED",
            "flag": "--sampled-guard",
            "help": "Also answer the probes by sampling, as replies are served, and judge "
            "those answers by the same rules. Costs a generation pass of served length per "
            'training round (docs/learning.md, "Sampled probes").',
        },
    )
    sample_seed: int = field(
        default=0, metadata={"help": "Random seed of the sampled probe answers."}
    )
    backtrack: int = field(
        default=0,
        metadata={
            "flag": "--guard-backtrack",
            "ge": 0,
            "le": 8,
            "help": "Halvings (0 to 8) of a failed update's step to try before it is rolled "
            "back; 0 rolls back at once. It learns no sooner "
            '(docs/learning.md, "Tried and rejected").',
        },
    )

    def __post_init__(self) -> None:
        if not 0 <= self.backtrack <= 8:
            raise GesalError(f"backtrack must be between 0 and 8 halvings, got {self.backtrack}")
        if self.min_facts_lost < 1:
            raise GesalError(f"min_facts_lost must be at least 1, got {self.min_facts_lost}")


@dataclass(frozen=True)
class EngineConfig:
    """Engine-wide settings; per-channel ones live in `ChannelConfig`."""

    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    system: str | None = setting(
        None, help="System prompt every answer is written under; None: the model's own."
    )
    max_prompt_tokens: int = setting(
        1024, help="Longest prompt; the oldest turns of a long conversation go first."
    )
    explore_max_temperature: float = setting(
        0.7,
        help="Highest sampling temperature, reached by a node whose recent votes are all 👎 "
        "(it rises linearly once most are); 0.7, the usual temperature, or less: no "
        'exploring (docs/learning.md, "Exploration and repeats").',
        env="GESAL_EXPLORE_TEMPERATURE",
        flag="--explore-max-temperature",
        ge=0.0,
        le=1.2,
    )
    explore_window: int = setting(8, help="A node's latest rewards that decide exploration.")
    max_resamples: int = setting(
        3, help="Tries to avoid repeating an answer the community voted down."
    )
    learning: LearningConfig = field(default_factory=LearningConfig)
    guard: GuardConfig = field(default_factory=GuardConfig)
    channel_defaults: ChannelConfig = field(default_factory=ChannelConfig)
    recent_rewards: int = setting(16, help="Rewards a node keeps in its recent window.")
    train_lock_ttl: float = setting(
        30.0,
        help="Lease of the trainer lock, in seconds, renewed while training runs: a crashed "
        "trainer's lock frees within it (the commit's checks keep a lost lock harmless).",
    )
    train_round: int = setting(
        8,
        help="A channel trains as soon as this many of its replies have new votes or "
        "corrections, every node with some of it; until then the feedback waits in the "
        'store (1: as soon as one has; docs/learning.md, "Training rounds").',
        env="GESAL_TRAIN_ROUND",
        flag="--round",
        ge=1,
        le=1000,
    )
    train_max_wait: float = setting(
        86400.0,
        help="Seconds new feedback waits for its channel's round at most; after that, the "
        "next scheduled run trains it.",
        env="GESAL_TRAIN_MAX_WAIT",
        ge=0.0,
    )
    park_after: int = setting(
        3,
        help="A channel whose training fails this many runs in a row is parked: scheduled "
        "runs skip it and its feedback stays pending until an admin trains, resets or "
        "imports it, so one channel's bad data costs a few logged tracebacks, not one per run.",
    )

    def __post_init__(self) -> None:
        if self.train_round < 1:
            raise GesalError(f"train_round must be at least 1, not {self.train_round}")
        if self.park_after < 1:
            raise GesalError(f"park_after must be at least 1, not {self.park_after}")
        if not self.train_max_wait >= 0:
            raise GesalError(f"train_max_wait must be 0 or more seconds, not {self.train_max_wait}")
