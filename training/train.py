"""Train the default model: a small PaLM of our own architecture on the King James Bible.

    python -m training.train --out model/default            # see MODEL_CARD.md
    python -m training.train --out model/default --resume   # after an interruption

The model is palm_serve.model.PaLM trained through forward_dense, which shares every
weight with the paged serving forward. The tokenizer is a byte-level BPE trained by the
`tokenizers` library on the training split, with <|endoftext|> as EOS. It lives beside the
served packages, not in them (serving never imports it), and runs from the repository
root; it imports nothing above the model layer and runs nothing on import."""

from __future__ import annotations

import argparse
import gzip
import json
import math
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer as HFTokenizerModel
from tokenizers import decoders, models, pre_tokenizers, trainers
from tqdm import tqdm

from palm_serve.model.config import PaLMConfig
from palm_serve.model.palm import PaLM
from palm_serve.model.tokenizer import HFTokenizer
from palm_serve.model.weights import save_model_dir

from .corpus import join_documents, load_debian_kjv, read_documents, split_documents
from .perplexity import dense_nll, encode_documents, unigram_nll

EOS = "<|endoftext|>"
CORPUS_FILE = "kjv.txt.gz"


@dataclass(frozen=True)
class TrainArgs:
    out: str = "model/default"
    work_dir: str = ".train/default"
    corpus: str | None = None  # a documents file (e.g. kjv.txt.gz); default: Debian's package
    vocab_size: int = 4096
    dim: int = 256
    depth: int = 4
    heads: int = 8
    dim_head: int = 32
    ff_mult: int = 4
    max_positions: int = 1024
    context: int = 256
    batch_size: int = 8
    steps: int = 300
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup: int = 40
    weight_decay: float = 0.1
    clip: float = 1.0
    seed: int = 0
    ckpt_every: int = 50
    eval_every: int = 100
    eval_tokens: int = 8192
    threads: int = 2
    resume: bool = False
    stop_after: int = 0  # > 0: stop after this step's checkpoint (resume later)


def train_tokenizer(documents: list[str], vocab_size: int, path: Path) -> HFTokenizer:
    """Byte-level BPE, saved to path; the special EOS token gets id 0."""
    model = HFTokenizerModel(models.BPE())
    model.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    model.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    model.train_from_iterator(documents, trainer=trainer)
    model.save(str(path))
    return HFTokenizer.from_file(path)


def load_corpus(path: str | None) -> list[str]:
    if path is None:
        return load_debian_kjv()
    return read_documents(path)


