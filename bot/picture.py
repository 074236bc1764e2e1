"""A PNG picture of a channel's graph memory, for `/gesal export` and the playground.

Nodes are placed by a 2-D PCA of their prompt embeddings (so nearby prompt clusters
look nearby), sized by how many prompts they hold and coloured by their mean reward;
kNN edges are drawn as lines. Input is the engine's export dict, so the picture is
exactly what the JSON file holds.
"""

from __future__ import annotations

import io

import numpy as np

from gesal_core.records import vec_from_b64


def _layout(embeddings: np.ndarray) -> np.ndarray:
    n = len(embeddings)
    if n == 1:
        return np.zeros((1, 2))
    centred = embeddings - embeddings.mean(axis=0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    pos = centred @ vt[:2].T
    if pos.shape[1] == 1:
        pos = np.hstack([pos, np.zeros((n, 1))])
    return pos


def render_graph_png(export: dict, title: str | None = None) -> bytes:
    """PNG bytes of the graph in ``export`` (an `Engine.export` dict). Blocking: run it
    in a thread (`asyncio.to_thread`) from async code."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    nodes = export.get("nodes", [])
    fig = Figure(figsize=(6, 4.5), dpi=100)
    ax = fig.add_subplot()
    ax.set_title(title or f"{export.get('channel', 'channel')}: {len(nodes)} nodes", fontsize=10)
    ax.set_xticks([])
    ax.set_yticks([])
    if not nodes:
        ax.text(0.5, 0.5, "no nodes yet: mention the bot to start", ha="center", va="center")
    else:
        emb = np.stack([vec_from_b64(n["embedding"]) for n in nodes]).astype(np.float64)
        pos = _layout(emb)
        index = {n["node_id"]: i for i, n in enumerate(nodes)}
        for i, n in enumerate(nodes):
            for other, _ in n.get("neighbors", []):
                j = index.get(other)
                if j is not None and j > i:
                    ax.plot(*zip(pos[i], pos[j], strict=True), color="0.75", lw=0.8, zorder=1)
        rewards = [n["reward_sum"] / n["rated"] if n.get("rated") else 0.0 for n in nodes]
        sizes = [60 + 25 * min(n.get("count", 0), 40) for n in nodes]
        sc = ax.scatter(
            pos[:, 0], pos[:, 1], s=sizes, c=rewards, cmap="RdYlGn", vmin=-2, vmax=1, zorder=2
        )
        for i, n in enumerate(nodes):
            ax.annotate(
                f"{n['node_id'][:6]} v{n.get('version', 0)}",
                pos[i],
                fontsize=7,
                ha="center",
                va="bottom",
                xytext=(0, 8),
                textcoords="offset points",
            )
        fig.colorbar(sc, ax=ax, label="mean reward")
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


__all__ = ["render_graph_png"]
