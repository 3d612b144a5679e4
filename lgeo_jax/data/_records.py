"""Alpaca records and the Stanford Alpaca prompt templates.

The template strings are copied verbatim from tatsu-lab/stanford_alpaca ``train.py`` (``PROMPT_DICT``,
commit 761dc5bf). They are embedded here, never read from disk, so the package works offline and the
prompt a model saw during training is fixed by the package version.
"""

from __future__ import annotations

import dataclasses

PROMPT_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:"
)
PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:"
)


@dataclasses.dataclass(frozen=True)
class AlpacaRecord:
    """One instruction-following example; ``input`` is ``""`` when the task needs no context."""

    instruction: str
    input: str
    output: str


def format_prompt(record: AlpacaRecord) -> str:
    """The prompt part of a record: ``PROMPT_INPUT`` when ``input`` is non-empty, else ``PROMPT_NO_INPUT``.

    The official recipe appends the response directly after ``### Response:`` with no separator, so the
    target text is ``record.output`` (plus the tokenizer's EOS) and nothing else.
    """
    if record.input:
        return PROMPT_INPUT.format(instruction=record.instruction, input=record.input)
    return PROMPT_NO_INPUT.format(instruction=record.instruction)
