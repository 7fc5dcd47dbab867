"""Long documents stream through the data pipeline: bounded memory, the same batches as whole-document reading,
exact resume inside a document, and a JSON field scanner that agrees with json.loads."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from support import REPO
from test_data import data_config, take, write_jsonl

from ring_jax.data import sources
from ring_jax.data.errors import DataError
from ring_jax.data.json_stream import string_field_pieces
from ring_jax.data.pipeline import make_dataset

SEQ = 48


def _chunks(data: bytes, size: int):
    for start in range(0, len(data), size):
        yield data[start : start + size]


def _random_text(rng: random.Random, length: int) -> str:
    alphabet = 'ab cd\n\t"\\/é中😀\x01{}[],:'
    return "".join(rng.choice(alphabet) for _ in range(length))


def test_json_field_scanner_agrees_with_json_loads():
    seed = random.randrange(2**31)
    rng = random.Random(seed)
    for trial in range(60):
        text = _random_text(rng, rng.choice([0, 1, 9, 300, 70000]))
        record = {"meta": {"x": [1, "}", {"q": '\\"'}], "y": -2.5e-3}, "text": text, "z": [None, True, False]}
        if trial % 3 == 0:
            record = {"text": text}
        for ensure_ascii in (True, False):
            line = json.dumps(record, ensure_ascii=ensure_ascii).encode()
            chunk = rng.choice([1, 3, 7, 4096, 1 << 16])
            got = "".join(string_field_pieces(_chunks(line, chunk), "text", "f line 1"))
            assert got == json.loads(line)["text"], f"seed {seed}, trial {trial}, chunk {chunk}"


@pytest.mark.parametrize(
    "line, message",
    [
        (b'{"text": "abc', "not valid JSON: unterminated string"),
        (b'{"text": 1}', "field 'text' is number, not a string"),
        (b"[1, 2]", "not valid JSON: expected a JSON object"),
        (b'{"text": "a"} trailing', "not valid JSON: data after the object"),
        (b'{"other": "a"}', "has no field 'text'"),
        (b'{"text": "\xff\xfe"}', "undecodable text"),
        (b'{"text": "a\x01"}', "not valid JSON: bad character in a string"),
        (b'{"a": 1 "text": "b"}', "not valid JSON: expected ',' or '}'"),
        (b"\x89PNG\r\n\x1a\n", "not valid JSON: expected a JSON object"),
    ],
)
def test_json_field_scanner_errors_name_the_line(line, message):
    with pytest.raises(DataError, match="f.jsonl line 3") as error:
        list(string_field_pieces(_chunks(line, 2), "text", "f.jsonl line 3"))
    assert message in str(error.value) and "\n" not in str(error.value)


def test_jsonl_line_index_handles_blank_lines_crlf_and_block_edges(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "_INDEX_READ_BYTES", 7)  # lines straddle many read blocks
    lines = [b'{"text": "one"}', b"", b"  \t", b'{"text": "two"}\r', b"", b'{"text": "three"}']
    (tmp_path / "d.jsonl").write_bytes(b"\n".join(lines))  # no newline after the last line
    source = sources.JsonlSource(str(tmp_path / "d.jsonl"), "text")
    assert [source[i].where.rsplit(" ", 1)[1] for i in range(len(source))] == ["1", "4", "6"]
    assert ["".join(source[i].read()) for i in range(len(source))] == ["one", "two", "three"]


def _long_documents(tmp_path) -> str:
    rng = random.Random(0)
    texts = [_random_text(rng, n).replace("\x01", "") for n in (5, 3000, 40, 1200, 0, 700)]
    write_jsonl(tmp_path / "a.jsonl", texts)
    (tmp_path / "b.txt").write_text("word " * 900 + "tail")
    return f"{tmp_path / 'a.jsonl'},{tmp_path / 'b.txt'}"


def test_pieces_give_the_same_batches_as_whole_documents(tmp_path, monkeypatch):
    """Tiny read blocks, pieces and a tiny whole-line limit (every line streamed) change nothing in the batches."""
    config = data_config(source=_long_documents(tmp_path))
    whole = take(make_dataset(config, seq_len=SEQ, global_batch_size=4, vocab_size=259), 12)
    monkeypatch.setattr(sources, "PIECE_CHARS", 13)
    monkeypatch.setattr(sources, "_READ_BYTES", 5)
    monkeypatch.setattr(sources, "WHOLE_LINE_BYTES", 8)
    pieces = take(make_dataset(config, seq_len=SEQ, global_batch_size=4, vocab_size=259), 12)
    for a, b in zip(whole, pieces, strict=True):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])


def _find(state, key):
    if isinstance(state, dict):
        if key in state:
            return state[key]
        return next((found for value in state.values() if (found := _find(value, key)) is not None), None)
    return None


def test_resume_inside_a_long_document_is_exact(tmp_path):
    config = data_config(source=_long_documents(tmp_path))
    straight = take(make_dataset(config, seq_len=SEQ, global_batch_size=2, vocab_size=259), 30)
    iterator = iter(make_dataset(config, seq_len=SEQ, global_batch_size=2, vocab_size=259))
    for _ in range(17):
        next(iterator)
    state = json.loads(json.dumps(iterator.get_state()))
    assert _find(state, "windows_done") > 0, "the saved position should be inside a document"
    resumed = iter(make_dataset(config, seq_len=SEQ, global_batch_size=2, vocab_size=259))
    resumed.set_state(state)
    for expected in straight[17:]:
        got = next(resumed)
        for key in expected:
            np.testing.assert_array_equal(got[key], expected[key])


_RSS_SCRIPT = textwrap.dedent("""
    import gc, json, sys
    from ring_jax.data.pipeline import make_dataset
    from ring_jax.train.config import training_defaults

    def status(key):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(key)) / 1024

    config = training_defaults()["data"]
    config.update(source=sys.argv[1])
    batches = iter(make_dataset(config, seq_len=8192, global_batch_size=2, vocab_size=259))
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets the peak RSS (VmHWM) to the current RSS
    before, tokens = status("VmRSS"), 0
    while tokens < int(sys.argv[2]):
        tokens += int(next(batches)["loss_mask"].sum())
    print(json.dumps({"peak_growth_mb": status("VmHWM") - before, "tokens": tokens}))
