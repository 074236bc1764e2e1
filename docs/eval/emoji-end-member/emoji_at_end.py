"""The emoji task with the member of the runs before 2026-12-02, who corrects an answer by
putting a smiley after its last word, for a side-by-side run against today's member:

    gesal-bot eval --task docs/eval/emoji-end-member/emoji_at_end.py:emoji_at_end ...
"""

from dataclasses import replace

from gesal_core.evaluation import Task, emoji


def emoji_at_end() -> Task:
    return replace(emoji(), correct=lambda p, a: f"{a.rstrip()} 😊")
