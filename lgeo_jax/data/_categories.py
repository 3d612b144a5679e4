"""Rule-based bucketing of instructions into the paper's five probe categories.

The paper buckets its probe set into creative, factual, reasoning, coding and practical prompts without
saying how. We use a transparent rule: lower-case the *instruction* (never the input or output), look
for whole-word keyword patterns category by category in a fixed priority order, and take the first
category that matches; an instruction matching nothing is ``factual`` (most unmatched Alpaca
instructions are describe/explain/identify questions). Priority runs from the most specific vocabulary
to the least, so "Write a Python function..." is coding although "write" alone would say creative.
The rule is deterministic and has no state; real data is not balanced (the paper's 400 per category
was presumably selected), so report :func:`category_counts`.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Iterable

from lgeo_jax.data._records import AlpacaRecord


class Category(enum.Enum):
    CREATIVE = "creative"
    FACTUAL = "factual"
    REASONING = "reasoning"
    CODING = "coding"
    PRACTICAL = "practical"


FALLBACK_CATEGORY = Category.FACTUAL

# (category, keyword patterns) in priority order; each pattern is a regex matched as
# whole words (not preceded or followed by a letter, digit or underscore).
# fmt: off
CATEGORY_RULES: tuple[tuple[Category, tuple[str, ...]], ...] = (
    (Category.CODING, (
        r"code", r"coding", r"programming", r"(a|the|this|computer) program", r"python", r"java(script)?",
        r"c\+\+", r"sql", r"html", r"css", r"algorithm", r"function", r"regex", r"regular expression",
        r"array", r"data structure", r"debug", r"api", r"json", r"pseudocode", r"variable", r"for loop",
        r"while loop", r"binary search", r"sorting", r"string",
    )),
    (Category.CREATIVE, (
        r"poem", r"poetry", r"haiku", r"story", r"stories", r"song", r"lyrics", r"limerick", r"slogan",
        r"tagline", r"creative", r"imagine", r"fictional", r"fiction", r"compose", r"metaphor", r"simile",
        r"rhyme", r"rhyming", r"joke", r"dialogue", r"character", r"tweet", r"title", r"headline",
        r"invent", r"brainstorm", r"narrative", r"script", r"essay", r"email", r"letter", r"advertisement",
        r"speech", r"tale",
    )),
    (Category.REASONING, (
        r"calculate", r"compute", r"solve", r"equation", r"math", r"sum", r"average", r"percent",
        r"percentage", r"how many", r"how much", r"probability", r"plus", r"minus", r"times", r"divided",
        r"multiply", r"number", r"numbers", r"riddle", r"puzzle", r"logic(al)?", r"deduce", r"infer",
        r"classify", r"categorize", r"compare", r"contrast", r"analy[sz]e", r"evaluate", r"determine",
        r"reason(ing)?", r"true or false", r"which of", r"odd one out", r"convert", r"estimate", r"predict",
    )),
    (Category.PRACTICAL, (
        r"tips?", r"advice", r"steps?", r"how to", r"how (can|do|should) (i|you|we|one)",
        r"suggest(ions?)?", r"recommend(ations?)?", r"plan", r"guide", r"ways? to", r"recipe",
        r"instructions", r"checklist", r"strategy", r"strategies", r"budget", r"schedule", r"improve",
        r"prepare", r"save money", r"healthy", r"routine",
    )),
)
# fmt: on

_COMPILED = tuple(
    (category, re.compile(r"(?<!\w)(?:" + "|".join(patterns) + r")(?!\w)")) for category, patterns in CATEGORY_RULES
)


def categorize(instruction: str) -> Category:
    """The category of one instruction (first matching rule in priority order, else the fallback)."""
    text = instruction.lower()
    for category, pattern in _COMPILED:
        if pattern.search(text):
            return category
    return FALLBACK_CATEGORY


def categorize_records(records: Iterable[AlpacaRecord]) -> list[Category]:
    """Categories of records, by instruction only."""
    return [categorize(record.instruction) for record in records]


def category_counts(records: Iterable[AlpacaRecord]) -> dict[Category, int]:
    """Per-category counts, every category present (zero if unused), in :class:`Category` order."""
    counts = dict.fromkeys(Category, 0)
    for category in categorize_records(records):
        counts[category] += 1
    return counts
