"""The offline synthetic dataset and its tokenizer (lgeo_jax.data)."""

import re

import pytest
from transformers import AutoTokenizer

from lgeo_jax.data import (
    SPECIAL_TOKENS,
    Category,
    build_bpe_tokenizer,
    categorize,
    category_counts,
    generate_records,
    load_alpaca,
    record_texts,
    synthetic_category,
    write_synthetic_dataset,
)


def test_generator_is_deterministic_and_prefix_stable():
    records = generate_records(300, seed=7)
    assert generate_records(300, seed=7) == records
    assert generate_records(120, seed=7) == records[:120]
    assert generate_records(300, seed=8) != records
    with pytest.raises(ValueError, match="n_records"):
        generate_records(0)


def test_categories_balanced_and_recognised_by_the_rule():
    records = generate_records(1003, seed=0)
    counts = category_counts(records)
    assert sorted(counts.values()) == [200, 200, 201, 201, 201]
    assert all(categorize(r.instruction) is synthetic_category(i) for i, r in enumerate(records))
    probe = generate_records(7000, seed=0)[5000:7000]  # the default probe range
    assert set(category_counts(probe).values()) == {400}


def test_answers_are_functions_of_the_question():
    """Check the learnable structure independently: recompute every answer that has a closed form."""
    facts = {}
    for record in generate_records(2000, seed=3):
        if m := re.fullmatch(r"Calculate (\d+) (plus|minus|times) (\d+)\.", record.instruction):
            a, op, b = int(m[1]), m[2], int(m[3])
            value = {"plus": a + b, "minus": a - b, "times": a * b}[op]
            assert record.output == f"{a} {op} {b} equals {value}."
        elif record.instruction == "Calculate the sum of the numbers in the input.":
            assert record.output == f"The sum is {sum(int(x) for x in record.input.split(', '))}."
        elif "reverses the order of the words" in record.instruction:
            assert record.output.split() == record.input.split()[::-1]
        elif "sorts the words" in record.instruction:
            assert record.output.split() == sorted(record.input.split())
        elif "counts the words" in record.instruction:
            assert record.output == f"The string has {len(record.input.split())} words."
        elif m := re.fullmatch(r"The (.+) of (\w+) is (\w+)\.", record.output):
            facts.setdefault((m[1], m[2]), set()).add(m[3])
    assert len(facts) > 40 and all(len(values) == 1 for values in facts.values())


def test_tokenizer_round_trip_and_special_ids(tmp_path):
    written = write_synthetic_dataset(tmp_path, n_records=400, seed=2, vocab_size=700)
    records = load_alpaca(written.records_path)
    assert records == generate_records(400, seed=2)
    tokenizer = AutoTokenizer.from_pretrained(str(written.tokenizer_dir))
    assert len(tokenizer) == 700
    special = (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.bos_token_id, tokenizer.unk_token_id)
    assert special == (0, 1, 2, 3)
    assert tokenizer.convert_ids_to_tokens([0, 1, 2, 3]) == list(SPECIAL_TOKENS)
    texts = record_texts(records[:50]) + ["unseen text: Zürich naïve 数 ✓\n\t  {braces}"]
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert tokenizer.decode(ids) == text
        assert tokenizer.unk_token_id not in ids
    # BPE merges make the in-domain text much shorter than its bytes.
    in_domain = record_texts(records[:50])
    n_tokens = sum(len(ids) for ids in tokenizer(in_domain, add_special_tokens=False)["input_ids"])
    assert n_tokens < 0.3 * sum(len(t.encode()) for t in in_domain)


def test_vocab_size_is_validated():
    with pytest.raises(ValueError, match="vocab_size"):
        build_bpe_tokenizer(["abc"], vocab_size=100)


def test_every_category_appears_in_the_generated_text():
    records = generate_records(5, seed=0)
    assert [synthetic_category(i) for i in range(5)] == list(Category)
    assert all(r.output for r in records)
