"""Generation: left padding changes nothing, greedy = argmax of the full forward, seeded sampling with top-k/top-p,
per-row stop sequences, KV-cache overflow errors, the CLI on a training workdir and on an HF folder."""

from __future__ import annotations

import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.experimental import checkify
from support import jit_forward, randomize_expert_biases, tiny_config

from ring_jax.generate import GenerationConfig, generate
from ring_jax.generate.cli import main as cli_main
from ring_jax.generate.sampling import SamplingParams, allowed_tokens, sample_tokens
from ring_jax.layers.attention import check_cache_room
from ring_jax.model import KVCache, RingLinearModel, left_padding_segments

SEED = 20251
PROMPT_LENGTHS = (5, 8, 3)  # one batch bucket of 8; each prompt alone also buckets to 8
MAX_NEW = 6
VOCAB = 272


def small_config():
    """4 layers, G=2: lightning/softmax/lightning/softmax (softmax in the middle and at the end), one scanned cycle;
    the byte tokenizer's vocabulary."""
    return tiny_config(num_hidden_layers=4, layer_group_size=2, vocab_size=VOCAB)


@pytest.fixture(scope="module")
def model() -> RingLinearModel:
    model = RingLinearModel(small_config(), rngs=nnx.Rngs(SEED))
    randomize_expert_biases(model, seed=SEED)
    return model


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    rng = np.random.default_rng(SEED)
    return [rng.integers(0, VOCAB, n).tolist() for n in PROMPT_LENGTHS]


@pytest.fixture(scope="module")
def greedy(model, prompts):
    return generate(model, prompts, GenerationConfig(max_new_tokens=MAX_NEW, decode_block=4))


def test_padded_rows_generate_what_each_prompt_generates_alone(model, prompts, greedy):
    for row, prompt in enumerate(prompts):
        alone = generate(model, [prompt], GenerationConfig(max_new_tokens=MAX_NEW, decode_block=4))[0]
        np.testing.assert_array_equal(greedy[row].tokens, alone.tokens, err_msg=f"row {row} (seed {SEED})")
    assert all(len(c.tokens) == MAX_NEW and c.finish_reason == "length" for c in greedy)


def test_left_padding_enters_neither_the_lightning_state_nor_the_kv_cache(model, prompts):
    """Prefill of [3 pads + prompt of 5] vs the 5-token prompt alone: same logits, states and cached keys/values."""
    forward = jit_forward(model)
    prompt = jnp.asarray(prompts[0])[None]  # 5 tokens
    padded = jnp.concatenate([jnp.asarray([[7, 11, 13]]), prompt], axis=1)  # padding tokens are arbitrary ids
    both = jnp.concatenate([padded, jnp.asarray(prompts[1])[None]])  # batch of 2, the second row unpadded
    out = forward(both, cache=model.init_cache(2, 10, left_padding=jnp.asarray([3, 0])))
    alone = forward(prompt, cache=model.init_cache(1, 7))
    np.testing.assert_allclose(out.logits[0, 3:], alone.logits[0], rtol=1e-5, atol=1e-5, err_msg=f"seed {SEED}")
    layer_caches = [*out.cache.pre, *out.cache.cycles]
    alone_caches = [*alone.cache.pre, *alone.cache.cycles]
    for padded_cache, alone_cache in zip(layer_caches, alone_caches, strict=True):
        if isinstance(padded_cache, KVCache):  # real tokens sit in slots 3..7 of the padded row
            for padded_kv, alone_kv in zip(padded_cache, alone_cache, strict=True):
                stack = padded_kv.ndim - 4  # leading [num_cycles] axis of a scanned layer
                got = padded_kv[(slice(None),) * stack + (0, slice(3, 8))]
                want = alone_kv[(slice(None),) * stack + (0, slice(0, 5))]
                np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
        else:
            np.testing.assert_allclose(padded_cache[..., 0, :, :, :], alone_cache[..., 0, :, :, :], rtol=1e-5,
                                       atol=1e-6)  # fmt: skip
    # A row whose prompt is all padding so far keeps an exactly zero lightning state.
    only_padding = forward(both[:, :3], cache=model.init_cache(2, 10, left_padding=jnp.asarray([3, 0])))
    states = [c for c in (*only_padding.cache.pre, *only_padding.cache.cycles) if not isinstance(c, KVCache)]
    assert len(states) == 2 and all(float(jnp.abs(s[..., 0, :, :, :]).max()) == 0.0 for s in states)
    assert all(float(jnp.abs(s[..., 1, :, :, :]).max()) > 0.0 for s in states)


