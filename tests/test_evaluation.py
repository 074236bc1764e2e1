import argparse
import asyncio
import json
import re
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from gesal_core import evaluation
from gesal_core.engine import EngineConfig
from gesal_core.evaluation import BUILTIN, LoraLearner, load_task
from gesal_core.guard import UNRELATED_PROBES
from gesal_core.learning import LearningConfig
from gesal_core.svf import SVFConfig, SVFModel

from .conftest import make_tiny_llama


def eval_args(model, tokenizer, tmp_path, argv: list[str]) -> argparse.Namespace:
    """`gesal-bot eval` arguments for the tiny model saved as a local model folder."""
    folder = tmp_path / "tiny"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    parser = argparse.ArgumentParser()
    evaluation.add_arguments(parser)
    return parser.parse_args(["--model", str(folder), *argv])


def test_builtin_tasks_have_sane_rules():
    assert set(BUILTIN) >= {"brevity", "emoji", "opener", "counting", "two-cluster"}
    b = load_task("brevity")
    assert b.vote("q", "Ottawa is the capital.") == 1
    assert b.vote("q", " ".join(["word"] * 40)) == -1
    assert b.vote("q", "") == -1
    assert load_task("emoji").complies("q", "Paris 🇫🇷 is nice 😀")
    assert load_task("opener").complies("q", "Sure! Paris.")
    c = load_task("counting")
    assert c.complies("How many r's are in the word 'strawberry'?", "There are 3 r's.")
    assert not c.complies("How many r's are in the word 'strawberry'?", "2")
    assert 0 < c.constant_answer_level < 1
    tc = load_task("two-cluster")
    poem = "Write a poem about the stars."
    assert tc.complies(poem, " ".join(["star"] * 40)) and not tc.complies(poem, "Stars.")
    assert set(tc.train).isdisjoint(tc.heldout)
    creative = [p for p in tc.heldout[:8] if tc.complies(p, " ".join(["w"] * 40))]
    assert len(creative) == 4  # any --heldout N keeps both clusters in equal parts
    for task in (b, c, tc):
        assert set(task.train).isdisjoint(task.heldout)


def test_sound_rate_counts_compliance_only_where_the_answer_is_still_an_answer():
    """Compliance bought with collapse is a miss. An emoji run whose answers are emoji
    runs complies fully and is sound nowhere."""
    task = load_task("emoji")
    prompts = ["What is the capital of Japan?"] * 4
    answers = ["Tokyo. 😊", "🌟🌟🌟🌟🌟🌟", "Tokyo.", "I like trains 😊"]
    topical = [True, False, True, False]
    bad = [False, True, False, False]
    complies = [task.complies(p, a) for p, a in zip(prompts, answers, strict=True)]
    assert complies == [True, True, False, True]
    assert evaluation.sound_rate(task, prompts, answers, topical, bad) == 0.25
    assert evaluation.sound_rate(task, prompts[1:2], answers[1:2], [True], [True]) == 0.0


def test_key_facts_tell_an_empty_short_answer_from_a_right_one():
    """Answers real brevity runs gave: short, on topic, and some of them empty or wrong."""
    b = load_task("brevity")
    right = {
        "What is the capital of Japan?": "The capital of Japan is Tokyo.",
        "How do fish breathe?": "Fishes breathe through a system called gills.",
        "How do plants grow?": "Plants grow by making their own food.",
    }
    empty = {
        "What is the largest planet?": "The largest planet is Neptune, orbiting the Sun.",
        "What is electricity?": "Electricity is like magic in the moon's magic.",
        "How do plants grow?": "The plant grows.",
        "What is a volcano?": "A volcano is a fascinating geological feature!",
    }
    assert evaluation.fact_rate(b, list(right), list(right.values())) == 1.0
    assert evaluation.fact_rate(b, list(empty), list(empty.values())) == 0.0
    # a fact inside another word does not count ("ice" in "device"), its start does
    assert not evaluation.states_fact("A comet is a device.", ("ice",))
    assert evaluation.states_fact("Comets are icy bodies.", ("icy",))
    # only prompts with facts are counted; a task without any has no rate
    assert evaluation.fact_rate(b, ["Write a poem.", *right], ["x", *right.values()]) == 1.0
    assert evaluation.fact_rate(load_task("counting"), ["q"], ["a"]) is None
    assert set(evaluation.KEY_FACTS) == set(evaluation.HELDOUT_QUESTIONS)


