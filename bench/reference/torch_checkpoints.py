"""Tiny torch.save files in both formats, for the tests of the NumPy torch reader.

Writes to tests/recipes/reference/:
- `torch_tiny_legacy.pth`: torch.save(..., _use_new_zipfile_serialization=False),
- `torch_tiny_zip.pth`: torch.save(...) (the zip format),
- `torch_tiny_expected.npz`: each tensor by the dotted name the reader gives it
  (bfloat16 ones as float32, which holds them exactly).
The checkpoint has what real ones hold: a module's state dict (an OrderedDict with
`_metadata`), an nn.Parameter, float64/float32/float16/bfloat16/int64/int32/bool
tensors, a 0-d tensor, views that share one storage (a transpose, a slice with an
offset), a list of tensors, and plain values (an int, a string) that the reader
leaves out.

Not part of the test suite, and never run with the project's venv (torch is not a
project dependency). Run once, from the repository root:

    python3 -m venv /tmp/refenv && /tmp/refenv/bin/pip install torch==2.13.0 numpy
    /tmp/refenv/bin/python bench/reference/torch_checkpoints.py
"""

import collections
import os

import numpy as np
import torch

OUT = "tests/recipes/reference"


def checkpoint() -> dict:
    g = torch.Generator().manual_seed(0)
    base = torch.randn(4, 6, generator=g)
    linear = torch.nn.Linear(3, 2)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(2, 3, generator=g))
        linear.bias.copy_(torch.randn(2, generator=g))
    tensors = collections.OrderedDict(
        [
            ("conv.weight", torch.randn(2, 3, 3, 3, generator=g)),
            ("bn.num_batches_tracked", torch.tensor(7)),
            ("half", torch.randn(5, generator=g).half()),
            ("bf16", torch.randn(3, generator=g).bfloat16()),
            ("double", torch.randn(2, 2, generator=g, dtype=torch.float64)),
            ("ints", torch.arange(6, dtype=torch.int32).reshape(2, 3)),
            ("mask", torch.tensor([True, False, True])),
            ("transposed", base.t()),
            ("window", base[1:3, 2:]),
            ("param", torch.nn.Parameter(torch.randn(3, generator=g))),
        ]
    )
    return {
        "state_dict": tensors,
        "linear": linear.state_dict(),
        "history": [torch.tensor([1.0, 2.0]), torch.tensor([3.0])],
        "epoch": 3,
        "name": "tiny",
    }


def flatten(obj, prefix, out):
    if isinstance(obj, torch.Tensor):
        t = obj.detach()
        out[prefix] = (t.float() if t.dtype == torch.bfloat16 else t).numpy().copy()
    elif isinstance(obj, dict):
        for k, v in obj.items():
            flatten(v, f"{prefix}.{k}" if prefix else str(k), out)
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            flatten(v, f"{prefix}.{i}" if prefix else str(i), out)


def main():
    obj = checkpoint()
    torch.save(
        obj,
        os.path.join(OUT, "torch_tiny_legacy.pth"),
        _use_new_zipfile_serialization=False,
    )
    torch.save(obj, os.path.join(OUT, "torch_tiny_zip.pth"))
    expected = {}
    flatten(obj, "", expected)
    np.savez(os.path.join(OUT, "torch_tiny_expected.npz"), **expected)
    print(sorted(expected))


if __name__ == "__main__":
    main()
