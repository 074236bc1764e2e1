"""More simulated communities, each wanting one kind of preference the first three
(brevity, emoji, opener) do not cover: tone, list formats, letter case, a persona, how
an answer ends, and the language it is in.

Each is a member as a rule: ``complies`` is what they like (their vote is +1 if it
complies, else -1), ``correct`` the better answer they write under the bot's answer
(from the bot's own answer, so a correction keeps its content), and the key facts of
every held-out question come from `tasks.KEY_FACTS` (the French community's in French).
`suite` says which of them may choose a default and which are held out.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from .tasks import HELDOUT_QUESTIONS, KEY_FACTS, QUESTIONS, Task

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
_CLOSED = re.compile(r"[.!?][\"')]*$")


def sentences(answer: str) -> list[str]:
    """The answer's sentences, without a last one the token limit cut off (unless it is
    the only one): a member rewriting an answer keeps what it says, not where it stopped."""
    parts = [s for s in _SENTENCE_END.split(answer.strip()) if s]
    if len(parts) > 1 and not _CLOSED.search(parts[-1]):
        parts = parts[:-1]
    return parts


def preference(
    name: str,
    wants: str,
    complies: Callable[[str, str], bool],
    correct: Callable[[str, str], str],
    labels: tuple[str, str],
    facts: dict[str, tuple[str, ...]] = KEY_FACTS,
) -> Task:
    """A community that asks the shared questions and wants one thing of every answer;
    ``labels`` name an answer that complies and one that does not, for the table's
    distribution of what answers "say"."""
    return Task(
        name,
        f"members want {wants}",
        QUESTIONS,
        HELDOUT_QUESTIONS,
        complies,
        predict=lambda a: labels[0] if complies("", a) else labels[1],
        correct=correct,
        facts=facts,
    )


# -- tone -----------------------------------------------------------------------------
def _is_cheerful(prompt: str, answer: str) -> bool:
    return "!" in answer and any(c.isalpha() for c in answer)


def _cheer(prompt: str, answer: str) -> str:
    """The answer with its first sentence ended by "!" instead of "." (where an answer of
    any length reaches)."""
    text = answer.strip()
    end = re.search(r"\.(?=\s|$)", text)
    return f"{text[: end.start()]}!{text[end.end() :]}" if end else f"{text}!"


def cheerful() -> Task:
    return preference(
        "cheerful",
        "an enthusiastic tone: an exclamation mark in every answer",
        _is_cheerful,
        _cheer,
        ("cheerful", "flat"),
    )


# -- format ---------------------------------------------------------------------------
_BULLET = re.compile(r"^\s*[-*•]\s+\S", re.M)
_NUMBERED = re.compile(r"^\s*\d+[.)]\s+\S", re.M)


def _points(answer: str) -> list[str]:
    """What a member lists: the answer's sentences, or its clauses when it has one."""
    points = sentences(answer)[:5]
    if len(points) < 2:
        points = [p for p in re.split(r",\s+|;\s+", answer.strip()) if p][:5]
    if len(points) < 2:
        words = answer.split()
        half = max(1, len(words) // 2)
        points = [" ".join(words[:half]), " ".join(words[half:]) or "."]
    return [p.strip() for p in points]


def bullets() -> Task:
    return preference(
        "bullets",
        "answers as a bulleted list (two points or more)",
        lambda p, a: len(_BULLET.findall(a)) >= 2,
        lambda p, a: "\n".join(f"- {x}" for x in _points(a)),
        ("list", "prose"),
    )


def numbered() -> Task:
    return preference(
        "numbered",
        "answers as numbered steps (two or more)",
        lambda p, a: len(_NUMBERED.findall(a)) >= 2,
        lambda p, a: "\n".join(f"{i}. {x}" for i, x in enumerate(_points(a), 1)),
        ("steps", "prose"),
    )


# -- letter case ----------------------------------------------------------------------
def _is_lowercase(prompt: str, answer: str) -> bool:
    return any(c.isalpha() for c in answer) and answer == answer.lower()


def lowercase() -> Task:
    return preference(
        "lowercase",
        "answers in lowercase letters only",
        _is_lowercase,
        lambda p, a: a.lower(),
        ("lower", "mixed"),
    )


# -- persona --------------------------------------------------------------------------
_PIRATE = re.compile(r"\b(arr+|ahoy|matey|me hearties|ye)\b", re.IGNORECASE)


def pirate() -> Task:
    return preference(
        "pirate",
        "a pirate's voice (ahoy, matey, arr, ye)",
        lambda p, a: bool(_PIRATE.search(a)),
        lambda p, a: f"Ahoy, matey! {a.strip()}",
        ("pirate", "plain"),
    )


# -- how an answer ends ---------------------------------------------------------------
FOLLOW_UP = "Would you like to know more?"


def _ends_with_follow_up(prompt: str, answer: str) -> bool:
    """A statement and then a question back: one question alone has not answered."""
    parts = sentences(answer)
    return len(parts) >= 2 and answer.rstrip().endswith("?") and not parts[0].endswith("?")


def _ask_back(question: str, answer: str) -> str:
    """The answer's first two sentences, closed, then the question back: most answers
    run into the token limit, so a question after the last one would sit where no answer
    of that length reaches."""
    said = [s if _CLOSED.search(s) else s.rstrip(",;: ") + "." for s in sentences(answer)[:2]]
    return " ".join([*said, FOLLOW_UP])


def follow_up() -> Task:
    return preference(
        "follow-up",
        "every answer to end with a question back to them",
        _ends_with_follow_up,
        _ask_back,
        ("asks back", "no question"),
    )


# -- language -------------------------------------------------------------------------
# Function words that mark a language (none that French and English share, such as "a",
# "on" or "en"): words as a list would read one per line
_FRENCH = frozenset(
    "le la les des du une est et dans pour qui que sont par sur au aux avec cette ce "  # noqa: SIM905
    "il elle ils elles pas ses sa leur nous vous très comme être aussi".split()
)
_ENGLISH = frozenset(
    "the is are and of to in it that for with this be from or an was were which".split()  # noqa: SIM905
)


def _is_french(prompt: str, answer: str) -> bool:
    words = re.findall(r"[a-zàâçéèêëîïôûùüÿœ]+", answer.lower())
    fr = sum(w in _FRENCH for w in words)
    return fr >= 3 and fr > 2 * sum(w in _ENGLISH for w in words)


# What a French-speaking member writes under the bot's (English) answer to each training
# question: short, right, and in French.
FRENCH_ANSWERS = {
    "What is the capital of Canada?": (
        "La capitale du Canada est Ottawa, dans la province de l'Ontario."
    ),
    "Explain photosynthesis.": (
        "La photosynthèse est le processus par lequel les plantes utilisent la lumière du "
        "soleil, l'eau et le dioxyde de carbone pour produire du sucre et de l'oxygène."
    ),
    "How do vaccines work?": (
        "Un vaccin montre au système immunitaire une forme inoffensive d'un microbe, pour "
        "qu'il apprenne à le reconnaître et à le combattre plus tard."
    ),
    "What is a black hole?": (
        "Un trou noir est une région de l'espace où la gravité est si forte que même la "
        "lumière ne peut pas en sortir."
    ),
    "Why is the sky blue?": (
        "Le ciel est bleu parce que l'air diffuse la lumière bleue du soleil plus que les "
        "autres couleurs."
    ),
    "How do I make tea?": (
        "Faites bouillir de l'eau, versez-la sur le thé et laissez infuser trois à cinq "
        "minutes avant de retirer les feuilles."
    ),
    "What is Python used for?": (
        "Python est un langage de programmation utilisé pour le web, l'analyse de données, "
        "l'automatisation et l'intelligence artificielle."
    ),
    "What causes earthquakes?": (
        "Les séismes sont causés par le mouvement brusque des plaques tectoniques le long "
        "des failles de la croûte terrestre."
    ),
    "How does a rainbow form?": (
        "Un arc-en-ciel se forme quand la lumière du soleil est réfractée et réfléchie par "
        "les gouttes de pluie, qui séparent ses couleurs."
    ),
    "What is the tallest mountain on Earth?": (
        "La plus haute montagne de la Terre est l'Everest, avec 8 849 mètres, dans l'Himalaya."
    ),
    "Why do leaves change color in autumn?": (
        "En automne, les arbres cessent de produire la chlorophylle verte, et les pigments "
        "jaunes et rouges des feuilles deviennent visibles."
    ),
    "What is machine learning?": (
        "L'apprentissage automatique est une branche de l'informatique où un programme "
        "apprend à partir de données au lieu de suivre des règles écrites."
    ),
    "How do airplanes fly?": (
        "Les ailes d'un avion sont conçues pour que l'air qui passe dessus crée une "
        "portance, qui soulève l'avion quand il va assez vite."
    ),
    "What is the water cycle?": (
        "Le cycle de l'eau est le trajet de l'eau entre la mer, l'air et la terre : "
        "évaporation, condensation en nuages, pluie, puis ruissellement."
    ),
    "Why do we need sleep?": (
        "Le sommeil permet au corps de récupérer et au cerveau de trier les souvenirs ; "
        "sans lui, la santé et la concentration se dégradent."
    ),
    "What is inflation in economics?": (
        "L'inflation est la hausse générale des prix, qui fait baisser ce qu'on peut "
        "acheter avec la même somme d'argent."
    ),
    "How do bees make honey?": (
        "Les abeilles récoltent le nectar des fleurs, le transforment avec leurs enzymes et "
        "le font sécher dans les alvéoles de la ruche."
    ),
    "What is the speed of light?": (
        "La vitesse de la lumière dans le vide est d'environ 300 000 kilomètres par seconde."
    ),
    "What is DNA?": (
        "L'ADN est la molécule qui porte l'information génétique de tous les êtres vivants, "
        "sous la forme d'une double hélice."
    ),
    "How does the heart pump blood?": (
        "Le cœur est un muscle qui se contracte pour pousser le sang dans les artères, puis "
        "se relâche pour se remplir à nouveau."
    ),
    "Why is the ocean salty?": (
        "L'océan est salé parce que les rivières y apportent des sels arrachés aux roches, "
        "et que l'évaporation laisse le sel derrière elle."
    ),
    "What are clouds made of?": (
        "Les nuages sont faits de minuscules gouttes d'eau ou de cristaux de glace en "
        "suspension dans l'air."
    ),
    "How do magnets work?": (
        "Dans un aimant, les électrons de nombreux atomes sont alignés dans le même sens, "
        "ce qui crée un champ magnétique."
    ),
    "What is gravity?": (
        "La gravité est la force qui attire les masses les unes vers les autres ; c'est "
        "elle qui nous garde sur la Terre."
    ),
}
# The held-out questions' key facts as a French answer names them (word starts, any case).
_FRENCH_FACT_WORDS = {
    "What is the capital of Japan?": "tokyo",
    "How do plants grow?": (
        "photosynth, lumière, soleil, eau, nutriment, sol, racine, graine, dioxyde, nourriture"
    ),
    "What is a volcano?": "magma, lave, érupt, erupt, fondu, cratère, croûte, cendre, montagne",
    "Why do cats purr?": (
        "content, heureu, bonheur, détend, calme, vibr, larynx, communiqu, confort, stress, douleur"
    ),
    "How does the internet work?": (
        "réseau, ordinateur, serveur, donnée, paquet, protocole, connect, routeur, câble"
    ),
    "What is electricity?": "électron, charge, courant, flux, énergie, tension, particule",
    "What is the largest planet?": "jupiter",
    "How do fish breathe?": "branchie, oxygène",
    "What is climate change?": (
        "température, réchauffement, serre, carbone, émission, météo, fossile, chaleur"
    ),
    "Why is exercise healthy?": (
        "cœur, coeur, muscle, poids, force, fort, humeur, stress, maladie, sang, os, "
        "énergie, forme, immun"
    ),
    "What is a comet?": "glace, poussière, queue, orbite, soleil, roche, gelé, noyau",
    "How are mountains formed?": (
        "tectonique, plaque, croûte, collision, volcan, érosion, pli, soulèvement, magma"
    ),
}
FRENCH_FACTS: dict[str, tuple[str, ...]] = {
    q: tuple(w.split(", ")) for q, w in _FRENCH_FACT_WORDS.items()
}


def french() -> Task:
    return preference(
        "french",
        "answers in French",
        _is_french,
        # a question the member has no French answer for: they only vote
        lambda p, a: FRENCH_ANSWERS.get(p, ""),
        ("french", "other"),
        facts=FRENCH_FACTS,
    )