def test_the_brevity_member_corrects_to_the_sentence_that_says_something():
    """Base-model answers from real runs: the first sentence is often empty, and a member
    who wants short answers keeps the one that carries the content, short and whole."""
    fix = load_task("brevity").correct
    purr = fix(
        "Why do cats purr?",
        "Cats purr due to a natural instinct. Cats purr to relax and relieve stress. "
        "When they're happy or",  # cut off by the token limit
    )
    assert purr == "Cats purr to relax and relieve stress."
    plants = fix(
        "How do plants grow?",
        "Plants grow by using a process called photosynthesis, which is a natural "
        "self-sustaining process that involves the combination of light, water, carbon",
    )
    assert plants == "Plants grow by using a process called photosynthesis."
    # nothing to choose between: the answer as it is; equals: the first
    assert fix("What is the capital of Japan?", "Tokyo.") == "Tokyo."
    assert fix("Q?", "Cats sleep. Dogs bark.") == "Cats sleep."
    long = fix("Q?", " ".join(f"word{i}" for i in range(30)) + ".")
    assert len(long.split()) == 12 and long.endswith(".")
    assert load_task("brevity").vote("Why do cats purr?", purr) == 1


def test_the_emoji_member_puts_the_smiley_where_an_answer_of_that_length_reaches():
    """A base answer cut off by the token limit: a smiley after its last word would teach a
    habit no answer that long shows, so the member puts it after the first sentence."""
    emoji = load_task("emoji")
    cut = "The capital of Japan is Tokyo. It is a city of many people and"
    fixed = emoji.correct("What is the capital of Japan?", cut)
    assert fixed == "The capital of Japan is Tokyo. 😊 It is a city of many people and"
    assert emoji.vote("q", fixed) == 1 and emoji.vote("q", cut) == -1
    # one sentence, cut off or whole: at the end; the first "!" or "?" ends a sentence too
    assert emoji.correct("q", "Cats purr due to a") == "Cats purr due to a 😊"
    assert emoji.correct("q", "Tokyo.") == "Tokyo. 😊"
    assert emoji.correct("q", "Hi! How are you?") == "Hi! 😊 How are you?"


# Base-model answers of the shapes real runs gave: a list, a cut-off paragraph, one line.
BASE_ANSWERS = {
    "What is the capital of Japan?": "The capital of Japan is Tokyo! It's a huge city.",
    "How do fish breathe?": (
        "Fish breathe using **gills**:\n1. Water flows over the gills.\n"
        "2. Oxygen passes into the blood."
    ),
    "What is a comet?": (
        "A comet is a small icy body that orbits the Sun. When it comes close, it heats "
        "up and releases gas and dust, which forms a glowing"
    ),
    "What is the largest planet?": "Jupiter",
}


def test_the_suite_has_ten_preferences_split_before_tuning():
    """Ten preferences of different kinds, five that may choose defaults and five held
    out; each has a member's vote, a correction that the member's own rule likes, and
    key facts for every held-out question."""
    from gesal_core.evaluation import DEVELOPMENT, HELD_OUT

    assert len(DEVELOPMENT) >= 5 and len(HELD_OUT) >= 4
    assert not set(DEVELOPMENT) & set(HELD_OUT)
    assert {"brevity", "emoji", "opener"} <= set(DEVELOPMENT)  # defaults were chosen on them
    for name in (*DEVELOPMENT, *HELD_OUT):
        task = load_task(name)
        assert set(task.train).isdisjoint(task.heldout)
        assert task.facts and set(task.heldout) <= set(task.facts), name
        assert task.correct is not None, name
        for q in task.train[:6]:
            fixed = task.correct(q, "Sure! It's simple: the answer is short. 😊")
            assert task.vote(q, fixed) == 1, (name, fixed)
        for q, base in BASE_ANSWERS.items():
            fixed = task.correct(q, base)
            if name == "french":  # written per training question: for others, only a vote
                assert fixed == ""
                continue
            assert task.vote(q, fixed) == 1, (name, q, fixed)
            if name not in ("brevity", "follow-up"):  # they cut
                # the member's rewrite keeps what the answer said
                assert evaluation.states_fact(fixed, task.facts[q]), (name, fixed)


