"""Records, templates, loaders, splits, tokenisation masks and probe categories (lgeo_jax.data)."""

import json
from pathlib import Path

import datasets
import numpy as np
import pytest
from transformers import AutoTokenizer

from lgeo_jax.data import (
    PROMPT_INPUT,
    PROMPT_NO_INPUT,
    AlpacaRecord,
    Category,
    DataConfig,
    LossOn,
    Overflow,
    categorize,
    category_counts,
    file_sha256,
    format_prompt,
    generate_records,
    load_alpaca,
    save_alpaca_json,
    save_synthetic_tokenizer,
    select_split,
    tokenize_records,
    tokenize_split,
)

SHARED_TEMPLATE = Path("/work/shared/data/alpaca_prompt_template.json")
WITH_INPUT = AlpacaRecord("Sort the words {x}.", "b a", "a b")
NO_INPUT = AlpacaRecord("Give three tips for staying healthy.", "", "Eat well.\nSleep.")


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok")
    save_synthetic_tokenizer(generate_records(500, seed=1), out, vocab_size=600)
    return AutoTokenizer.from_pretrained(str(out))


# --- templates ---------------------------------------------------------------------------------------


@pytest.mark.skipif(not SHARED_TEMPLATE.exists(), reason="shared Alpaca template file absent")
def test_templates_match_stanford_alpaca_strings():
    shared = json.loads(SHARED_TEMPLATE.read_text())
    assert PROMPT_INPUT == shared["prompt_input"]
    assert PROMPT_NO_INPUT == shared["prompt_no_input"]
    # Filled by plain string replacement, independent of str.format (braces in the text must survive).
    for record, template in ((WITH_INPUT, shared["prompt_input"]), (NO_INPUT, shared["prompt_no_input"])):
        expected = template.replace("{instruction}", record.instruction).replace("{input}", record.input)
        assert format_prompt(record) == expected


def test_prompt_choice_follows_input_emptiness():
    assert "### Input:\nb a\n\n### Response:" in format_prompt(WITH_INPUT)
    assert "### Input:" not in format_prompt(NO_INPUT)
    assert format_prompt(NO_INPUT).endswith("### Response:")


# --- loaders -----------------------------------------------------------------------------------------

ROWS = [
    {"instruction": "a", "input": "", "output": "x"},
    {"instruction": "b", "input": "in", "output": "y", "text": "extra column is ignored"},
]
RECORDS = [AlpacaRecord("a", "", "x"), AlpacaRecord("b", "in", "y")]


def test_load_json_jsonl_and_sha256(tmp_path):
    path = tmp_path / "alpaca_data.json"
    path.write_text(json.dumps(ROWS))
    assert load_alpaca(path) == RECORDS
    assert load_alpaca(path, sha256=file_sha256(path).upper()) == RECORDS
    with pytest.raises(ValueError, match="sha256"):
        load_alpaca(path, sha256="0" * 64)
    jsonl = tmp_path / "data.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in ROWS) + "\n")
    assert load_alpaca(jsonl) == RECORDS
    assert load_alpaca(save_alpaca_json(RECORDS, tmp_path / "again.json")) == RECORDS


def test_file_sha256_matches_hashlib_on_known_bytes(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(b"abc")
    assert file_sha256(path) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


def test_load_datasets_directory_and_hub(tmp_path, monkeypatch):
    table = datasets.Dataset.from_list(ROWS)
    table.save_to_disk(str(tmp_path / "ds"))
    assert load_alpaca(tmp_path / "ds") == RECORDS
    datasets.DatasetDict({"train": table}).save_to_disk(str(tmp_path / "dd"))
    assert load_alpaca(tmp_path / "dd") == RECORDS
    with pytest.raises(ValueError, match="no split 'test'"):
        load_alpaca(tmp_path / "dd", split="test")

    calls = []

    def fake_load_dataset(name, split):
        calls.append((name, split))
        return table

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    assert load_alpaca() == RECORDS
    assert calls == [("tatsu-lab/alpaca", "train")]


def test_loader_errors(tmp_path):
    empty = tmp_path / "empty.json"
    empty.write_text("[]")
    with pytest.raises(ValueError, match="empty"):
        load_alpaca(empty)
    missing = tmp_path / "missing.json"
    missing.write_text(json.dumps([{"instruction": "a", "output": "b"}, {"instruction": "a"}]))
    with pytest.raises(ValueError, match="record 1 has no 'output'"):
        load_alpaca(missing)
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps([{"instruction": "a", "input": 3, "output": "b"}]))
    with pytest.raises(ValueError, match="field 'input' is int"):
        load_alpaca(wrong)
    with pytest.raises(ValueError, match="needs a local file"):
        load_alpaca("tatsu-lab/alpaca", sha256="0" * 64)


def test_missing_input_field_reads_as_empty(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps([{"instruction": "a", "output": "b"}]))
    assert load_alpaca(path) == [AlpacaRecord("a", "", "b")]


# --- splits ------------------------------------------------------------------------------------------


