"""Which feedback becomes which training sample.

A vote becomes a REINFORCE sample (built in node_update.py), a correction a
demonstration, and a liked answer a demonstration for replay; a 👍 on a degenerate
answer becomes nothing (`SampleRules.learnable`).
"""

from __future__ import annotations

from ..guard import Guard, degenerate_reason
from ..learning import Sample, correction_sample
from ..records import Reply


class SampleRules:
    """The checks and conversions that turn a channel's feedback into samples."""

    def __init__(self, guard: Guard, demo_focus: float) -> None:
        self.guard = guard
        self.demo_focus = demo_focus

    def learnable(self, reply: Reply, reward: float) -> bool:
        """False for a 👍 on a degenerate answer: a loop, a refusal, or an echo of the
        system prompt. A community may like those ("Hugging Face" is a fine short answer
        to a brevity community), but learning them is how a node collapses; the guard
        would only see it afterwards, on its few probes."""
        if reward <= 0:
            return True
        template = self.guard.template  # the words of the system prompt replies run under
        return degenerate_reason(reply.text, None, reply.prompt_text, template) is None

    def correction(self, reply: Reply, ids: list[int]) -> Sample:
        """A member's better answer (its token ids) to ``reply``'s prompt, as a
        demonstration."""
        return correction_sample(reply.prompt_ids, reply.response_ids, ids, self.demo_focus)