def test_greedy_tokens_are_the_argmax_of_the_full_forward(model, prompts, greedy):
    """One no-cache forward of the left-padded prompt + completion rows (padding as segment 0)."""
    sequences = [prompt + completion.tokens.tolist() for prompt, completion in zip(prompts, greedy, strict=True)]
    longest = max(map(len, sequences))
    padding = jnp.asarray([longest - len(s) for s in sequences])
    batch = jnp.asarray([[0] * (longest - len(s)) + s for s in sequences])
    logits = jit_forward(model)(batch, segment_ids=left_padding_segments(padding, longest)).logits
    predicted = np.asarray(jnp.argmax(logits, -1))
    for row, completion in enumerate(greedy):
        np.testing.assert_array_equal(predicted[row, -MAX_NEW - 1 : -1], completion.tokens, err_msg=f"row {row}")


def test_sampling_filters_and_seeds():
    rng = np.random.default_rng(SEED)
    allowed_tokens_, sample_tokens_ = jax.jit(allowed_tokens), jax.jit(sample_tokens)
    probs = np.asarray([0.5, 0.3, 0.15, 0.05], np.float32)
    logits = jnp.log(jnp.asarray(np.tile(probs, (2, 1))))
    params = lambda temperature=1.0, top_k=0, top_p=1.0: SamplingParams(  # traced: one compilation for all
        jnp.float32(temperature), jnp.int32(top_k), jnp.float32(top_p)
    )
    allowed = lambda **kw: np.asarray(allowed_tokens_(logits, params(**kw)))[0].tolist()
    assert allowed(top_p=0.7) == [True, True, False, False]
    assert allowed(top_p=0.85) == [True, True, True, False]
    assert allowed(top_k=1) == [True, False, False, False]
    assert allowed(top_k=3, top_p=0.6) == [True, True, False, False]
    assert allowed() == [True] * 4
    # Draws stay inside the allowed set and follow the renormalised probabilities.
    wide = jnp.asarray(rng.normal(0, 2, (4000, 50)), jnp.float32)
    draws = np.asarray(sample_tokens_(wide, jax.random.key(SEED), params(1.0, 5, 1.0)))
    top5 = np.argsort(-np.asarray(wide), axis=-1)[:, :5]
    assert all(d in row for d, row in zip(draws, top5, strict=True))
    many = jnp.tile(logits[:1], (20000, 1))
    counts = np.bincount(np.asarray(sample_tokens_(many, jax.random.key(1), params(1.0, 0, 0.85))), minlength=4)
    np.testing.assert_allclose(counts / counts.sum(), [0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95, 0.0], atol=0.015)
    same = [np.asarray(sample_tokens_(wide, jax.random.key(3), params(0.7, 0, 0.9))) for _ in range(2)]
    np.testing.assert_array_equal(*same)
    other = np.asarray(sample_tokens_(wide, jax.random.key(4), params(0.7, 0, 0.9)))
    assert (other != same[0]).mean() > 0.2
    greedy = np.asarray(sample_tokens_(wide, jax.random.key(3), params(0.0, 5, 0.5)))
    np.testing.assert_array_equal(greedy, np.argmax(np.asarray(wide), -1))


def test_sampled_generation_is_reproducible_by_seed(model, prompts, greedy):
    config = lambda seed: GenerationConfig(max_new_tokens=MAX_NEW, decode_block=4, temperature=1.5, top_k=20,
                                           seed=seed)  # fmt: skip
    first, again, other = (generate(model, prompts, config(s)) for s in (5, 5, 6))
    for a, b in zip(first, again, strict=True):
        np.testing.assert_array_equal(a.tokens, b.tokens)
    flat = lambda completions: np.concatenate([c.tokens for c in completions])
    assert (flat(first) != flat(other)).any() and (flat(first) != flat(greedy)).any()


def test_each_row_stops_at_its_own_stop_sequence(model, prompts, greedy):
    single = int(greedy[0].tokens[2])  # row 0 must stop after 3 tokens (or earlier, at the same token)
    pair = tuple(int(t) for t in greedy[1].tokens[3:5])  # a two-token stop for row 1
    stops = ((single,), pair)
    out = generate(model, prompts, GenerationConfig(max_new_tokens=MAX_NEW, decode_block=4, stop_sequences=stops))
    for row, completion in enumerate(out):
        reference = greedy[row].tokens.tolist()
        ends = [i + len(s) for s in stops for i in range(MAX_NEW) if tuple(reference[i : i + len(s)]) == s]
        end = min(ends, default=MAX_NEW)
        assert completion.tokens.tolist() == reference[:end], f"row {row}"
        assert completion.finish_reason == ("stop" if ends else "length")
        assert len(completion.content) == end - len(completion.stop)
    assert out[0].finish_reason == "stop" and len(out[0].tokens) <= 3


