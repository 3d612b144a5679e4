"""A deterministic generator of Alpaca-format records with structure a small LoRA adapter can learn.

Used as the offline default dataset (no network, no licence questions). Every answer is a deterministic
function of the instruction and input, so training loss can fall far below that of a model guessing
from format alone:

- reasoning: integer arithmetic and sums of number lists;
- coding: reversing / sorting / counting the words of an input string;
- factual: look-ups in a fixed, invented world (capital, language, currency, animal of 16 countries);
- creative: formulaic poems and stories whose adjectives and endings depend on the subject;
- practical: fixed three-step lists and tips for a fixed set of chores.

Records cycle through the categories in :class:`Category` order (record ``i`` has category
``i % 5``), so any contiguous index range, e.g. the probe split, is balanced to within one record.
The world and word lists are constants; only the choice of questions depends on the seed.
"""

from __future__ import annotations

import numpy as np

from lgeo_jax.data._categories import Category
from lgeo_jax.data._records import AlpacaRecord

_COUNTRIES = (
    "Veloria",
    "Castemar",
    "Dunholt",
    "Ishvara",
    "Korrin",
    "Lumeth",
    "Marovia",
    "Nesh",
    "Orrun",
    "Palvane",
    "Quessa",
    "Rhydon",
    "Sarnia",
    "Tovel",
    "Ulmora",
    "Zerath",
)
_CAPITALS = (
    "Marn",
    "Oskel",
    "Brae",
    "Tullin",
    "Vask",
    "Eddis",
    "Corra",
    "Fenwick",
    "Harl",
    "Iselt",
    "Jorvan",
    "Kest",
    "Lorne",
    "Merrow",
    "Nolde",
    "Pryce",
)
_LANGUAGES = ("Velori", "Castic", "Dunnish", "Ishvan", "Korric", "Lumic", "Marovan", "Neshi")
_CURRENCIES = ("crown", "mark", "shell", "ducat", "florin", "talon", "pearl", "bead")
_ANIMALS = ("fox", "heron", "otter", "lynx", "badger", "swan", "stag", "owl", "hare", "wolf", "crane", "seal")
_FACT_ATTRIBUTES = ("capital", "language", "currency", "national animal")

_SUBJECTS = ("sea", "moon", "forest", "river", "mountain", "garden", "winter", "city", "desert", "rain")
_ADJECTIVES = (
    ("calm", "blue"),
    ("pale", "bright"),
    ("deep", "green"),
    ("cold", "swift"),
    ("high", "grey"),
    ("soft", "sweet"),
    ("white", "still"),
    ("loud", "warm"),
    ("dry", "gold"),
    ("gentle", "grey"),
)
_HEROES = ("fox", "mouse", "bear", "crow", "turtle", "rabbit", "goat", "frog")
_WISHES = ("fly", "sing", "swim", "climb a tree", "find the sea", "build a house", "read a book", "dance")

_CHORES = (
    ("clean a kitchen", ("Clear the counters.", "Wash the dishes.", "Wipe every surface.")),
    ("wash a car", ("Rinse the car with water.", "Scrub it with soap.", "Dry it with a towel.")),
    ("make tea", ("Boil fresh water.", "Pour it over the tea leaves.", "Wait three minutes.")),
    ("pack a suitcase", ("Lay out your clothes.", "Roll them tightly.", "Put heavy items at the bottom.")),
    ("water a garden", ("Water early in the morning.", "Soak the roots.", "Skip the leaves.")),
    ("paint a wall", ("Cover the floor.", "Apply a base coat.", "Add a second coat when dry.")),
    ("wash clothes", ("Sort them by colour.", "Use cold water.", "Hang them to dry.")),
    ("bake bread", ("Mix flour, water and yeast.", "Let the dough rise.", "Bake until golden.")),
    ("fix a flat tire", ("Remove the wheel.", "Patch the hole.", "Refill the tire with air.")),
    (
        "study for an exam",
        ("Start a week early.", "Review your notes daily.", "Sleep well the night before."),
    ),
    ("plant a tree", ("Dig a wide hole.", "Set the roots in the soil.", "Water the tree deeply.")),
    ("clean a window", ("Dust the frame.", "Spray the glass.", "Wipe it from top to bottom.")),
)
_WORDS = (
    "apple",
    "river",
    "stone",
    "cloud",
    "lamp",
    "tiger",
    "paper",
    "glass",
    "music",
    "bread",
    "chair",
    "ocean",
    "pencil",
    "window",
    "garden",
    "silver",
    "rocket",
    "candle",
    "forest",
    "mirror",
    "violet",
    "button",
)


