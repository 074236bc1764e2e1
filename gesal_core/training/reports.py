"""What a training run tells its caller: per channel, what happened to each node, which
channels wait for a full round, failed or are parked. The scheduler logs it, admin
commands show it, the metrics count it."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class NodeReport:
    """One node's outcome in a run."""

    node_id: str
    status: str  # updated | skipped | rolled_back | conflict | orphaned
    reason: str = ""
    samples: int = 0
    corrections: int = 0
    seconds: float = 0.0
    guard_seconds: float = 0.0  # of ``seconds``: this node's share of the guard's probes
    related: list[str] = field(default_factory=list, repr=False)  # prompts, for the guard


@dataclass
class TrainReport:
    """One run over one channel or every channel."""

    channels: dict[str, list[NodeReport]] = field(default_factory=dict)
    events: int = 0  # feedback events learnt from (waiting ones are not counted)
    seconds: float = 0.0
    # channel -> node -> replies with new feedback, for channels whose round is not full
    waiting: dict[str, dict[str, int]] = field(default_factory=dict)
    # channel -> the error its training raised in this run (its feedback stays pending)
    failed: dict[str, str] = field(default_factory=dict)
    # channel -> the error it is parked with, for every channel this run skipped or parked
    # (`EngineConfig.park_after`)
    parked: dict[str, str] = field(default_factory=dict)

    def count(self, status: str) -> int:
        return sum(r.status == status for rs in self.channels.values() for r in rs)

    def summary(self) -> str:
        return (
            f"{self.events} feedback events, {self.count('updated')} nodes updated, "
            f"{self.count('skipped')} skipped, {self.count('rolled_back')} rolled back "
            f"in {self.seconds:.1f}s"
            + (f"; {n} node(s) waiting for a round" if (n := self.n_waiting()) else "")
            + (f"; training failed in {', '.join(sorted(self.failed))}" if self.failed else "")
            + (
                f"; parked until an admin acts: {', '.join(sorted(self.parked))}"
                if self.parked
                else ""
            )
        )

    def n_waiting(self) -> int:
        return sum(len(nodes) for nodes in self.waiting.values())
