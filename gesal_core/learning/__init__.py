"""How a node's z learns from its community: REINFORCE on 👍/👎 votes, corrections as
demonstrations (docs/learning.md).

* `reinforce`: the maths of an update (baseline, advantages, loss, step bound) and the
  update loop `reinforce_steps`;
* `samples`: what an update learns from (`Sample`, corrections, a round's `Batch`);
* `logprobs`: scoring a sample's log-probability under z, with the speed choices of a
  CPU (shared prefixes, bf16 products, compiled passes) kept out of the maths;
* its settings, `LearningConfig`, are in gesal_core/config.py with the engine's others.
"""

from ..config import LearningConfig
from .logprobs import (
    COMPILED_MIN_TOKENS,
    UpdateScorer,
    response_logprobs,
    sequence_logprobs,
    shares_prefix,
    target_logprobs,
    warm_up_compiled,
)
from .reinforce import (
    StepResult,
    advantages,
    feedback_loss,
    plan_batch,
    prior_baseline,
    reinforce_step,
    reinforce_steps,
    settle_scale,
)
from .samples import Batch, Sample, correction_sample, correction_weights

__all__ = [
    "COMPILED_MIN_TOKENS",
    "Batch",
    "LearningConfig",
    "Sample",
    "StepResult",
    "UpdateScorer",
    "advantages",
    "correction_sample",
    "correction_weights",
    "feedback_loss",
    "plan_batch",
    "prior_baseline",
    "reinforce_step",
    "reinforce_steps",
    "response_logprobs",
    "sequence_logprobs",
    "settle_scale",
    "shares_prefix",
    "target_logprobs",
    "warm_up_compiled",
]
