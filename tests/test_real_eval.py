"""Slow: the evaluation in miniature, on the real bundled model.

The README's evaluation command, cut to one seed and 16 votes: a community that wants
answers to start with "Sure" (the base model never does: 0% on the held-out questions),
whose members correct the answers they vote down. The full runs of this task are in
docs/results.md; this asks for a sound rate of 50% at 16 votes, with no degenerate answer
where the base model has none, no lost on-topic rate, and the other channel of the
isolation check exactly as it was.
"""

import argparse
import json

import pytest

from gesal_core import evaluation

pytestmark = pytest.mark.slow


def test_the_opener_community_is_learnt_within_16_votes(tmp_path):
    parser = argparse.ArgumentParser()
    evaluation.add_arguments(parser)
    args = parser.parse_args(
        ["--task", "opener", "--methods", "gesal", "--seeds", "0", "--budget", "16"]
        + ["--checkpoints", "0,16", "--heldout", "8", "--corrections", "16"]
        + ["--out", str(tmp_path)]
    )
    assert evaluation.run(args) == 0
    (run,) = json.loads((tmp_path / "eval-opener.json").read_text())["runs"]
    base, learnt = run["checkpoints"]
    print("base:", base["samples"][:2], "\n16 votes:", learnt["samples"][:2])
    assert base["compliance"] <= 0.05  # the base model's starting point: at most 5%
    assert learnt["sound"] >= 0.5, learnt["samples"]
    assert learnt["degenerate"] <= base["degenerate"]
    assert learnt["on_topic"] >= base["on_topic"] - 0.1
    assert run["updates"] >= 1 and run["corrections"] >= 1
    assert base["isolation"] == learnt["isolation"] == 0.0