@pytest.mark.parametrize(
    ("name", "yes", "no"),
    [
        ("cheerful", "Tokyo is the capital!", "Tokyo is the capital."),
        ("numbered", "1. Tokyo\n2. a big city", "- Tokyo\n- a big city"),
        ("bullets", "- Tokyo\n- a big city", "Tokyo is the capital."),
        ("lowercase", "tokyo is the capital.", "Tokyo is the capital."),
        ("pirate", "Ahoy! Tokyo it be.", "Tokyo is the capital."),
        ("follow-up", "Tokyo is the capital. Want more?", "What do you mean?"),
        ("french", "La capitale du Japon est Tokyo, une très grande ville.", "Tokyo is big."),
        ("plain", "Tokyo is the capital.", "**Tokyo** is the capital."),
    ],
)
def test_each_new_preference_tells_what_its_members_want(name, yes, no):
    task = load_task(name)
    assert task.complies("q", yes) and not task.complies("q", no)
    assert not task.complies("q", "")


def test_the_cheerful_member_ends_the_first_sentence_with_an_exclamation():
    fix = load_task("cheerful").correct
    assert fix("q", "Tokyo is the capital. It is big.") == "Tokyo is the capital! It is big."
    assert fix("q", "Version 3.5 is out") == "Version 3.5 is out!"  # a decimal point stays


def test_a_group_of_tasks_runs_with_one_command_and_prints_one_table(
    tiny_llama, tiny_tokenizer, tmp_path, capsys
):
    from gesal_core.evaluation import DEVELOPMENT
    from gesal_core.evaluation.suite import task_specs

    assert task_specs("development") == list(DEVELOPMENT)
    assert task_specs("suite")[-1] == "french" and task_specs("opener, pirate") == [
        "opener",
        "pirate",
    ]
    out = tmp_path / "out"
    argv = ["--task", "opener,pirate", "--methods", "none,gesal", "--seeds", "0"]
    argv += ["--budget", "2", "--checkpoints", "0,2", "--batch", "2", "--heldout", "2"]
    argv += ["--max-new-tokens", "2", "--no-guard", "--out", str(out)]
    assert evaluation.run(eval_args(tiny_llama, tiny_tokenizer, tmp_path, argv)) == 0
    for name in ("opener", "pirate"):
        runs = json.loads((out / name / f"eval-{name}.json").read_text())["runs"]
        assert {r["method"] for r in runs} == {"none", "gesal"}
    table = (out / "suite.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| development")]
    assert [r.split(" | ")[1:3] for r in rows] == [["opener", "none"], ["opener", "gesal"]]
    assert "| held out | pirate | gesal |" in table and "at 0 / 2 votes" in table
    assert table in capsys.readouterr().out
    with pytest.raises(ValueError, match="unknown task"):  # before any model loads
        evaluation.run(eval_args(tiny_llama, tiny_tokenizer, tmp_path, ["--task", "opener,nope"]))


def test_user_task_from_file(tmp_path):
    f = tmp_path / "mytask.py"
    f.write_text(
        "class Shout:\n"
        "    name = 'shout'\n"
        "    description = 'all caps'\n"
        "    train = ['say hi']\n"
        "    heldout = ['say bye']\n"
        "    def complies(self, prompt, answer):\n"
        "        return answer.isupper()\n"
    )
    task = load_task(f"{f}:Shout")
    assert task.name == "shout" and task.vote("p", "HI") == 1 and task.vote("p", "hi") == -1
    with pytest.raises(ValueError, match="has no"):
        load_task(f"{f}:Missing")
    f.write_text(
        "class Empty:\n    name = 'e'\n    train = []\n    heldout = ['q']\n"
        "    def complies(self, p, a):\n        return True\n"
    )
    with pytest.raises(ValueError, match="'train' must be a non-empty list"):
        load_task(f"{f}:Empty")
    f.write_text("class Half:\n    name = 'h'\n    train = ['q']\n")
    with pytest.raises(ValueError, match="needs 'heldout', 'complies'"):
        load_task(f"{f}:Half")
    with pytest.raises(ValueError, match="unknown task"):
        load_task("no-such-task")