def test_kv_cache_refuses_to_overflow(model, prompts):
    forward = jit_forward(model)
    tokens = jnp.asarray(np.random.default_rng(SEED).integers(0, VOCAB, (1, 14)))
    with pytest.raises(ValueError, match="14 tokens do not fit a cache of max_length=8"):
        forward(tokens, cache=model.init_cache(1, 8))  # a prefill longer than the cache: before compiling
    with pytest.raises(ValueError, match="6 cached \\+ 3 new tokens exceed max_length=8"):
        check_cache_room(8, jnp.int32(6), 3)  # a concrete cache length is checked eagerly
    check_cache_room(8, jnp.int32(5), 3)

    graphdef, state = nnx.split(model)

    def step(state, token, cache):
        out = nnx.merge(graphdef, state, copy=True).forward(token, cache=cache)
        return out.cache

    checked = jax.jit(checkify.checkify(step, errors=checkify.user_checks))
    cache = model.init_cache(1, 8)._replace(length=jnp.int32(8))  # full
    error, _ = checked(state, tokens[:, :1], cache)
    with pytest.raises(checkify.JaxRuntimeError, match="KV cache overflow: 8 cached \\+ 1 new tokens"):
        error.throw()
    error, _ = checked(state, tokens[:, :1], cache._replace(length=jnp.int32(7)))
    error.throw()  # one slot left: no error
    with pytest.raises(ValueError, match="prompt 1: 8 tokens \\+ max_new_tokens 58 = 66 exceeds max_length 64"):
        generate(model, prompts, GenerationConfig(max_new_tokens=58, max_length=64))


def test_bad_generation_arguments_name_the_field(model, prompts):
    cases = [
        (GenerationConfig(top_p=0.0), "top_p"),
        (GenerationConfig(temperature=-1.0), "temperature"),
        (GenerationConfig(max_new_tokens=0), "max_new_tokens"),
        (GenerationConfig(stop_sequences=((VOCAB,),)), "stop_sequences"),
    ]
    for config, field in cases:
        with pytest.raises(ValueError, match=f"^{field}: "):
            generate(model, prompts, config)
    with pytest.raises(ValueError, match="prompt 1: token ids must be in"):
        generate(model, [[1, 2], [3, VOCAB]])
    with pytest.raises(ValueError, match="prompt 0: empty"):
        generate(model, [[]])


