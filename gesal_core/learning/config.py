"""`LearningConfig`: every setting of a node's update, each with a help text.

The help texts (``field(metadata={"help": ...})``) are the settings' documentation for
users; the figures behind each default are in docs/learning.md, at the section a help
text names.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import GesalError


@dataclass(frozen=True)
class LearningConfig:
    """How a node's z is updated from its community's feedback (docs/learning.md, "The
    update")."""

    optimizer: str = field(
        default="adam",
        metadata={
            "help": '"adam": a fresh Adam optimiser per update, whose first steps move every '
            'component of z by about the learning rate; "ngd": normalised gradient descent, '
            "each inner step moving z by the learning rate in L2."
        },
    )
    lr: float = field(
        default=3e-3,
        metadata={
            "help": "Learning rate of an update. Four Adam steps of 3e-3 move z by about 2.7 "
            'in L2 on the bundled model (docs/learning.md, "The update").'
        },
    )
    inner_steps: int = field(
        default=4, metadata={"help": "Optimiser steps per update, all on the same samples."}
    )
    l2: float = field(
        default=0.0,
        metadata={
            "help": "Strength λ of the pull (λ/2)‖z − 1‖² towards the base model; 0 turns it "
            "off. A pull strong enough to matter stops learning; the collapse guard keeps "
            'the model itself instead (docs/learning.md, "Tried and rejected").'
        },
    )
    max_grad_norm: float = field(
        default=1.0, metadata={"help": "The gradient of z is clipped to this L2 norm."}
    )
    max_step: float = field(
        default=3.0,
        metadata={"help": "Bound on how far one update moves z (‖Δz‖, L2)."},
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
            "help": "Share (0 to 1) of a correction's weight put on the tokens the member "
            "changed; 0 weighs every token alike. Off by default (docs/learning.md, "
            '"Tried and rejected").'
        },
    )
    replay: int = field(
        default=16,
        metadata={
            "help": "Up to this many of a node's earlier liked answers and corrections, "
            "newest first, are learnt again with an update that new feedback calls for; "
            '0 turns replay off (docs/learning.md, "Replay").'
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
            "help": "Shrink a node's step as its votes turn positive, to none when no "
            "recent vote is 👎; a new correction always gets a full step "
            '(docs/learning.md, "Settling").'
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
            "help": "Multiple of the step (learning rate and step bound) for a node whose "
            "recent votes are all 👎, rising from 1 where half of them are; 1 turns it off "
            '(docs/learning.md, "Rejected nodes step further").'
        },
    )
    max_drift: float = field(
        default=0.0,
        metadata={
            "help": "Bound on a node's total distance from the base model, ‖z − 1‖ over all "
            "its updates; 0: no bound."
        },
    )
    compute_dtype: str = field(
        default="auto",
        metadata={
            "help": 'Precision of an update\'s matrix products: "auto" (bf16 where it runs '
            'faster on this machine, else fp32), "float32" or "bfloat16". z, its gradient, '
            "the optimiser and log-probs stay fp32 "
            '(docs/learning.md, "Precision of updates").'
        },
    )
    compile: bool = field(
        default=False,
        metadata={
            "help": "Run an update's passes under torch.compile: faster updates, for "
            "minutes of compiling once per process at start-up."
        },
    )

    def __post_init__(self) -> None:
        if not 0.0 <= self.demo_focus <= 1.0:
            raise GesalError(f"demo_focus must be between 0 and 1, got {self.demo_focus}")
        if not self.rejected_step >= 1.0:  # (also catches NaN)
            raise GesalError(
                f"rejected_step must be at least 1 (1 turns it off), got {self.rejected_step}"
            )