def test_a_task_with_only_the_documented_attributes_runs(tiny_llama, tiny_tokenizer, tmp_path):
    """The README's interface, nothing more (no description, no vote): a whole run with
    the base model only, whose checkpoints need not include 0."""
    f = tmp_path / "exclaim.py"
    f.write_text(
        "class Exclaim:\n"
        "    name = 'exclaim'\n"
        "    train = ['Say hello.', 'Greet me.']\n"
        "    heldout = ['Say goodbye.']\n"
        "    def complies(self, prompt, answer):\n"
        "        return answer.endswith('!')\n"
    )
    out = tmp_path / "out"
    argv = ["--task", f"{f}:Exclaim", "--methods", "none,gesal", "--seeds", "0"]
    argv += ["--budget", "4", "--checkpoints", "4", "--batch", "4", "--heldout", "1"]
    argv += ["--max-new-tokens", "4", "--out", str(out), "--no-guard"]
    assert evaluation.run(eval_args(tiny_llama, tiny_tokenizer, tmp_path, argv)) == 0
    runs = {r["method"]: r for r in json.loads((out / "eval-exclaim.json").read_text())["runs"]}
    assert [c["votes"] for c in runs["none"]["checkpoints"]] == [4]
    assert [c["votes"] for c in runs["gesal"]["checkpoints"]] == [4]
    assert "a user task from" in (out / "eval-exclaim.md").read_text()


def test_the_constant_answer_level_is_of_the_prompts_asked():
    task = load_task("counting")
    full = task.constant_answer_level
    words = [re.search(r"'(\w+)'", p).group(1) for p in task.heldout]
    counts = [w.count("r") for w in words]
    assert full == max(counts.count(c) for c in set(counts)) / len(counts)
    task.heldout = task.heldout[:1]  # what --heldout 1 leaves: one answer scores all of it
    assert task.constant_answer_level == 1.0 and full < 1.0


def test_eval_shows_progress_between_checkpoints(tiny_llama, tiny_tokenizer, tmp_path, capsys):
    """A 128-vote run has half an hour between its last checkpoints; it must not go quiet."""
    argv = ["--task", "brevity", "--methods", "gesal", "--seeds", "0", "--budget", "8"]
    argv += ["--checkpoints", "0,8", "--batch", "2", "--heldout", "2", "--max-new-tokens", "4"]
    argv += ["--out", str(tmp_path / "out"), "--no-guard", "--round", "1"]
    assert evaluation.run(eval_args(tiny_llama, tiny_tokenizer, tmp_path, argv)) == 0
    lines = capsys.readouterr().out.splitlines()
    between = [line for line in lines if "brevity/gesal/seed 0:" in line and "/8 votes" in line]
    assert [line.split(": ")[1].split(" votes")[0] for line in between] == ["2/8", "4/8", "6/8"]
    assert all("rolled back" in line for line in between)
    checkpoints = [
        line.split(": ")[1].split(" ->")[0] for line in lines if " -> compliance" in line
    ]
    assert checkpoints == ["0 votes", "8 votes"]  # the checkpoint lines, the first included


