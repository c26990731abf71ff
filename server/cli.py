"""The `palm-serve` command: `convert` a reference checkpoint, `serve` a model, run a
tensor-parallel rank of another node's server (`tp-worker`)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .settings import Settings

SETTINGS_FIELDS = tuple(Settings.model_fields)


def add_settings_flags(parser: argparse.ArgumentParser) -> None:
    """One --flag per Settings field; absent flags stay absent, so the environment (or the
    default) applies. Values are parsed and checked by Settings itself."""
    for name, field in Settings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        default = field.get_default(call_default_factory=True, validated_data={})
        help = f"{field.description} (env PALM_{name.upper()}, default: {default})"
        if field.annotation is bool:
            parser.add_argument(
                flag,
                dest=name,
                action=argparse.BooleanOptionalAction,
                default=argparse.SUPPRESS,
                help=help,
            )
        else:
            parser.add_argument(
                flag, dest=name, default=argparse.SUPPRESS, help=help, metavar=name.upper()
            )


def _convert(args: argparse.Namespace) -> int:
    from ..model.checkpoint import CheckpointError
    from ..model.convert import LAYOUTS, convert_state_dict, read_checkpoint
    from ..model.quantization import quantize_state
    from ..model.weights import save_model_dir

    overrides = {}
    if args.config:
        try:
            overrides = json.loads(Path(args.config).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            print(f"error: --config {args.config}: {exc}", file=sys.stderr)
            return 2
    if args.layout not in LAYOUTS:
        print(f"error: --from must be one of {', '.join(LAYOUTS)}", file=sys.stderr)
        return 2
    try:
        state = read_checkpoint(args.src)
        config, ours = convert_state_dict(state, args.layout, progress=True, **overrides)
        if args.quantization == "int8":
            ours = quantize_state(ours)
        save_model_dir(args.dst, config, ours)
    except CheckpointError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.tokenizer:
        (Path(args.dst) / "tokenizer.json").write_bytes(Path(args.tokenizer).read_bytes())
    print(f"wrote {args.dst}: {config.depth} layers, dim {config.dim}, vocab {config.vocab_size}")
    return 0


def _serve(args: argparse.Namespace) -> int:
    from .serve import serve

    given = {k: v for k, v in vars(args).items() if k in SETTINGS_FIELDS}
    return serve(given)


def _tp_worker(args: argparse.Namespace) -> int:
    import logging

    from ..engine.tp_worker import run_external_worker

    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s tp-worker: %(message)s"
    )
    if args.master_port is None:
        print("error: --master-port (or MASTER_PORT) is required", file=sys.stderr)
        return 2
    return run_external_worker(
        args.rank,
        args.model,
        f"{args.master_addr}:{args.master_port}",
        args.start_timeout,
        args.local_device,
    )


def add_tp_worker_parser(commands: argparse._SubParsersAction) -> None:
    worker = commands.add_parser(
        "tp-worker",
        help="run one tensor-parallel rank for a server on another node",
        description="Rank R of a `palm-serve serve --tensor-parallel-size N --tp-local-ranks "
        "K` server (K <= R < N): loads its shard of the same model, meets rank 0 at "
        "MASTER_ADDR:MASTER_PORT and runs its steps. Exits 1 when the group fails (its "
        "supervisor restarts it; it then waits for rank 0 again), 0 when rank 0 stops.",
    )
    env = os.environ.get
    worker.add_argument(
        "--rank",
        type=int,
        required="RANK" not in os.environ,
        default=env("RANK"),  # argparse applies type= to a string default
        help="this rank (env RANK)",
    )
    worker.add_argument(
        "--model",
        default=env("PALM_MODEL"),
        required="PALM_MODEL" not in os.environ,
        help="the model directory on this node, the same model as rank 0's (env PALM_MODEL)",
    )
    worker.add_argument(
        "--master-addr",
        default=env("MASTER_ADDR", "127.0.0.1"),
        help="rank 0's host (env MASTER_ADDR)",
    )
    worker.add_argument(
        "--master-port",
        type=int,
        default=env("MASTER_PORT"),
        help="rank 0's rendezvous port (env MASTER_PORT)",
    )
    worker.add_argument(
        "--start-timeout",
        type=float,
        default=600.0,
        help="seconds to wait for rank 0 to listen (default 600)",
    )
    worker.add_argument(
        "--local-device",
        type=int,
        default=env("LOCAL_RANK", "0"),
        help="on CUDA: this node's GPU index (env LOCAL_RANK, default 0)",
    )
    worker.add_argument("--log-level", default="info", help="default info")
    worker.set_defaults(func=_tp_worker)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="palm-serve", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    convert = commands.add_parser("convert", help="convert a reference PaLM checkpoint")
    convert.add_argument("src", help="a .pt state dict written by the reference package")
    convert.add_argument("dst", help="the model directory to write")
    convert.add_argument(
        "--from", dest="layout", required=True, help="palm-pytorch or palm-rlhf-pytorch"
    )
    convert.add_argument(
        "--config",
        help="JSON file of config fields the weights cannot tell (max_positions, "
        "xpos_scale_base, eos_token_id, ...)",
    )
    convert.add_argument("--tokenizer", help="a tokenizer.json to copy beside the weights")
    convert.add_argument(
        "--quantization",
        choices=["none", "int8"],
        default="none",
        help="int8: write the blocks' linears as int8 + per-channel scales (a quarter of "
        "their bytes); the model then loads without its fp32 weights",
    )
    convert.set_defaults(func=_convert)
    serve = commands.add_parser(
        "serve",
        help="serve a model over HTTP",
        description="Serve a model over HTTP. Every option is also a PALM_* environment "
        "variable of the same name (--max-num-seqs / PALM_MAX_NUM_SEQS); a flag wins.",
    )
    add_settings_flags(serve)
    serve.set_defaults(func=_serve)
    add_tp_worker_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
