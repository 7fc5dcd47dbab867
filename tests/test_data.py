"""Data pipeline: synthetic corpus, sources, tokenizers, packing, determinism, sharding, clear errors."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ring_jax.data import synthetic
from ring_jax.data.errors import DataError
from ring_jax.data.pipeline import make_dataset
from ring_jax.data.tokenizers import ByteTokenizer, HFTokenizer
from ring_jax.train.config import training_defaults

SEQ = 64


def data_config(**overrides):
    config = training_defaults()["data"]
    config.update(overrides)
    return config


def take(dataset, n):
    iterator = iter(dataset)
    return [next(iterator) for _ in range(n)]


def write_jsonl(path, texts, field="text"):
    path.write_text("".join(json.dumps({field: t, "id": i}) + "\n" for i, t in enumerate(texts)))


def check_packed_batch(batch):
    """Invariants of a packed batch of plain text: every real target is learned (see check_packed_batch_structure)."""
    check_packed_batch_structure(batch)
    np.testing.assert_array_equal(batch["loss_mask"], (batch["segment_ids"] > 0).astype(np.float32))


def check_packed_batch_structure(batch):
    """Per segment, positions count up from 0 and targets are next inputs; padding is zero and never learned."""
    rows, seq = batch["inputs"].shape
    for key in ("inputs", "targets", "segment_ids", "positions", "loss_mask"):
        assert batch[key].shape == (rows, seq)
    for r in range(rows):
        seg, pos = batch["segment_ids"][r], batch["positions"][r]
        assert np.all(batch["loss_mask"][r][seg == 0] == 0)
        for s in np.unique(seg[seg > 0]):
            where = np.flatnonzero(seg == s)
            assert np.all(np.diff(where) == 1), "a segment must be contiguous"
            np.testing.assert_array_equal(pos[where], np.arange(len(where)))
            np.testing.assert_array_equal(batch["targets"][r, where[:-1]], batch["inputs"][r, where[1:]])
        padding = seg == 0
        assert np.all(batch["inputs"][r, padding] == 0) and np.all(pos[padding] == 0)


def test_synthetic_examples_are_deterministic_and_verifiable():
    texts = [synthetic.example(7, i).text for i in range(60)]
    assert texts == [synthetic.example(7, i).text for i in range(60)]
    assert texts != [synthetic.example(8, i).text for i in range(60)]
    for i in range(60):
        ex = synthetic.example(7, i)
        assert synthetic.verify(ex.prompt, ex.answer + "\n")
        assert not synthetic.verify(ex.prompt, ex.answer + "9")
    assert {synthetic.example(0, i).task for i in range(3)} == set(synthetic.TASKS)
    assert synthetic.verify("add 123+4567=", "4690") and synthetic.verify("sub 5-12=", "-7")


def test_default_pipeline_packs_documents_with_segment_ids():
    batches = take(make_dataset(data_config(), seq_len=SEQ, global_batch_size=4, vocab_size=259), 3)
    for batch in batches:
        check_packed_batch(batch)
        assert batch["segment_ids"].max() > 1, "several short documents share a row"
        assert batch["inputs"].dtype == np.int32 and batch["loss_mask"].dtype == np.float32
    starts = batches[0]["inputs"][(batches[0]["positions"] == 0) & (batches[0]["segment_ids"] > 0)]
    assert np.mean(starts == ByteTokenizer.bos_id) > 0.5, "most segments are whole documents starting with BOS"
    text = ByteTokenizer().decode(batches[0]["inputs"][0][batches[0]["segment_ids"][0] == 1])
    assert text.startswith(("add ", "sub ", "kv ", "rev "))


def test_unpacked_rows_hold_one_window_each():
    batch = take(make_dataset(data_config(packing=False), seq_len=SEQ, global_batch_size=4, vocab_size=259), 1)[0]
    check_packed_batch(batch)
    assert set(np.unique(batch["segment_ids"])) <= {0, 1}


def test_pipeline_is_deterministic_and_resumes_from_iterator_state():
    config = data_config(shuffle_seed=3)
    first = take(make_dataset(config, seq_len=SEQ, global_batch_size=2, vocab_size=259), 6)
    again = take(make_dataset(config, seq_len=SEQ, global_batch_size=2, vocab_size=259), 6)
    for a, b in zip(first, again, strict=True):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
    other = take(make_dataset(data_config(shuffle_seed=4), seq_len=SEQ, global_batch_size=2, vocab_size=259), 1)
    assert not np.array_equal(other[0]["inputs"], first[0]["inputs"])

    iterator = iter(make_dataset(config, seq_len=SEQ, global_batch_size=2, vocab_size=259))
    for _ in range(3):
        next(iterator)
    state = json.loads(json.dumps(iterator.get_state()))  # what the grain checkpoint handler stores
    resumed = iter(make_dataset(config, seq_len=SEQ, global_batch_size=2, vocab_size=259))
    resumed.set_state(state)
    for expected in first[3:]:
        got = next(resumed)
        for key in expected:
            np.testing.assert_array_equal(got[key], expected[key])


def test_process_sharding_splits_documents_disjointly(tmp_path):
    texts = [f"document number {i}" for i in range(40)]
    write_jsonl(tmp_path / "d.jsonl", texts)
    config = data_config(source=str(tmp_path / "d.jsonl"), packing=False)
    seen = []
    for index in range(2):
        batches = take(make_dataset(config, seq_len=SEQ, global_batch_size=4, vocab_size=259, process_index=index,
                                    process_count=2), 5)  # 5 batches x 2 rows = 10 of this process's 20 documents
        rows = [ByteTokenizer().decode(row[seg > 0]) for b in batches for row, seg in
                zip(b["inputs"], b["segment_ids"], strict=True)]
        assert all(r in texts for r in rows)
        seen.append(set(rows))
    assert seen[0] and seen[1] and not seen[0] & seen[1]


def test_fixed_data_shards_make_the_global_batch_independent_of_the_process_count():
    config = data_config(num_shards=4, num_default_documents=300)
    alone = take(make_dataset(config, seq_len=SEQ, global_batch_size=8, vocab_size=259), 3)
    parts = [take(make_dataset(config, seq_len=SEQ, global_batch_size=8, vocab_size=259, process_index=p,
                               process_count=2), 3) for p in range(2)]  # fmt: skip
    for step, batch in enumerate(alone):
        assert batch["inputs"].shape == (8, SEQ)
        for key, value in batch.items():
            np.testing.assert_array_equal(value, np.concatenate([parts[0][step][key], parts[1][step][key]]))
    with pytest.raises(DataError, match="data.num_shards=3 must be a multiple of the 2 processes"):
        make_dataset(data_config(num_shards=3), seq_len=SEQ, global_batch_size=6, vocab_size=259, process_index=0,
                     process_count=2)  # fmt: skip


def test_jsonl_txt_and_arrayrecord_sources(tmp_path):
    from array_record.python.array_record_module import ArrayRecordWriter

    write_jsonl(tmp_path / "a.jsonl", ["alpha jsonl"] * 3, field="body")
    (tmp_path / "b.txt").write_text("beta text file " * 10)  # 150 bytes: split into windows
    writer = ArrayRecordWriter(str(tmp_path / "c.arrayrecord"), "group_size:1")
    writer.write(json.dumps({"body": "gamma record"}).encode())
    writer.write(b"delta raw text")
    writer.close()
    config = data_config(source=",".join(str(tmp_path / n) for n in ("a.jsonl", "b.txt", "c.arrayrecord")),
                         text_field="body", packing=False)
    batches = take(make_dataset(config, seq_len=SEQ, global_batch_size=4, vocab_size=259), 6)
    texts = {ByteTokenizer().decode(row[seg > 0]) for b in batches for row, seg in
             zip(b["inputs"], b["segment_ids"], strict=True)}
    assert {"alpha jsonl", "gamma record", "delta raw text"} <= texts
    assert any(t.startswith("beta text file") for t in texts)
    for batch in batches:
        check_packed_batch(batch)


def test_hf_tokenizer_json(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<s>": 0, "</s>": 1, "[UNK]": 2, "hello": 3, "world": 4}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    hf = HFTokenizer(str(tmp_path / "tokenizer.json"))
    assert (hf.vocab_size, hf.bos_id, hf.eos_id) == (5, 0, 1)
    write_jsonl(tmp_path / "d.jsonl", ["hello world", "world hello hello"])
    config = data_config(source=str(tmp_path / "d.jsonl"), tokenizer=str(tmp_path / "tokenizer.json"))
    batch = take(make_dataset(config, seq_len=8, global_batch_size=2, vocab_size=5), 1)[0]
    assert set(np.unique(batch["inputs"][batch["segment_ids"] > 0])) <= {0, 1, 3, 4}
    with pytest.raises(DataError, match="data.tokenizer: .* has 5 tokens but model.vocab_size=4"):
        make_dataset(config, seq_len=8, global_batch_size=2, vocab_size=4)


def test_clear_errors_for_missing_paths_and_bad_records(tmp_path):
    with pytest.raises(DataError, match="data.source: no file matches .*missing.jsonl"):
        make_dataset(data_config(source=str(tmp_path / "missing.jsonl")), seq_len=SEQ, global_batch_size=2,
                     vocab_size=259)
    with pytest.raises(DataError, match="data.tokenizer: 'bytes' has 259 tokens but model.vocab_size=200"):
        make_dataset(data_config(), seq_len=SEQ, global_batch_size=2, vocab_size=200)
    write_jsonl(tmp_path / "d.jsonl", ["x"], field="content")
    dataset = make_dataset(data_config(source=str(tmp_path / "d.jsonl")), seq_len=SEQ, global_batch_size=2,
                           vocab_size=259)
    with pytest.raises(DataError, match="data.text_field: .* has no field 'text'"):
        take(dataset, 1)
    (tmp_path / "e.csv").write_text("a,b")
    with pytest.raises(DataError, match="data.format: cannot infer"):
        make_dataset(data_config(source=str(tmp_path / "e.csv")), seq_len=SEQ, global_batch_size=2, vocab_size=259)


@pytest.mark.parametrize("name, content, overrides, message", [
    ("empty.txt", b"", {}, r"data.source: .*empty.txt is empty"),
    ("blank.jsonl", b"\n  \n", {}, r"data.source: .*blank.jsonl holds no documents"),
    ("random.jsonl", bytes(range(256)) * 4, {}, r"data.source: .*random.jsonl line 1 is not valid JSON"),
    ("latin1.txt", "ok\nsecond line caf\xe9\n".encode("latin-1"), {},
     r"data.source: .*latin1.txt line 2: not valid UTF-8"),
    ("text.jsonl", b'{"text": "fine"}\n', {"format": "arrayrecord"},
     r"data.source: .*text.jsonl is not a readable ArrayRecord file"),
    ("d.jsonl", b'{"text": "fine"}\n', {"tokenizer": "TOKENIZER"}, r"data.tokenizer: .*garbage.json' is not a valid"),
])
def test_bad_files_are_one_line_errors_naming_the_file(tmp_path, name, content, overrides, message):
    (tmp_path / name).write_bytes(content)
    (tmp_path / "garbage.json").write_bytes(b"\x00\xff not a tokenizer \xfe")
    overrides = {key: str(tmp_path / "garbage.json") if value == "TOKENIZER" else value
                 for key, value in overrides.items()}
    with pytest.raises(DataError, match=message) as error:
        take(make_dataset(data_config(source=str(tmp_path / name), **overrides), seq_len=SEQ, global_batch_size=2,
                          vocab_size=259), 1)
    assert "\n" not in str(error.value)


# ------------------------------------------------------------------------------------------------------------------
# Supervised fine-tuning records


def learned_targets(batch, row):
    """The target ids of one row that the loss learns, split at segment boundaries: {segment id: [ids]}."""
    learned = {}
    for index in np.flatnonzero(batch["loss_mask"][row] > 0):
        learned.setdefault(int(batch["segment_ids"][row, index]), []).append(int(batch["targets"][row, index]))
    return learned


def test_prompt_completion_records_learn_only_the_completion_and_stay_packed(tmp_path, rng):
    pairs = [(f"q{i} {'x' * int(rng.integers(1, 9))}?", f"answer {i}") for i in range(30)]
    (tmp_path / "sft.jsonl").write_text("".join(json.dumps({"prompt": p, "completion": c}) + "\n" for p, c in pairs))
    config = data_config(source=str(tmp_path / "sft.jsonl"))
    tokenizer = ByteTokenizer()
    for batch in take(make_dataset(config, seq_len=SEQ, global_batch_size=2, vocab_size=259), 3):
        check_packed_batch_structure(batch)
        assert batch["segment_ids"].max() > 1, "packing keeps several records per row"
        for row in range(2):
            for segment, ids in learned_targets(batch, row).items():
                where = batch["segment_ids"][row] == segment
                text = tokenizer.decode(batch["inputs"][row][where])  # BOS + prompt + completion
                assert ids[-1] == tokenizer.eos_id, "the EOS after the completion is learned"
                completion = tokenizer.decode(ids[:-1])
                assert (text[text.index("?") + 1:], completion) in {(c, c) for _, c in pairs}, (text, completion)


CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + ' ' + m['content'] + ' <|im_end|> ' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant ' }}{% endif %}")


def chat_tokenizer(directory, template=CHATML):
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["[UNK]", "<|im_start|>", "<|im_end|>", "user", "assistant", "system", "hi", "hello", "there", "how",
             "are", "you", "fine", "thanks", "be", "brief"]  # fmt: skip
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    tokenizer.save(str(directory / "tokenizer.json"))
    config = {"bos_token": None, "eos_token": "<|im_end|>"}
    if template is not None:
        config["chat_template"] = template
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return HFTokenizer(str(directory / "tokenizer.json"))


def test_messages_records_learn_every_assistant_turn_through_the_chat_template(tmp_path):
    tokenizer = chat_tokenizer(tmp_path)
    assert (tokenizer.bos_id, tokenizer.eos_id) == (None, 2)
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "hello there"}, {"role": "user", "content": "how are you"},
                {"role": "assistant", "content": "fine thanks"}]  # fmt: skip
    (tmp_path / "chat.jsonl").write_text(json.dumps({"messages": messages}) + "\n")
    config = data_config(source=str(tmp_path / "chat.jsonl"), tokenizer=str(tmp_path / "tokenizer.json"),
                         packing=False)  # fmt: skip
    batch = take(make_dataset(config, seq_len=SEQ, global_batch_size=1, vocab_size=16), 1)[0]
    check_packed_batch_structure(batch)
    learned = learned_targets(batch, 0)[1]
    assert learned == tokenizer.encode("hello there <|im_end|> fine thanks <|im_end|>").tolist()
    mask = batch["loss_mask"][0]
    targets = [tokenizer.decode([t]) for t in batch["targets"][0][mask == 0][: int((batch["segment_ids"] > 0).sum())]]
    assert "how" in targets and "assistant" in targets, "prompt turns and role markup are not learned"


def test_fine_tuning_records_fail_naming_the_problem(tmp_path):
    tokenizer = chat_tokenizer(tmp_path, template=None)
    bad = {"chat.jsonl": ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hi"}]},
                          "data.tokenizer: .*tokenizer.json' has no chat template"),
           "lonely.jsonl": ({"messages": [{"role": "user", "content": "hi"}]}, "has no assistant message to learn"),
           "typed.jsonl": ({"prompt": "hi", "completion": 3}, "field 'completion' is int, not a string"),
           "none.jsonl": ({"question": "hi"}, "data.text_field: .* has no field 'text' \\(nor 'prompt' \\+ "
                                             "'completion', nor 'messages'")}  # fmt: skip
    for name, (record, message) in bad.items():
        (tmp_path / name).write_text(json.dumps(record) + "\n")
        config = data_config(source=str(tmp_path / name), tokenizer=tokenizer.name)
        with pytest.raises(DataError, match=message):
            take(make_dataset(config, seq_len=SEQ, global_batch_size=1, vocab_size=16), 1)


# ------------------------------------------------------------------------------------------------------------------
# Held-out documents


def segment_texts(batches):
    tokenizer = ByteTokenizer()
    return [tokenizer.decode(row[seg == s]) for b in batches for row, seg in zip(b["inputs"], b["segment_ids"],
            strict=True) for s in np.unique(seg[seg > 0])]  # fmt: skip


def test_held_out_fraction_never_reaches_training(tmp_path):
    texts = [f"document {i} " + "x" * i for i in range(50)]
    write_jsonl(tmp_path / "d.jsonl", texts)
    config = data_config(source=str(tmp_path / "d.jsonl"), eval_fraction=0.2, packing=False)
    trained = set(segment_texts(take(make_dataset(config, seq_len=SEQ, global_batch_size=4, vocab_size=259), 40)))
    held_out = segment_texts(make_dataset(config, seq_len=SEQ, global_batch_size=2, vocab_size=259, held_out=True))
    assert len(held_out) == 10 == len(set(held_out)), "read once: the 10 held-out documents, each once"
    assert trained and set(held_out) <= set(texts) and not trained & set(held_out)
    assert len(trained) == 40, "every other document is trained on"
    again = segment_texts(make_dataset(config, seq_len=SEQ, global_batch_size=2, vocab_size=259, held_out=True))
    assert again == held_out, "a seeded, fixed split"
    with pytest.raises(DataError, match=r"data.eval_fraction=0.01 of the 50 documents .* leaves 0 held out"):
        make_dataset(data_config(source=str(tmp_path / "d.jsonl"), eval_fraction=0.01), seq_len=SEQ,
                     global_batch_size=2, vocab_size=259)  # fmt: skip


def test_synthetic_held_out_examples_follow_the_training_documents(tmp_path):
    config = data_config(num_default_documents=30, packing=False)
    held_out = take(make_dataset(config, seq_len=SEQ, global_batch_size=2, vocab_size=259, held_out=True), 2)
    assert segment_texts(held_out) == [synthetic.example(0, 30 + i).text for i in range(4)]
    write_jsonl(tmp_path / "e.jsonl", ["held out"])
    files = data_config(eval_source=str(tmp_path / "e.jsonl"))
    assert segment_texts(make_dataset(files, seq_len=SEQ, global_batch_size=1, vocab_size=259, held_out=True)) == [
        "held out"]  # fmt: skip
    with pytest.raises(DataError, match="data.eval_source: no file matches"):
        make_dataset(data_config(eval_source=str(tmp_path / "none.jsonl")), seq_len=SEQ, global_batch_size=1,
                     vocab_size=259, held_out=True)  # fmt: skip