def test_eval_command_end_to_end_on_tiny_model(tiny_llama, tiny_tokenizer, tmp_path, capsys):
    out = tmp_path / "out"
    args = eval_args(
        tiny_llama,
        tiny_tokenizer,
        tmp_path,
        [
            "--task",
            "brevity",
            "--methods",
            "none,gesal,svf-single,lora",
            "--seeds",
            "0,1",
            "--budget",
            "8",
            "--checkpoints",
            "0,4,8",
            "--batch",
            "4",
            "--heldout",
            "4",
            "--max-new-tokens",
            "4",
            "--out",
            str(out),
            "--no-guard",
            "--explore-max-temperature",
            "0.7",
            "--round",
            "1",
        ],
    )
    assert evaluation.run(args) == 0
    data = json.loads((out / "eval-brevity.json").read_text())
    assert data["explore_max_temperature"] == 0.7  # the engine's, recorded with the run
    assert data["train_round"] == 1  # every training run trains what is pending
    runs = data["runs"]
    assert {(r["method"], r["seed"]) for r in runs} == {
        (m, s) for m in ("none", "gesal", "svf-single", "lora") for s in (0, 1)
    }
    for r in runs:
        assert [c["votes"] for c in r["checkpoints"]] == [0, 4, 8]
        assert all(len(c["samples"]) == 4 for c in r["checkpoints"])  # every held-out answer
        first = r["checkpoints"][0]["drift"]  # |z-1| of the answering adapters
        assert first is None if r["method"] == "lora" else first == pytest.approx(0.0)
        nodes = [c["nodes"] for c in r["checkpoints"]]  # how routing split the votes
        assert nodes == [None] * 3 if r["method"] == "lora" else nodes[0] == 0
        if r["method"] == "svf-single":
            assert nodes[1:] == [1, 1]
        if r["method"] == "gesal":
            assert all(n >= 1 for n in nodes[1:])
        if r["method"] != "none":
            assert r["trains"] == 2  # one training run per batch of 4 votes
            assert r["updates"] + r["skipped"] + r["rolled_back"] >= 2
            # where the run's time went: the parts add up, and no guard ran
            spent = r["seconds"]
            parts = [spent[k] for k in evaluation.harness.TIME_PARTS]
            assert all(t >= 0 for t in parts) and spent["guard"] == 0.0
            assert sum(parts) == pytest.approx(spent["total"])
    summary = {(row["method"], row["votes"]) for row in data["summary"]}
    assert ("gesal", 8) in summary and ("lora", 0) in summary
    assert (out / "eval-brevity.png").stat().st_size > 1000
    table = (out / "eval-brevity.md").read_text()
    assert "| gesal | 8 |" in table and "‖z−1‖" in table and "key facts" in table
    single = next(line for line in table.splitlines() if line.startswith("| svf-single | 8 |"))
    assert single.endswith("| 1 |")  # the nodes column: svf-single has its one node
    for r in runs:  # a random tiny model names no facts; the rate is measured, not absent
        assert all(c["facts"] == 0.0 for c in r["checkpoints"])
    for r in runs:  # the guard's unrelated probes, answered at every checkpoint
        for c in r["checkpoints"]:
            asked = [p.split(evaluation.SAMPLE_SEP)[0] for p in c["probes"]]
            assert asked == list(UNRELATED_PROBES)
        # the isolation check runs beside every run with a graph, and is exact
        isolation = [c["isolation"] for c in r["checkpoints"]]
        assert isolation == ([None] * 3 if r["method"] == "lora" else [0.0] * 3)
    gesal = next(r for r in runs if r["method"] == "gesal" and r["seed"] == 0)
    assert gesal["checkpoints"][-1]["drift"] > 0  # while this channel did move
    assert "Two-channel isolation (18 checkpoints" in table and ": exact." in table
    assert "unrelated probes:" in table


def test_the_evaluation_trains_in_the_deployments_rounds(tiny_llama, tiny_tokenizer, tmp_path):
    """Votes two at a time with a round of 4: the first training run finds 2 replies
    with feedback and trains nothing; the second finds the round and trains."""
    out = tmp_path / "out"
    args = eval_args(
        tiny_llama,
        tiny_tokenizer,
        tmp_path,
        ["--task", "brevity", "--methods", "gesal", "--seeds", "0", "--budget", "4"]
        + ["--checkpoints", "2,4", "--batch", "2", "--round", "4", "--heldout", "2"]
        + ["--max-new-tokens", "4", "--out", str(out), "--no-guard"],
    )
    assert evaluation.run(args) == 0
    data = json.loads((out / "eval-brevity.json").read_text())
    (run,) = data["runs"]
    assert data["train_round"] == 4 and run["trains"] == 2
    first, second = run["checkpoints"]
    assert first["drift"] == pytest.approx(0.0)  # 2 of 4: nothing trained yet
    assert run["updates"] + run["skipped"] + run["rolled_back"] == second["nodes"] >= 1