# ----------------------------------------------------------------------------------------------------------------
# The CLI on a training workdir and on an HF folder.


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A training workdir as train.py leaves it (config.json + an Orbax checkpoint), saved without training steps."""
    from support import tiny_train_config as tiny_training_config

    from ring_jax.data.pipeline import make_dataset
    from ring_jax.sharding import make_mesh
    from ring_jax.train.checkpoint import Checkpointer
    from ring_jax.train.optim import make_optimizer
    from ring_jax.train.run_config import save_config
    from ring_jax.train.state import StateFactory, validate

    path = str(tmp_path_factory.mktemp("workdir"))
    config = tiny_training_config()  # configs/default.py's architecture at toy sizes (3 layers, unrolled)
    model_config = validate(config)
    tx, _ = make_optimizer(config.optim, config.train.steps)
    factory = StateFactory(model_config, tx, make_mesh(config.mesh, use_all=True), seed=SEED)
    state = factory.init()
    rng = np.random.default_rng(SEED)
    state = state.replace(expert_bias=jax.tree.map(lambda b: b + rng.normal(0, 0.3, b.shape).astype(np.float32),
                                                   state.expert_bias))  # fmt: skip
    data = make_dataset(config.data, seq_len=config.train.seq_len, global_batch_size=config.train.batch_size,
                        vocab_size=model_config.vocab_size)  # fmt: skip
    save_config(config, path)
    checkpointer = Checkpointer(os.path.join(path, "checkpoints"), every_n_steps=1, keep=3)
    for step in (3, 4):
        checkpointer.save(step, state, iter(data))
    checkpointer.close()
    return path, state


def test_restore_params_reads_only_the_weights(workdir, tmp_path):
    from ring_jax.train.checkpoint import restore_params

    path, state = workdir
    restored = restore_params(path)
    assert restored.step == 4 and restored.config.model.hidden_size == 32
    for key in ("params", "expert_bias"):
        pairs = zip(jax.tree.leaves(getattr(restored, key)), jax.tree.leaves(getattr(state, key)), strict=True)
        for got, want in pairs:
            np.testing.assert_array_equal(got, want)
    assert restore_params(path, step=3).step == 3
    with pytest.raises(FileNotFoundError, match="no checkpoint of step 7 \\(saved steps: \\[3, 4\\]\\)"):
        restore_params(path, step=7)
    (tmp_path / "config.json").write_text((Path(path) / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        restore_params(str(tmp_path))


def test_cli_generates_from_a_training_workdir(workdir, tmp_path, capsys):
    path, _ = workdir
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("add 1+2=\n\nrev abc>\n")
    code = cli_main(["--workdir", path, "--prompts-file", str(prompts_file), "--prompt", "kv a=1 ?a=",
                     "--max-new-tokens", "5", "--temperature", "0.8", "--top-k", "5", "--stop", "\\n"])  # fmt: skip
    captured = capsys.readouterr()
    assert code == 0, captured.err
    for row, prompt in enumerate(("kv a=1 ?a=", "add 1+2=", "rev abc>")):
        assert f"--- [{row}] {prompt}\n" in captured.out
    assert "3 rows" in captured.err


def test_single_prompt_streams_and_holds_back_a_possible_stop():
    """The CLI printer on a byte tokenizer: text appears block by block; a stop sequence is never printed."""
    import io

    from ring_jax.data.tokenizers import ByteTokenizer
    from ring_jax.generate.cli import StreamPrinter
    from ring_jax.generate.engine import FINISHED, Completion

    out = io.StringIO()
    printer = StreamPrinter(ByteTokenizer(), ["p"], holdback=2, out=out)
    text = list(b"ab\xc3\xa9cd")  # "abécd": é is two bytes
    printer.update(np.asarray([text[:3]]), np.asarray([False]))  # "ab" + half of é: 2 tokens held back
    assert out.getvalue() == "a"
    printer.update(np.asarray([text[:5]]), np.asarray([False]))  # "ab" + half of é (+ 2 held back)
    assert out.getvalue() == "ab"
    printer.update(np.asarray([text[:6]]), np.asarray([False]))
    assert out.getvalue() == "ab\u00e9"
    stop = tuple(b"XY")
    printer.update(np.asarray([text + list(stop) + [FINISHED]]), np.asarray([True]))
    printer.finish([Completion(np.asarray(text + list(stop)), "stop", stop)])
    assert out.getvalue() == "ab\u00e9cd\n"


def test_cli_generates_from_an_hf_folder_with_its_tokenizer(model, tmp_path, capsys):
    from tokenizers import Tokenizer, models, pre_tokenizers

    import ring_jax

    hf = tmp_path / "hf"
    ring_jax.to_hf(model, hf, progress=False)
    vocab = {w: i for i, w in enumerate(["<unk>", "</s>", *(f"w{i}" for i in range(40))])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    code = cli_main(["--hf", str(hf), "--prompt", "w1 w2 w3", "--max-new-tokens", str(MAX_NEW)])
    assert code == 2 and "no tokenizer.json" in capsys.readouterr().err
    tokenizer.save(str(hf / "tokenizer.json"))
    assert cli_main(["--hf", str(hf), "--prompt", "w1 w2 w3", "--max-new-tokens", str(MAX_NEW)]) == 0
    captured = capsys.readouterr()
    assert "1 rows, " in captured.err and captured.out.strip()  # words of the WordLevel vocabulary


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert cli_main(["--workdir", str(tmp_path), "--prompt", "x"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "config.json" in err and err.count("\n") == 1


def test_decode_updates_the_kv_cache_in_place():
    """decode_block's temporaries stay well below one copy of the cache: the scanned layers write their cache
    entries back into the donated stack (once, as scan inputs and outputs, they needed a second full-size buffer:
    the softmax baseline then did not fit batch 64 at 32K on an H200)."""
    from ring_jax.generate.engine import decode_block, start_decode, stop_array

    model = RingLinearModel(tiny_config(attention_layout="softmax", max_position_embeddings=8192), rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    cache = jax.eval_shape(lambda: model.init_cache(8, 8192))
    logits = jax.ShapeDtypeStruct((8, model.config.vocab_size), jnp.float32)
    decode = jax.eval_shape(lambda c, x: start_decode(c, x, 4, stop_array(())), cache, logits)
    stops = jnp.asarray(stop_array(()))
    lowered = decode_block.lower(graphdef, state, decode, stops, SamplingParams(), jax.random.key(0), block=2)
    analysis = lowered.compile().memory_analysis()
    cache_bytes = sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(cache))
    assert analysis.alias_size_in_bytes >= cache_bytes  # donated: the output cache is the input's buffer
    assert analysis.temp_size_in_bytes < 0.5 * cache_bytes, (analysis.temp_size_in_bytes, cache_bytes)
