"""Prompt embeddings for routing: the base model's mean hidden state, centred.

A causal LM's mean hidden states share one large common direction, so raw cosine
similarities of unrelated prompts all sit in a narrow band (~0.8–0.9) and facts and
creative requests look alike. Subtracting the mean embedding of a fixed set of generic
reference prompts removes that direction; `bench.embedding_choice` measures the effect
(topic accuracy and routing purity; docs/learning.md, "Routing embedding"). The
reference set is part of the embedding's definition: changing it changes every stored
node embedding.
"""

from __future__ import annotations

import numpy as np
import torch

from .generate import embed
from .svf import SVFModel

REFERENCE_PROMPTS = (
    "Hello!", "What time is it?", "Can you help me with my homework?", "Tell me a joke.",
    "Translate 'good morning' into Spanish.", "What is 12 plus 7?", "Recommend a good book.",
    "How are you today?", "Summarize the news.", "What should I eat for dinner?",
    "Explain how a car engine works.", "Write a limerick.", "What's the weather like on Mars?",
    "Give me a workout plan.", "Who painted the Mona Lisa?", "How do I fix a flat tire?",
    "What is love?", "Plan a trip to Italy.", "Describe your favorite color.",
    "Why do dogs bark?",
)  # fmt: skip


class PromptEmbedder:
    """Unit-norm, centred prompt embeddings under the base model (z = 1).

    Must be called on the model's worker thread (it runs the model).
    """

    def __init__(self, svf: SVFModel, tokenizer, centre: bool = True) -> None:
        self.svf, self.tokenizer, self.centre = svf, tokenizer, centre
        self._mean: torch.Tensor | None = None

    def _raw(self, texts: list[str]) -> torch.Tensor:
        with self.svf.factored(self.svf.ones()):  # never the node's z: routing must not drift
            return embed(self.svf.model, self.tokenizer, texts)

    def __call__(self, texts: list[str]) -> np.ndarray:
        e = self._raw(list(texts))
        if self.centre:
            if self._mean is None:
                self._mean = self._raw(list(REFERENCE_PROMPTS)).mean(0)
            e = torch.nn.functional.normalize(e - self._mean, dim=-1)
        return e.numpy().astype(np.float32)