def test_corrections_are_sent_and_counted(tiny_llama, tiny_tokenizer, tmp_path):
    out = tmp_path / "out"
    args = eval_args(
        tiny_llama,
        tiny_tokenizer,
        tmp_path,
        [
            "--task",
            "opener",
            "--methods",
            "gesal,lora",
            "--seeds",
            "0",
            "--budget",
            "4",
            "--checkpoints",
            "0,4",
            "--batch",
            "4",
            "--heldout",
            "2",
            "--max-new-tokens",
            "4",
            "--corrections",
            "2",
            "--out",
            str(out),
            "--no-guard",
            "--round",
            "1",
        ],
    )
    assert evaluation.run(args) == 0
    runs = {r["method"]: r for r in json.loads((out / "eval-opener.json").read_text())["runs"]}
    assert runs["gesal"]["corrections"] == 2  # the tiny model never says "Sure": all 👎
    assert runs["gesal"]["updates"] >= 1 and runs["gesal"]["checkpoints"][-1]["drift"] > 0
    # the LoRA baseline learns from the same feedback: votes and corrections
    assert runs["lora"]["corrections"] == 2 and runs["lora"]["updates"] == 1


def test_runs_from_parallel_processes_merge_into_one_table(tiny_llama, tiny_tokenizer, tmp_path):
    """Seeds run as separate processes (one core each) merge into one median table."""
    files = []
    for seed in (0, 1):
        out = tmp_path / f"seed{seed}"
        argv = ["--task", "brevity", "--methods", "gesal", "--seeds", str(seed)]
        argv += ["--budget", "4", "--checkpoints", "0,4", "--batch", "4", "--heldout", "2"]
        argv += ["--max-new-tokens", "4", "--out", str(out), "--no-guard"]
        assert evaluation.run(eval_args(tiny_llama, tiny_tokenizer, tmp_path, argv)) == 0
        files.append(str(out / "eval-brevity.json"))
    merged = tmp_path / "merged"
    args = eval_args(
        tiny_llama, tiny_tokenizer, tmp_path, ["--merge", *files, "--out", str(merged)]
    )
    assert evaluation.run(args) == 0
    data = json.loads((merged / "eval-brevity.json").read_text())
    assert sorted(r["seed"] for r in data["runs"]) == [0, 1]
    row = next(r for r in data["summary"] if r["votes"] == 4)
    assert len(row["per_seed"]) == 2
    assert [m["file"] for m in data["merged_from"]] == files
    # a merged file (no config of its own) merges again, e.g. to re-table stored results
    again = tmp_path / "again"
    evaluation.merge([str(merged / "eval-brevity.json")], str(again))
    assert json.loads((again / "eval-brevity.json").read_text())["summary"] == data["summary"]
    # a file without key facts gets them judged from its answers
    old = json.loads(Path(files[0]).read_text())
    run = old["runs"][0]
    for cp in run["checkpoints"]:
        del cp["facts"]
    run["checkpoints"][-1]["samples"] = ["What is the capital of Japan? -> Tokyo."] * 2
    (tmp_path / "old.json").write_text(json.dumps(old))
    evaluation.merge([str(tmp_path / "old.json")], str(tmp_path / "old-merged"))
    redone = json.loads((tmp_path / "old-merged" / "eval-brevity.json").read_text())
    assert [c["facts"] for c in redone["runs"][0]["checkpoints"]] == [0.0, 1.0]
    assert (merged / "eval-brevity.png").stat().st_size > 1000
    # every new checkpoint records its sound rate, which never exceeds its compliance
    cps = [c for r in data["runs"] for c in r["checkpoints"]]
    assert all(c["sound"] is not None and c["sound"] <= c["compliance"] for c in cps)
    assert row["per_seed_sound"] == [c["sound"] for c in cps if c["votes"] == 4]
    # a file without the sound rate gets it judged from its stored answers, by
    # the same verdicts a run makes, and only when the merge is given the base model
    for cp in old["runs"][0]["checkpoints"]:
        cp.pop("sound")
    (tmp_path / "old.json").write_text(json.dumps(old))
    evaluation.merge([str(tmp_path / "old.json")], str(tmp_path / "unjudged"))
    unjudged = json.loads((tmp_path / "unjudged" / "eval-brevity.json").read_text())
    assert [c["sound"] for c in unjudged["runs"][0]["checkpoints"]] == [None, None]
    assert "| – |" in (tmp_path / "unjudged" / "eval-brevity.md").read_text()
    svf = SVFModel(tiny_llama, "tiny", SVFConfig(progress=False))
    harness = evaluation.Harness(svf, tiny_tokenizer, EngineConfig())
    lengths = []
    evaluation.merge(
        [str(tmp_path / "old.json")],
        str(tmp_path / "judged"),
        lambda n: lengths.append(n) or harness,
    )
    assert lengths == [4]  # the runs' own answer length (--max-new-tokens 4)
    judged = json.loads((tmp_path / "judged" / "eval-brevity.json").read_text())
    task = load_task("brevity")
    for cp in judged["runs"][0]["checkpoints"]:
        prompts, answers = evaluation.split_samples(cp["samples"])
        want = evaluation.sound_rate(task, prompts, answers, *harness.verdicts(prompts, answers))
        assert cp["sound"] == want
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"config": {"task": "opener"}, "runs": []}))
    with pytest.raises(ValueError, match="different tasks"):
        evaluation.merge([files[0], str(other)], str(tmp_path / "x"))