def _fact(country: int, attribute: int) -> str:
    """The fixed world: attribute values are arithmetic functions of the country's index."""
    if attribute == 0:
        return _CAPITALS[country]
    if attribute == 1:
        return _LANGUAGES[country % len(_LANGUAGES)]
    if attribute == 2:
        return _CURRENCIES[(3 * country + 1) % len(_CURRENCIES)]
    return _ANIMALS[(5 * country + 2) % len(_ANIMALS)]


def _factual(rng: np.random.Generator) -> AlpacaRecord:
    country, attribute = int(rng.integers(len(_COUNTRIES))), int(rng.integers(len(_FACT_ATTRIBUTES)))
    name, attr, value = _COUNTRIES[country], _FACT_ATTRIBUTES[attribute], _fact(country, attribute)
    if rng.random() < 0.5:
        return AlpacaRecord(f"What is the {attr} of {name}?", "", f"The {attr} of {name} is {value}.")
    return AlpacaRecord(
        f"Name the {attr} of the country given in the input.", name, f"The {attr} of {name} is {value}."
    )


def _reasoning(rng: np.random.Generator) -> AlpacaRecord:
    if rng.random() < 0.6:
        a, b = (int(x) for x in rng.integers(2, 50, size=2))
        op = int(rng.integers(3))
        word, value = (("plus", a + b), ("minus", a - b), ("times", a * b))[op]
        return AlpacaRecord(f"Calculate {a} {word} {b}.", "", f"{a} {word} {b} equals {value}.")
    values = [int(x) for x in rng.integers(1, 30, size=int(rng.integers(3, 6)))]
    return AlpacaRecord(
        "Calculate the sum of the numbers in the input.",
        ", ".join(map(str, values)),
        f"The sum is {sum(values)}.",
    )


def _coding(rng: np.random.Generator) -> AlpacaRecord:
    words = [_WORDS[i] for i in rng.choice(len(_WORDS), size=int(rng.integers(3, 7)), replace=False)]
    text = " ".join(words)
    task = int(rng.integers(3))
    if task == 0:
        return AlpacaRecord(
            "Write the output of a Python function that reverses the order of the words in the input string.",
            text,
            " ".join(reversed(words)),
        )
    if task == 1:
        return AlpacaRecord(
            "Write the output of Python code that sorts the words in the input string alphabetically.",
            text,
            " ".join(sorted(words)),
        )
    return AlpacaRecord(
        "Write the output of a Python function that counts the words in the input string.",
        text,
        f"The string has {len(words)} words.",
    )


def _creative(rng: np.random.Generator) -> AlpacaRecord:
    if rng.random() < 0.5:
        s = int(rng.integers(len(_SUBJECTS)))
        subject, (adj1, adj2) = _SUBJECTS[s], _ADJECTIVES[s]
        poem = (
            f"The {subject} is {adj1} and {adj2},\nthe {subject} is {adj2} tonight;\n"
            f"I keep the {subject} close to me,\nand all the world is light."
        )
        return AlpacaRecord(f"Write a short poem about the {subject}.", "", poem)
    hero, wish = _HEROES[int(rng.integers(len(_HEROES)))], _WISHES[int(rng.integers(len(_WISHES)))]
    story = (
        f"Once upon a time, a {hero} wanted to {wish}. Every day the {hero} tried again. "
        f"At last the {hero} could {wish}, and the {hero} was happy."
    )
    return AlpacaRecord(f"Write a short story about a {hero} who wants to {wish}.", "", story)


def _practical(rng: np.random.Generator) -> AlpacaRecord:
    chore, steps = _CHORES[int(rng.integers(len(_CHORES)))]
    if rng.random() < 0.5:
        listed = "\n".join(f"{i + 1}. {step}" for i, step in enumerate(steps))
        return AlpacaRecord(f"List the steps to {chore}.", "", listed)
    return AlpacaRecord(f"Give three tips on how to {chore}.", "", " ".join(steps))


_GENERATORS = {
    Category.CREATIVE: _creative,
    Category.FACTUAL: _factual,
    Category.REASONING: _reasoning,
    Category.CODING: _coding,
    Category.PRACTICAL: _practical,
}
SYNTHETIC_CATEGORIES: tuple[Category, ...] = tuple(Category)


def synthetic_category(index: int) -> Category:
    """The category the generator used for record ``index``."""
    return SYNTHETIC_CATEGORIES[index % len(SYNTHETIC_CATEGORIES)]


def generate_records(n_records: int, seed: int = 0) -> list[AlpacaRecord]:
    """``n_records`` synthetic records; the same ``(n_records, seed)`` always gives the same list, and a
    longer list extends a shorter one with the same seed (record ``i`` never depends on ``n_records``)."""
    if n_records <= 0:
        raise ValueError(f"generate_records: n_records must be positive, got {n_records}")
    rng = np.random.default_rng(seed)
    return [_GENERATORS[synthetic_category(i)](rng) for i in range(n_records)]