def test_default_splits_are_the_papers():
    config = DataConfig()
    assert config.indices("train") == range(10_000)
    assert config.indices("probe") == range(5_000, 7_000)
    assert config.indices("heldout") == range(11_000, 11_200)
    assert config.probe_overlaps_train
    assert config.required_records == 11_200
    assert not DataConfig(probe=(10_000, 11_000)).probe_overlaps_train


def test_select_split_and_errors():
    records = list(range(30))
    config = DataConfig(train=(0, 10), probe=(5, 15), heldout=(20, 30))
    assert select_split(records, config, "probe") == list(range(5, 15))
    with pytest.raises(ValueError, match="split 'heldout' needs indices 20..29 but the dataset has only 25"):
        select_split(records[:25], config, "heldout")
    with pytest.raises(ValueError, match="split 'train': the dataset is empty"):
        select_split([], config, "train")
    with pytest.raises(ValueError, match="unknown split"):
        config.indices("validation")
    with pytest.raises(ValueError, match="heldout.*overlaps train"):
        DataConfig(train=(0, 10), heldout=(9, 12))
    with pytest.raises(ValueError, match="probe: expected"):
        DataConfig(probe=(7, 7))
    assert DataConfig(train=[0, 10], probe=[5, 15], heldout=[20, 30]) == config  # lists from YAML


def test_tokenize_split_keeps_dataset_indices(tokenizer):
    records = generate_records(40, seed=9)
    splits = DataConfig(train=(0, 20), probe=(25, 31), heldout=(31, 40))
    probe = tokenize_split(records, tokenizer, splits, "probe")
    assert [e.index for e in probe] == list(range(25, 31))
    for example, record in zip(probe, records[25:31], strict=True):
        first = int(np.argmax(example.loss_mask))
        assert tokenizer.decode(example.input_ids[first:-1]) == record.output
    with pytest.raises(ValueError, match="split 'heldout' needs indices 31..39 but the dataset has only 35"):
        tokenize_split(records[:35], tokenizer, splits, "heldout")


# --- tokenisation ------------------------------------------------------------------------------------


def test_response_only_loss_mask_covers_exactly_output_and_eos(tokenizer):
    (example,) = tokenize_records([WITH_INPUT], tokenizer, DataConfig(), indices=[42])
    ids, mask = example.input_ids, example.loss_mask
    assert ids.dtype == np.int32 and mask.dtype == np.int32 and example.index == 42
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
    first = int(np.argmax(mask))
    assert mask[:first].sum() == 0 and mask[first:].all()
    assert tokenizer.decode(ids[1:first]) == format_prompt(WITH_INPUT)
    assert tokenizer.decode(ids[first:-1]) == WITH_INPUT.output


def test_whole_sequence_loss_and_no_specials(tokenizer):
    config = DataConfig(loss_on="all", add_bos=False, add_eos=False)
    (example,) = tokenize_records([NO_INPUT], tokenizer, config)
    assert config.loss_on is LossOn.ALL
    assert tokenizer.decode(example.input_ids) == format_prompt(NO_INPUT) + NO_INPUT.output
    assert example.loss_mask[0] == 0 and example.loss_mask[1:].all()


def test_overflow_truncates_or_names_the_record(tokenizer):
    (full,) = tokenize_records([WITH_INPUT], tokenizer, DataConfig())
    short = DataConfig(max_length=full.length - 3)
    (cut,) = tokenize_records([WITH_INPUT], tokenizer, short)
    assert cut.truncated and not full.truncated
    np.testing.assert_array_equal(cut.input_ids, full.input_ids[: full.length - 3])
    np.testing.assert_array_equal(cut.loss_mask, full.loss_mask[: full.length - 3])
    with pytest.raises(ValueError, match=f"record 7: {full.length} tokens"):
        tokenize_records([WITH_INPUT], tokenizer, DataConfig(max_length=10, overflow=Overflow.ERROR), [7])
    with pytest.raises(ValueError, match="no records"):
        tokenize_records([], tokenizer, DataConfig())


# --- categories --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("instruction", "category"),
    [
        ("Write a Python function that reverses a list.", Category.CODING),  # coding outranks "write"
        ("Write a poem about the moon.", Category.CREATIVE),
        ("Write a story in which a robot learns to calculate.", Category.CREATIVE),  # creative > reasoning
        ("Calculate 3 plus 5.", Category.REASONING),
        ("Explain C++ templates.", Category.CODING),
        ("Give three tips for staying healthy.", Category.PRACTICAL),
        ("How can I improve my sleep?", Category.PRACTICAL),
        ("What is the capital of France?", Category.FACTUAL),  # no rule: fallback
        ("Describe the water cycle.", Category.FACTUAL),
        ("Describe a storyteller.", Category.FACTUAL),  # whole words only: "story" not in "storyteller"
    ],
)
def test_categorize_rules(instruction, category):
    assert categorize(instruction) is category


def test_category_counts_are_deterministic_and_complete():
    records = generate_records(103, seed=5)
    counts = category_counts(records)
    assert list(counts) == list(Category) and sum(counts.values()) == 103
    assert category_counts(records) == counts
    assert category_counts(records[:1]) == {c: int(c is Category.CREATIVE) for c in Category}
