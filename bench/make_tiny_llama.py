"""Create the tiny Llama checkpoint every server in the benchmark loads (bench/peers.py).

Random weights (seeded, ~55M parameters: hidden 512, 8 layers, 8 heads, 2 K/V heads,
intermediate 1408, vocab 32000), fp32 safetensors in Hugging Face's layout, and a
byte-level BPE tokenizer trained here with `tokenizers` on the Python standard library's
sources (offline, deterministic), plus tokenizer_config.json / generation_config.json so
transformers, vLLM and llama.cpp's converter accept the directory.

    .venv/bin/python bench/make_tiny_llama.py [--out bench/.venvs/models/tiny-llama]
"""

from __future__ import annotations

import argparse
import json
import sysconfig
from pathlib import Path

import torch

DEFAULT_OUT = Path(__file__).parent / ".venvs" / "models" / "tiny-llama"
SPECIALS = ["<unk>", "<s>", "</s>"]  # ids 0, 1, 2
SHAPE = dict(
    vocab_size=32000,
    hidden_size=512,
    num_hidden_layers=8,
    num_attention_heads=8,
    num_key_value_heads=2,
    intermediate_size=1408,
    max_position_embeddings=2048,
    rms_norm_eps=1e-6,
    bos_token_id=1,
    eos_token_id=2,
    tie_word_embeddings=False,
)


def stdlib_corpus(max_bytes: int = 6_000_000) -> list[str]:
    """The stdlib's .py files in sorted order, up to max_bytes: same text on any machine
    with the same Python."""
    root = Path(sysconfig.get_paths()["stdlib"])
    texts, total = [], 0
    for path in sorted(root.rglob("*.py")):
        if "site-packages" in path.parts or "test" in path.parts:
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        texts.append(text)
        total += len(text)
        if total >= max_bytes:
            break
    return texts


def train_tokenizer(vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    # GPT-2's byte-level pre-tokenizer (its regex): llama.cpp's converter maps it to "gpt-2".
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(stdlib_corpus(), trainer=trainer)
    return tok


def write_tokenizer_files(out: Path, tok) -> None:
    tok.save(str(out / "tokenizer.json"))
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        # No BOS on encode: every server then sees the same token count for a text prompt.
        "add_bos_token": False,
        "add_eos_token": False,
        "model_max_length": SHAPE["max_position_embeddings"],
        "clean_up_tokenization_spaces": False,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")
    special_map = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    (out / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2) + "\n")


def write_model(out: Path, seed: int) -> int:
    import transformers

    config = transformers.LlamaConfig(**SHAPE)
    config.rope_parameters = {"rope_type": "default", "rope_theta": 10000.0}
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config).float().eval()
    model.save_pretrained(out, safe_serialization=True)
    gen = {"bos_token_id": 1, "eos_token_id": 2, "do_sample": False}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    return sum(p.numel() for p in model.parameters())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true", help="rebuild even if present")
    args = parser.parse_args()
    if (args.out / "model.safetensors").is_file() and not args.force:
        print(f"{args.out} exists (use --force to rebuild)")
        return
    args.out.mkdir(parents=True, exist_ok=True)
    tok = train_tokenizer(SHAPE["vocab_size"])
    n_params = write_model(args.out, args.seed)
    write_tokenizer_files(args.out, tok)  # after save_pretrained, so ours win
    print(f"wrote {args.out}: {n_params / 1e6:.1f}M parameters, vocab {tok.get_vocab_size()}")


if __name__ == "__main__":
    main()
