"""What an update learns from: rated answers and corrections as `Sample`s, and a round's
`Batch` of them.

A sample holds token ids, never text: it is scored on exactly the ids that were
sampled (or that a member wrote), so the boundary between prompt and response cannot
shift under re-tokenisation. A correction is a demonstration whose tokens may carry
weights (`correction_weights`).
"""

from __future__ import annotations

import difflib
from collections.abc import Iterator
from dataclasses import dataclass


@dataclass
class Sample:
    """One thing to learn from: a rated response, or a demonstration (a correction)."""

    prompt_ids: list[int]
    response_ids: list[int]
    reward: float = 0.0
    demo: bool = False
    old_logprob: float | None = None
    staleness: int = 0  # versions of z between sampling and now
    advantage: float = 0.0
    # per response token, for a correction (`correction_weights`); None: all 1
    weights: list[float] | None = None
    # the reward an earlier update already learnt this response with (`Reply.counted`):
    # its votes changed since, and only the change is learnt (advantage reward − counted;
    # the baseline, applied the first time, is not applied again and does not move)
    counted: float | None = None


def correction_weights(
    original: list[int], corrected: list[int], focus: float
) -> list[float] | None:
    """Per-token weights of a correction that put ``focus`` of its likelihood term on the
    tokens the member changed, the tokens that do not line up with the bot's own answer.

    A correction mostly repeats what the bot said ("Plants grow by ... 😊 ..."); what it
    teaches is the few tokens that differ (the emoji, an opener) and the token that follows
    a cut (the end of text after a shortened sentence). Under the plain per-token mean
    those few share the gradient with every sampled word the bot happened to say, and the
    update learns the copy as much as the change. The weights average to 1, so the term
    stays a bounded mean per sample. Alignment is on token ids (`difflib`): kept words
    next to a change may tokenise differently and count as changed. None (all 1) when
    focus is 0 or nothing, or everything, changed.
    """
    if focus <= 0 or not corrected:
        return None
    matcher = difflib.SequenceMatcher(a=list(original), b=list(corrected), autojunk=False)
    changed = [True] * len(corrected)
    blocks = [b for b in matcher.get_matching_blocks() if b.size]
    kept_to = 0  # the bot's tokens aligned so far
    for block in blocks:
        changed[block.b : block.b + block.size] = [False] * block.size
        if block.a > kept_to:  # the member cut words: the token after the cut is the change
            changed[block.b] = True
        kept_to = block.a + block.size
    if blocks and blocks[-1].a + blocks[-1].size == len(original) and original[-1] != corrected[-1]:
        # the bot's answer was cut off (no end of text) and the correction keeps all of
        # it: its end of text says where the member stopped writing, not a change
        changed[-1] = False
    n_changed = sum(changed)
    if n_changed in (0, len(corrected)):
        return None
    extra = focus * len(corrected) / n_changed
    return [(1.0 - focus) + (extra if c else 0.0) for c in changed]


def correction_sample(
    prompt_ids: list[int], said_ids: list[int], ids: list[int], focus: float
) -> Sample:
    """A member's correction ``ids`` of the answer ``said_ids`` as a demonstration, its
    tokens weighted by `correction_weights` (all alike at ``focus`` 0)."""
    weights = correction_weights(said_ids, ids, focus)
    return Sample(prompt_ids, ids, demo=True, weights=weights)


@dataclass
class Batch:
    """What one update learns from, and whether it should happen at all (`plan_batch`).

    Every loss sees the samples in the order ``rl + demos``; `passes` cuts that order into
    forward/backward passes.
    """

    rl: list[Sample]  # rated samples with a non-zero advantage
    demos: list[Sample]  # new corrections, then replayed liked answers and corrections
    baseline: float  # the node's baseline after this round's rewards
    dropped_stale: int
    skip: str = ""  # why no step is taken ("" = step)

    def passes(self, size: int) -> Iterator[tuple[int, Batch]]:
        """(offset, samples) of each forward/backward pass of ``size`` samples, in the
        order of ``rl + demos``; every adapter's update accumulates over these."""
        n, size = len(self.rl) + len(self.demos), max(1, size)
        for lo in range(0, n, size):
            yield lo, self.slice(lo, lo + size)

    def slice(self, lo: int, hi: int) -> Batch:
        """Samples lo..hi of ``rl + demos`` (the order every loss sees them in)."""
        n_rl = len(self.rl)
        return Batch(
            self.rl[lo:hi],
            self.demos[max(0, lo - n_rl) : max(0, hi - n_rl)],
            self.baseline,
            self.dropped_stale,
            self.skip,
        )
