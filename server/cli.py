"""The `palm-serve` command: `convert` a reference checkpoint, `serve` a model."""

from __future__ import annotations

import argparse
import json
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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