def lr_at(step: int, args: TrainArgs) -> float:
    """Linear warmup, then cosine decay to min_lr_ratio * lr at the last step."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return args.lr * (args.min_lr_ratio + (1 - args.min_lr_ratio) * cosine)


def sample_batch(stream: torch.Tensor, step: int, args: TrainArgs) -> torch.Tensor:
    """[B, context + 1] random windows; a generator per step makes resumed runs identical."""
    gen = torch.Generator().manual_seed(args.seed * 1_000_003 + step)
    starts = torch.randint(0, len(stream) - args.context - 1, (args.batch_size,), generator=gen)
    return torch.stack([stream[s : s + args.context + 1] for s in starts.tolist()])


def make_optimizer(model: PaLM, args: TrainArgs) -> torch.optim.AdamW:
    # Decay matrices (the tied embedding included), not the LayerNorm gains.
    decay = [p for p in model.parameters() if p.dim() >= 2]
    keep = [p for p in model.parameters() if p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": args.weight_decay},
        {"params": keep, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95))


def save_checkpoint(path: Path, model: PaLM, opt: torch.optim.Optimizer, state: dict) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), **state}, tmp)
    tmp.replace(path)  # atomic: an interrupted save never leaves a half-written checkpoint


def _truncate_log(path: Path, step: int) -> None:
    """Drop log records past the checkpoint: the resumed run writes them again."""
    if path.is_file():
        lines = path.read_text().splitlines(keepends=True)
        path.write_text("".join(x for x in lines if json.loads(x)["step"] <= step))


def train_loop(model: PaLM, stream: torch.Tensor, held: list[int], args: TrainArgs) -> dict:
    work = Path(args.work_dir)
    ckpt_path, log_path = work / "checkpoint.pt", work / "log.jsonl"
    opt = make_optimizer(model, args)
    state = {"step": 0, "elapsed": 0.0}
    if args.resume and ckpt_path.is_file():
        saved = torch.load(ckpt_path, weights_only=True)
        model.load_state_dict(saved.pop("model"))
        opt.load_state_dict(saved.pop("optimizer"))
        state = saved
        _truncate_log(log_path, state["step"])
    start_time = time.monotonic() - state["elapsed"]
    end = min(args.steps, args.stop_after or args.steps)
    bar = tqdm(range(state["step"], end), initial=state["step"], total=args.steps)
    with log_path.open("a") as log:
        for step in bar:
            for group in opt.param_groups:
                group["lr"] = lr_at(step, args)
            batch = sample_batch(stream, step, args)
            logits = model.forward_dense(batch[:, :-1])
            loss = F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
            opt.step()
            record = {
                "step": step + 1,
                "loss": round(loss.item(), 4),
                "lr": lr_at(step, args),
                "elapsed": round(time.monotonic() - start_time, 1),
            }
            if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
                model.eval()
                record["heldout_loss"] = round(
                    dense_nll(model, held[: args.eval_tokens], args.context), 4
                )
                model.train()
            bar.set_postfix(loss=f"{record['loss']:.3f}", held=record.get("heldout_loss", ""))
            log.write(json.dumps(record) + "\n")
            log.flush()
            state = {"step": step + 1, "elapsed": record["elapsed"]}
            if (step + 1) % args.ckpt_every == 0 or step + 1 == end:
                save_checkpoint(ckpt_path, model, opt, state)
    return state


def write_outputs(
    args: TrainArgs, model: PaLM, tokenizer: HFTokenizer, docs: dict, streams: dict, state: dict
) -> dict:
    out = Path(args.out)
    save_model_dir(out, model.config, model.state_dict())
    shutil.copyfile(Path(args.work_dir) / "tokenizer.json", out / "tokenizer.json")
    (out / "heldout.txt").write_text(join_documents(docs["heldout"]), encoding="utf-8")
    # The whole corpus, so tests and re-runs need no Debian package (mtime=0: reproducible).
    corpus = join_documents(docs["all"]).encode("utf-8")
    (out / CORPUS_FILE).write_bytes(gzip.compress(corpus, compresslevel=9, mtime=0))
    model.eval()
    model_nll = dense_nll(model, streams["heldout"], args.context)
    base_nll = unigram_nll(streams["train"], streams["heldout"], tokenizer.vocab_size)
    metrics = {
        "parameters": sum(p.numel() for p in model.parameters()),
        "train_tokens_in_split": len(streams["train"]),
        "heldout_tokens": len(streams["heldout"]),
        "tokens_seen": state["step"] * args.batch_size * args.context,
        "steps": state["step"],
        "train_seconds": state["elapsed"],
        "heldout_nll": model_nll,
        "heldout_ppl": math.exp(model_nll),
        "unigram_nll": base_nll,
        "unigram_ppl": math.exp(base_nll),
        "args": asdict(args),
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    all_docs = load_corpus(args.corpus)
    train_docs, held_docs = split_documents(all_docs)
    tok_path = work / "tokenizer.json"
    if args.resume and tok_path.is_file():
        tokenizer = HFTokenizer.from_file(tok_path)
    else:
        tokenizer = train_tokenizer(train_docs, args.vocab_size, tok_path)
    streams = {
        "train": encode_documents(tokenizer, train_docs),
        "heldout": encode_documents(tokenizer, held_docs),
    }
    print(f"train {len(streams['train'])} tokens, held-out {len(streams['heldout'])} tokens")
    config = PaLMConfig(
        vocab_size=tokenizer.vocab_size,
        dim=args.dim,
        depth=args.depth,
        heads=args.heads,
        dim_head=args.dim_head,
        ff_mult=args.ff_mult,
        max_positions=args.max_positions,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(args.seed)
    model = PaLM(config).train()
    print(f"{sum(p.numel() for p in model.parameters()):,} parameters")
    state = train_loop(model, torch.tensor(streams["train"]), streams["heldout"], args)
    if state["step"] < args.steps:
        print(f"stopped after step {state['step']}: continue with --resume")
        return
    docs = {"all": all_docs, "heldout": held_docs}
    metrics = write_outputs(args, model, tokenizer, docs, streams, state)
    print(json.dumps({k: v for k, v in metrics.items() if k != "args"}, indent=2))


def parse_args(argv: list[str] | None) -> TrainArgs:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name, default in asdict(TrainArgs()).items():
        flag = "--" + name.replace("_", "-")
        if isinstance(default, bool):
            parser.add_argument(flag, action="store_true")
        else:
            kind = type(default) if default is not None else str
            parser.add_argument(flag, type=kind, default=default)
    return TrainArgs(**vars(parser.parse_args(argv)))


if __name__ == "__main__":
    main()
