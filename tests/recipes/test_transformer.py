import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

import lowrank
from recipes.models import Transformer

SMALL = dict(vocab_size=256, context=16, d_model=32, n_layers=2, n_heads=4)

# jitted calls compile faster than the first eager call of a whole model
_fwd = eqx.filter_jit(lambda model, ids, key=None: model(ids, key=key))


def _n_params(model) -> int:
    return sum(x.size for x in jax.tree.leaves(eqx.filter(model, eqx.is_array)))


def _closed_form(*, vocab_size, context, d_model, n_layers, mlp_ratio=4, tied, rotary):
    d, h = d_model, mlp_ratio * d_model
    layer_norms = 2 * (2 * d)  # ln1, ln2: weight + bias
    attention = 4 * (d * d + d)  # q, k, v, o with biases
    mlp = (d * h + h) + (h * d + d)
    embed = vocab_size * d + (0 if rotary else context * d)
    head = 0 if tied else vocab_size * d
    return embed + n_layers * (layer_norms + attention + mlp) + 2 * d + head


@pytest.mark.parametrize("tied,rotary", [(True, False), (False, False), (True, True)])
def test_param_count_matches_closed_form(tied, rotary):
    model = Transformer(**SMALL, tie_embeddings=tied, rotary=rotary, key=jr.key(0))
    expected = _closed_form(
        **{k: v for k, v in SMALL.items() if k != "n_heads"}, tied=tied, rotary=rotary
    )
    assert _n_params(model) == expected
    assert (model.head is None) == tied


def test_shapes_and_hidden_states():
    model = Transformer(**SMALL, key=jr.key(0))
    ids = jnp.arange(10) % 256
    logits, hidden, unembedded, batch = eqx.filter_jit(
        lambda m, ids: (
            m(ids),
            m.hidden_states(ids),
            m.unembed(m.hidden_states(ids)[-1]),
            jax.vmap(m)(jnp.stack([ids, ids[::-1]])),
        )
    )(model, ids)
    assert logits.shape == (10, 256)
    assert hidden.shape == (SMALL["n_layers"] + 1, 10, SMALL["d_model"])
    np.testing.assert_allclose(unembedded, logits, rtol=1e-6)
    assert batch.shape == (2, 10, 256)
    np.testing.assert_allclose(batch[0], logits, rtol=1e-5, atol=1e-6)


def test_untied_head_is_a_linear_with_readable_paths():
    model = Transformer(**SMALL, tie_embeddings=False, key=jr.key(0))
    is_linear = lambda x: isinstance(x, eqx.nn.Linear)
    leaves = jax.tree_util.tree_flatten_with_path(model, is_leaf=is_linear)[0]
    paths = {
        jax.tree_util.keystr(p, simple=True, separator=".") for p, leaf in leaves if is_linear(leaf)
    }
    for name in ["query_proj", "key_proj", "value_proj", "output_proj"]:
        assert f"blocks.1.attn.{name}" in paths
    assert {"blocks.0.mlp.fc1", "blocks.0.mlp.fc2", "head"} <= paths


@pytest.mark.parametrize("rotary", [False, True])
def test_causal_future_tokens_do_not_change_past_logits(rotary):
    model = Transformer(**SMALL, rotary=rotary, key=jr.key(1))
    ids = jr.randint(jr.key(2), (12,), 0, 256)
    changed = ids.at[7:].set((ids[7:] + 1) % 256)
    a, b = _fwd(model, ids), _fwd(model, changed)
    np.testing.assert_allclose(a[:7], b[:7], rtol=1e-5, atol=1e-6)
    assert not np.allclose(a[7:], b[7:])  # the change is visible from position 7 on


def test_rotary_gives_order_information():
    # One layer without position information attends over the prefix as a set:
    # swapping two earlier tokens leaves later logits unchanged. Rotary breaks that.
    # (With more layers the causal mask itself leaks order.)
    one_layer = {**SMALL, "n_layers": 1}
    ids = jr.randint(jr.key(4), (8,), 0, 256)
    swapped = ids.at[0].set(ids[1]).at[1].set(ids[0])
    learned = Transformer(**one_layer, key=jr.key(3))
    no_position = eqx.tree_at(
        lambda m: m.pos_embed.weight, learned, jnp.zeros_like(learned.pos_embed.weight)
    )
    np.testing.assert_allclose(
        _fwd(no_position, ids)[5], _fwd(no_position, swapped)[5], rtol=1e-4, atol=1e-5
    )
    rotary = Transformer(**one_layer, rotary=True, key=jr.key(3))
    assert rotary.pos_embed is None
    assert not np.allclose(_fwd(rotary, ids)[5], _fwd(rotary, swapped)[5], rtol=1e-4, atol=1e-5)


def test_context_length_error():
    model = Transformer(**SMALL, key=jr.key(0))
    with pytest.raises(ValueError, match="sequence length 17 exceeds the model context 16"):
        model(jnp.zeros((17,), jnp.int32))
    with pytest.raises(ValueError, match=r"ids must be one sequence of shape \(T,\)"):
        model(jnp.zeros((2, 4), jnp.int32))


def test_dropout_is_random_in_training_and_off_in_inference_mode():
    model = Transformer(**SMALL, dropout=0.5, key=jr.key(0))
    ids = jnp.arange(8)
    assert not np.allclose(_fwd(model, ids, jr.key(1)), _fwd(model, ids, jr.key(2)))
    frozen = eqx.nn.inference_mode(model)
    np.testing.assert_array_equal(_fwd(frozen, ids), _fwd(frozen, ids, jr.key(5)))


def test_initial_logits_are_near_uniform():
    # Small embeddings: the untrained model's loss is close to log(vocab).
    model = Transformer(**SMALL, key=jr.key(0))
    logp = jax.nn.log_softmax(_fwd(model, jnp.arange(16)), axis=-1)
    assert abs(float(-logp.mean()) - np.log(256.0)) < 0.05


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(d_model=30, n_heads=4), "d_model=30 must be divisible by n_heads=4"),
        (dict(d_model=12, n_heads=4, rotary=True), "rotary=True needs an even head size"),
        (dict(context=0), "context must be a positive int"),
        (dict(dropout=1.0), r"dropout must be in \[0, 1\)"),
    ],
)
def test_bad_hyper_parameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Transformer(**{**SMALL, **kwargs}, key=jr.key(0))


def test_lowrank_factorize_finds_every_projection():
    model = Transformer(**SMALL, tie_embeddings=False, key=jr.key(0))
    low = lowrank.factorize(model, rank=4)
    for block in low.blocks:
        for layer in [
            block.attn.query_proj,
            block.attn.key_proj,
            block.attn.value_proj,
            block.attn.output_proj,
            block.mlp.fc1,
            block.mlp.fc2,
        ]:
            assert isinstance(layer, lowrank.LowRankLinear)
    assert isinstance(low.head, lowrank.LowRankLinear)
    ids = jr.randint(jr.key(2), (12,), 0, 256)
    a, b = _fwd(low, ids), _fwd(low, ids.at[7:].set(0))
    assert a.shape == (12, 256)
    np.testing.assert_allclose(a[:7], b[:7], rtol=1e-5, atol=1e-6)
