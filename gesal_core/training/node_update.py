"""One node's update from a round: its rated replies and corrections become samples,
REINFORCE steps move its z on the model worker, and the result is a `NodeUpdate` that
the trainer checks and commits.

A reply's verdict is learnt once: a reply trained on before (`Reply.counted`) is learnt
again only when later votes changed its verdict, and then as the change. Numbers read
from the store are checked before use: one NaN baseline or reward would make every later
advantage, loss and update of the node NaN.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

from ..config import EngineConfig
from ..learning import Sample, StepResult, reinforce_steps, settle_scale
from ..records import Node, NodeUpdate, Reply
from ..svf import SVFModel
from ..verdicts import DOWNVOTED_KEPT, norm_text
from ..worker import ModelWorker
from .reports import NodeReport
from .samples import SampleRules

log = logging.getLogger(__name__)


@dataclass
class _Verdicts:
    """What a node's rated replies of this round give."""

    samples: list[Sample] = field(default_factory=list)
    rewards: list[float] = field(default_factory=list)  # first verdicts: stats and window
    changed: float = 0.0  # how far later votes moved the verdicts of replies counted before
    counted: dict[str, float] = field(default_factory=dict)  # reply id -> verdict now
    downvoted: list[str] = field(default_factory=list)  # the node's list, with new ones


class NodeLearner:
    """Turns one node's feedback of a round into its `NodeUpdate` and `NodeReport`."""

    def __init__(
        self,
        svf: SVFModel,
        pad_id: int,
        worker: ModelWorker,
        config: EngineConfig,
        rules: SampleRules,
    ) -> None:
        self.svf, self.pad_id, self.worker = svf, pad_id, worker
        self.config, self.rules = config, rules

    async def update(
        self,
        channel: str,
        node: Node,
        replies: list[Reply],
        corrections: list[tuple[Reply, str]],
        channel_rewards: dict[str, float],
        prior: float,
        replay: list[Sample] | None = None,
        unlearnt: set[str] = frozenset(),
    ) -> tuple[NodeUpdate, NodeReport]:
        """The node's update from its rated replies and corrections. ``prior`` is the
        baseline of a node without history (see `prior_baseline`), ``replay`` its earlier
        liked answers and corrections (see `replay_sets`). Replies in ``unlearnt`` count
        in the node's votes but are not learnt from (see `SampleRules.learnable`)."""
        baseline = self._start_baseline(channel, node, prior)
        history = self._history(channel, node)
        corrected = {reply.reply_id for reply, _ in corrections}
        v = self._verdicts(channel, node, replies, channel_rewards, corrected, unlearnt)
        demos = self._demonstrations(corrections)
        v.samples.extend(demos)
        learning = self.config.learning
        result = await self.worker.steps(
            reinforce_steps,
            self.svf,
            node.z,
            v.samples,
            baseline,
            learning,
            self.pad_id,
            replay or [],
            settle_scale(history, v.rewards, len(demos) > 0, learning),
        )
        update = self._node_update(channel, node, baseline, history, v, result)
        return update, NodeReport(
            node.node_id, result.status, result.reason, len(v.counted), len(demos)
        )

    def _start_baseline(self, channel: str, node: Node, prior: float) -> float:
        """The node's baseline, or ``prior`` for a node without history. A non-finite one
        (written by hand or by a build that checked nothing) is logged and replaced."""
        baseline = node.baseline if node.rated else prior
        if not math.isfinite(baseline):
            log.warning(
                "channel %s node %s: baseline %r is not finite; it restarts from the "
                "channel's usual verdict, %.3f",
                channel,
                node.node_id,
                baseline,
                prior,
            )
            baseline = prior
        return baseline

    def _history(self, channel: str, node: Node) -> list[float]:
        """The node's recent rewards, non-finite ones left out (and logged)."""
        history = [r for r in node.recent if math.isfinite(r)]
        if len(history) < len(node.recent):
            log.warning(
                "channel %s node %s: non-finite recent rewards dropped", channel, node.node_id
            )
        return history

    def _verdicts(
        self,
        channel: str,
        node: Node,
        replies: list[Reply],
        channel_rewards: dict[str, float],
        corrected: set[str],
        unlearnt: set[str],
    ) -> _Verdicts:
        """Each rated reply's verdict: counted, added to the downvoted answers when
        negative, and a sample unless it is unlearnt or a correction replaces it."""
        v = _Verdicts(downvoted=list(node.downvoted))
        for reply in replies:
            r = channel_rewards.get(reply.reply_id)
            if r is None:  # every vote retracted: what was learnt stays learnt
                continue
            self._check_counted(channel, reply)
            if reply.counted is None:
                v.rewards.append(r)
            elif r == reply.counted:  # new votes, same verdict: nothing more to learn
                continue
            else:
                v.changed += r - reply.counted
            v.counted[reply.reply_id] = r
            if r < 0 and norm_text(reply.text) not in v.downvoted:
                v.downvoted.append(norm_text(reply.text))
            if reply.reply_id in unlearnt:
                continue
            if reply.reply_id in corrected and self.config.learning.correction_replaces_vote:
                continue
            v.samples.append(
                Sample(
                    reply.prompt_ids,
                    reply.response_ids,
                    reward=r,
                    old_logprob=reply.logprob,
                    staleness=max(0, node.version - reply.z_version),
                    counted=reply.counted,
                )
            )
        return v

    @staticmethod
    def _check_counted(channel: str, reply: Reply) -> None:
        """A non-finite counted verdict is logged and forgotten: the reply is learnt
        afresh."""
        if reply.counted is not None and not math.isfinite(reply.counted):
            log.warning(
                "channel %s reply %s: its counted verdict %r is not finite; it is learnt afresh",
                channel,
                reply.reply_id,
                reply.counted,
            )
            reply.counted = None

    def _demonstrations(self, corrections: list[tuple[Reply, str]]) -> list[Sample]:
        """Each correction of this round as a demonstration (its newest stored tokens)."""
        demos = []
        for reply, text in corrections:
            ids = next((c["ids"] for c in reversed(reply.corrections) if c["text"] == text), None)
            if ids:
                demos.append(self.rules.correction(reply, ids))
        return demos

    def _node_update(
        self,
        channel: str,
        node: Node,
        baseline: float,
        history: list[float],
        v: _Verdicts,
        result: StepResult,
    ) -> NodeUpdate:
        """What the commit writes for the node. A non-finite baseline from the steps is
        logged, and the one the round started from is kept."""
        updated = result.status == "updated"
        if not math.isfinite(result.baseline):
            log.warning(
                "channel %s node %s: the round's baseline %r is not finite; %.3f is kept",
                channel,
                node.node_id,
                result.baseline,
                baseline,
            )
        return NodeUpdate(
            node_id=node.node_id,
            expected_version=node.version,
            z=result.z if updated else None,
            baseline=result.baseline if math.isfinite(result.baseline) else baseline,
            rated_delta=len(v.rewards),
            reward_sum_delta=float(sum(v.rewards)) + v.changed,
            recent=(history + v.rewards)[-self.config.recent_rewards :],
            updated=updated,
            rolled_back=result.status == "rolled_back",
            downvoted=v.downvoted[-DOWNVOTED_KEPT:],
            counted=v.counted,
        )