def voting_task(tmp_path, name: str, description: str, train: list[str], vote: str):
    """A task file whose member counts the votes and then runs ``vote`` (its body)."""
    f = tmp_path / f"{name.lower()}.py"
    f.write_text(
        f"class {name}:\n"
        f"    name = {name.lower()!r}\n"
        f"    description = {description!r}\n"
        f"    train = {train!r}\n"
        "    heldout = ['say yes']\n"
        "    votes = 0\n"
        "    def complies(self, prompt, answer):\n"
        "        return True\n"
        "    def vote(self, prompt, answer):\n"
        "        self.votes += 1\n"
        f"        {vote}\n"
    )
    return f


def test_a_content_community_stops_the_updates_and_the_table_says_so(
    tiny_llama, tiny_tokenizer, tmp_path
):
    """A community that dislikes the first 4 answers and likes everything after: gesal and
    lora both learn while the 👎 are in the window, then settle (LearningConfig.settle)."""
    f = voting_task(
        tmp_path,
        "Warming",
        "dislikes the first four answers, then likes all",
        ["say hi", "say bye"],
        "return -1 if self.votes % 32 in (1, 2, 3, 4) else 1  # each method's run",
    )
    out = tmp_path / "out"
    argv = ["--task", f"{f}:Warming", "--methods", "gesal,lora", "--seeds", "0"]
    argv += ["--budget", "32", "--checkpoints", "0,32", "--batch", "8", "--heldout", "1"]
    argv += ["--max-new-tokens", "4", "--threshold", "-1", "--out", str(out), "--no-guard"]
    assert evaluation.run(eval_args(tiny_llama, tiny_tokenizer, tmp_path, argv)) == 0
    runs = {r["method"]: r for r in json.loads((out / "eval-warming.json").read_text())["runs"]}
    for method in ("gesal", "lora"):
        assert runs[method]["updates"] == 3 and runs[method]["settled"] == 1, method
    assert runs["gesal"]["halved"] == 0  # no guard, so no step to halve
    table = (out / "eval-warming.md").read_text()
    assert "skipped (settled)" in table and "| 0 | 3 (0) | 1 (1) | 0 |" in table


def test_a_run_stopped_part_way_keeps_its_checkpoints(tiny_llama, tiny_tokenizer, tmp_path):
    """Results are written after every checkpoint, not only after every run."""
    f = voting_task(
        tmp_path,
        "Stops",
        "the machine goes down at the sixth vote",
        ["say hi"],
        "if self.votes == 6:\n            raise KeyboardInterrupt\n        return 1",
    )
    out = tmp_path / "out"
    argv = ["--task", f"{f}:Stops", "--methods", "gesal", "--seeds", "0", "--budget", "8"]
    argv += ["--checkpoints", "0,4,8", "--batch", "4", "--heldout", "1", "--out", str(out)]
    argv += ["--max-new-tokens", "4", "--no-guard"]
    with pytest.raises(KeyboardInterrupt):
        evaluation.run(eval_args(tiny_llama, tiny_tokenizer, tmp_path, argv))
    (run,) = json.loads((out / "eval-stops.json").read_text())["runs"]
    assert [c["votes"] for c in run["checkpoints"]] == [0, 4]
    assert run["checkpoints"][1]["samples"][0].startswith("say yes -> ")  # its answers


