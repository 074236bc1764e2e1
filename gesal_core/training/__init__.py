"""Training: from a channel's pending feedback to committed node updates.

- rounds.py: when a channel trains (`RoundRule`) and its feedback grouped by node;
- samples.py: which feedback becomes which sample;
- replay.py: each node's earlier liked answers and corrections, re-learnt with new ones;
- node_update.py: one node's REINFORCE update (`NodeLearner`);
- checks.py: the guard with backtracking, and no non-finite z, before a commit;
- failures.py: failed runs counted, shown and parked;
- trainer.py: the run over channels (`Trainer`);
- reports.py: what a run reports (`TrainReport`, `NodeReport`).
"""

from .reports import NodeReport, TrainReport
from .rounds import RoundRule

__all__ = ["NodeReport", "RoundRule", "TrainReport"]
