"""The ``lorakit`` command: a thin layer over ``lorakit.recipes``.

    lorakit train [--config FILE.yaml] [section.key=value ...]   train (default: MiniLM + Rotten Tomatoes + lora-sb)
    lorakit train --resume RUN_DIR                               continue from RUN_DIR's last checkpoint
    lorakit compare --config FILE.yaml [section.key=value ...]   several methods, same data/seeds/budget
    lorakit export RUN_DIR --format peft|vllm|merged [--out DIR] write a PEFT / vLLM adapter or a merged model
    lorakit eval RUN_DIR [--split test|validation]               evaluate a finished run
    lorakit eval --model NAME_OR_PATH --config FILE.yaml [section.key=value ...]
                                                                 score an untouched model on the config's split

Bad input prints one line ``lorakit: error: ...`` and exits with status 2.
"""

from __future__ import annotations

import argparse
import sys

from lorakit.errors import LorakitError

EXIT_BAD_INPUT = 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lorakit", description="Fine-tune transformers with low-rank adapters.")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train one model; prints the test metric and the run directory")
    train.add_argument("--config", help="YAML config (sections: task, model, data, adapter, optim, train, eval, output)")
    train.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run from its last checkpoint")
    train.add_argument("--quiet", action="store_true", help="no progress bars or messages")
    train.add_argument("overrides", nargs="*", metavar="section.key=value", help="e.g. adapter.method=lora optim.lr=1e-3")
    compare = sub.add_parser("compare", help="compare several methods on the same data, seeds and budget")
    compare.add_argument("--config", required=True, help="YAML compare config (a train config plus a 'compare' section)")
    compare.add_argument("--quiet", action="store_true")
    compare.add_argument("overrides", nargs="*", metavar="section.key=value")
    export = sub.add_parser("export", help="export a finished run as a PEFT adapter or a merged model")
    export.add_argument("run_dir", metavar="RUN_DIR")
    export.add_argument("--format", required=True, choices=("peft", "vllm", "merged"),
                        help="peft: a PEFT LoRA adapter; vllm: one that vLLM serves (refuses what it cannot); merged: a plain model")
    export.add_argument("--out", help="output directory (default RUN_DIR/peft or RUN_DIR/merged); must be new or empty")
    export.add_argument("--overwrite", action="store_true",
                        help="write into a non-empty --out: replace lorakit's files there, keep every other file")
    evaluate = sub.add_parser("eval", help="evaluate a finished run, or (--model) an untouched model on a config's data")
    evaluate.add_argument("targets", nargs="*", metavar="RUN_DIR | section.key=value",
                          help="the run directory; with --model, the config overrides instead")
    evaluate.add_argument("--model", metavar="NAME_OR_PATH", help="evaluate this model as loaded (no adapter, no run directory)")
    evaluate.add_argument("--config", help="with --model: the train config whose task, data and eval settings to use")
    evaluate.add_argument("--split", default="test", choices=("test", "validation"))
    evaluate.add_argument("--quiet", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return _dispatch(args)
    except LorakitError as exc:
        print(f"lorakit: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt as exc:
        run_dir = getattr(exc, "run_dir", None)
        if run_dir is None:
            print("lorakit: interrupted", file=sys.stderr)
        else:
            where = "from its last checkpoint" if getattr(exc, "checkpoint", None) else "from the start (no checkpoint yet)"
            print(f"lorakit: interrupted; `lorakit train --resume {run_dir}` continues it {where}", file=sys.stderr)
        return 130


def _dispatch(args: argparse.Namespace) -> int:
    # imported here so that `lorakit --help` answers at once
    from lorakit.recipes import compare as compare_recipe
    from lorakit.recipes import train as train_recipe
    from lorakit.recipes.config import load_config

    if args.command == "train":
        if args.resume:
            if args.config or args.overrides:
                raise LorakitError("--resume continues a run with its saved config; drop --config and the overrides")
            train_recipe.run(resume=args.resume, quiet=args.quiet)
        else:
            train_recipe.run(load_config(args.config, args.overrides), quiet=args.quiet)
        return 0
    if args.command == "compare":
        rows, _ = compare_recipe.compare(compare_recipe.load_compare_config(args.config, args.overrides), quiet=args.quiet)
        return 1 if any(r.error for r in rows) else 0
    if args.command == "export":
        path = train_recipe.export_run(args.run_dir, args.format, args.out, args.overwrite)
        print(f"wrote {args.format} export to {path}")
        if args.format == "vllm":
            from lorakit.export import vllm_serve_hint

            print(f"serve it with: {vllm_serve_hint(path)}")
        return 0
    if args.model is not None:
        train_recipe.evaluate_model(args.model, load_config(args.config, args.targets), args.split, quiet=args.quiet)
        return 0
    if args.config is not None or len(args.targets) != 1:
        raise LorakitError("eval takes one RUN_DIR, or --model NAME_OR_PATH --config FILE.yaml [overrides] "
                           "to score an untouched model")
    train_recipe.evaluate_run(args.targets[0], args.split, quiet=args.quiet)
    return 0


if __name__ == "__main__":
    sys.exit(main())