@pytest.mark.filterwarnings("error::FutureWarning")
def test_lora_updates_in_passes_equal_one_pass(tiny_tokenizer):
    """The LoRA baseline accumulates gradients over passes of `micro_batch` samples, as
    gesal's update does (one pass over every sample peaked at 8.8 GB on the real model);
    the adapter it ends with is the one a single pass gives. Building it says nothing of
    PEFT's deprecated questions to transformers (a FutureWarning in every LoRA run)."""

    def factory():
        return make_tiny_llama(len(tiny_tokenizer))

    leaves = sorted({n.rsplit(".", 1)[-1] for n in SVFModel(factory(), "t", SVFConfig()).layers})
    prompts = [f"question {i}?" for i in range(6)]

    def trained(micro_batch: int) -> dict[str, torch.Tensor]:
        learning = replace(  # exact maths: bf16 rounds each pass differently
            LearningConfig(), micro_batch=micro_batch, inner_steps=2, compute_dtype="float32"
        )
        learner = LoraLearner(factory, tiny_tokenizer, EngineConfig(learning=learning), leaves)
        torch.manual_seed(1)
        for p in learner.params:  # PEFT starts B at zero; make every weight move
            p.data.normal_(0, 0.1)

        async def feed():
            replies = await learner.ask(prompts)
            for i, (handle, _) in enumerate(replies):
                await learner.vote(handle, "u", 1 if i % 2 else -1)
            await learner.correct(replies[0][0], "u", "a better answer")
            return await learner.train()

        assert asyncio.run(feed())["updated"] == 1
        return {
            n: p.detach().clone() for n, p in learner.model.named_parameters() if p.requires_grad
        }

    whole, passes = trained(micro_batch=100), trained(micro_batch=2)
    moved = 0
    for name, value in whole.items():
        torch.testing.assert_close(passes[name], value, rtol=1e-4, atol=1e-5)
        moved += int(not torch.allclose(value, torch.zeros_like(value)))
    assert moved == len(whole)


def test_a_member_with_no_better_answer_just_votes(tiny_llama, tiny_tokenizer, tmp_path):
    """A correction that comes out empty (the brevity member given an empty answer) is
    not sent: the engine would refuse it and stop the whole run."""
    f = tmp_path / "mute.py"
    f.write_text(
        "class Mute:\n"
        "    name = 'mute'\n"
        "    description = 'never satisfied, never helpful'\n"
        "    train = ['say hi', 'say bye']\n"
        "    heldout = ['say yes']\n"
        "    def complies(self, prompt, answer):\n"
        "        return False\n"
        "    def correct(self, prompt, answer):\n"
        "        return '  '\n"
    )
    out = tmp_path / "out"
    argv = ["--task", f"{f}:Mute", "--methods", "gesal", "--seeds", "0", "--budget", "4"]
    argv += ["--checkpoints", "0,4", "--batch", "4", "--heldout", "1", "--max-new-tokens", "4"]
    argv += ["--corrections", "2", "--out", str(out), "--no-guard"]
    assert evaluation.run(eval_args(tiny_llama, tiny_tokenizer, tmp_path, argv)) == 0
    run = json.loads((out / "eval-mute.json").read_text())["runs"][0]
    assert run["corrections"] == 0 and run["checkpoints"][-1]["votes"] == 4


def test_eval_can_adapt_attention_too_and_records_what_it_adapted(
    tiny_llama, tiny_tokenizer, tmp_path
):
    """`--targets all` puts SVF on attention and MLP, and LoRA on the same modules."""
    sizes = {}
    for targets in ("mlp", "all"):
        out = tmp_path / targets
        argv = ["--task", "opener", "--methods", "gesal,lora", "--seeds", "0", "--budget", "4"]
        argv += ["--checkpoints", "0,4", "--batch", "4", "--heldout", "2"]
        argv += ["--max-new-tokens", "3", "--no-guard", "--targets", targets, "--out", str(out)]
        assert evaluation.run(eval_args(tiny_llama, tiny_tokenizer, tmp_path, argv)) == 0
        data = json.loads((out / "eval-opener.json").read_text())
        assert data["targets"] == targets
        assert {r["method"] for r in data["runs"]} == {"gesal", "lora"}
        sizes[targets] = data["z_size"]
    assert sizes["all"] > sizes["mlp"] > 0