""")


def test_a_2mb_jsonl_line_streams_in_bounded_memory(tmp_path):
    """The whole 2 MB line goes through tokenization and packing; the peak RSS grows by a few MB (whole-line
    tokenization and windowing used to cost about 2 GB here)."""
    if not os.access("/proc/self/clear_refs", os.W_OK):
        pytest.skip("needs Linux /proc/self/clear_refs to reset the peak RSS")
    text = ("lorem ipsum dolor sit amet " * 80_000)[:2_000_000]
    (tmp_path / "long.jsonl").write_text(json.dumps({"id": 1, "text": text}) + "\n")
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}
    result = subprocess.run(
        [sys.executable, "-c", _RSS_SCRIPT, str(tmp_path / "long.jsonl"), str(len(text))],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    assert measured["tokens"] >= len(text)
    assert measured["peak_growth_mb"] < 48, measured


def test_a_document_of_empty_texts_is_skipped_and_an_all_empty_source_is_an_error(tmp_path):
    write_jsonl(tmp_path / "mixed.jsonl", ["", "real text", "", "more"])
    batch = take(
        make_dataset(
            data_config(source=str(tmp_path / "mixed.jsonl"), packing=False),
            seq_len=SEQ,
            global_batch_size=4,
            vocab_size=259,
        ),
        1,
    )[0]
    lengths = batch["segment_ids"].sum(axis=1)
    assert lengths.min() > 1, "no row is a BOS -> EOS pair from an empty document"

    write_jsonl(tmp_path / "sparse.jsonl", ["", "", "", "", "", "x y"])  # 5 empty documents per epoch of 6
    take(
        make_dataset(
            data_config(source=str(tmp_path / "sparse.jsonl"), packing=False),
            seq_len=SEQ,
            global_batch_size=2,
            vocab_size=259,
        ),
        40,
    )  # 80 epochs: never mistaken for an empty source

    write_jsonl(tmp_path / "empty.jsonl", ["", "", ""])
    dataset = make_dataset(
        data_config(source=str(tmp_path / "empty.jsonl")), seq_len=SEQ, global_batch_size=2, vocab_size=259
    )
    with pytest.raises(DataError, match="none of the 3 documents of .*empty.jsonl.* has any text"):
        take(dataset, 1)


def test_every_batch_is_checked_and_the_error_names_the_document(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    tokenizer = Tokenizer(models.WordLevel({"[UNK]": 0, "fine": 1, "bad": 9}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(str(tmp_path / "tokenizer.json"))  # 3 tokens, but the id of 'bad' is 9
    write_jsonl(tmp_path / "d.jsonl", ["fine fine"] * 60 + ["fine bad"])
    config = data_config(source=str(tmp_path / "d.jsonl"), tokenizer=str(tmp_path / "tokenizer.json"), shuffle_seed=1)
    iterator = iter(make_dataset(config, seq_len=8, global_batch_size=2, vocab_size=4))
    next(iterator)  # the first batch is fine: the bad document comes later
    with pytest.raises(DataError, match=r"token id 9 of .*d.jsonl line 61 is outside \[0, model.vocab_size=4\)"):
        for _ in range(200):
            next(iterator)
