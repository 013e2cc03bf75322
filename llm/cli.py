"""`llm` command line: `llm generate` streams a continuation of a prompt, `llm info` describes a checkpoint,
`llm runs` tabulates the experiments and `llm compare` overlays their loss curves (llm/runs.py).

Defaults of `generate` come from the `generate` section of ./params.yaml when there is one (else the
dataclass defaults in llm.config), so `llm generate` samples like the samples stage does.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from llm.config import DEVICES, GenerateConfig, RuntimeConfig, check_value, load_params
from llm.errors import ConfigError, LLMError

if TYPE_CHECKING:  # torch is imported by the commands that run a model: `llm runs` starts faster without it
    import torch

DEFAULT_CHECKPOINT = "models/model.pt"
DEFAULT_TOKENIZER = "data/tokenizer.json"
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports a program stopped by Ctrl-C
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, as a shell reports a writer whose reader went away


class _Parser(argparse.ArgumentParser):
    """argparse, whose usage errors (a bad flag, `--max-length 1e11`) are the project's one `error:` line."""

    def error(self, message: str) -> NoReturn:
        raise ConfigError(f"{self.prog}: {message}; see `{self.prog} --help`")


def _project_defaults() -> tuple[GenerateConfig, RuntimeConfig]:
    """The generate/runtime sections of ./params.yaml when present, else the built-in defaults."""
    if Path("params.yaml").is_file():
        params = load_params("params.yaml")
        return params.generate, params.runtime
    return GenerateConfig(), RuntimeConfig()


class _Streamer:
    """Prints each row's new text as tokens arrive: decode the whole continuation (as it reads after the
    prompt ids `context`), print the new suffix.

    Text ending in U+FFFD may be a multi-byte character cut in half, so it is held back until the
    next token completes it (or until `finish`).
    """

    def __init__(self, tokenizer: Any, eot_id: int | None, context: list[int] | None = None):
        self.tokenizer, self.eot_id, self.context = tokenizer, eot_id, context or []
        self.ids: list[int] = []
        self.printed = ""
        self.done = False

    def __call__(self, tokens: torch.Tensor) -> None:
        token = int(tokens[0])
        if self.done or token == self.eot_id:
            self.done = True
            return
        self.ids.append(token)
        self._emit(self.tokenizer.decode_after(self.context, self.ids).rstrip("\ufffd"))

    def _emit(self, text: str) -> None:
        if text.startswith(self.printed) and len(text) > len(self.printed):
            sys.stdout.write(text[len(self.printed):])
            sys.stdout.flush()
            self.printed = text

    def finish(self) -> None:
        """Print whatever was held back and end the line."""
        self._emit(self.tokenizer.decode_after(self.context, self.ids))
        sys.stdout.write("\n")
        sys.stdout.flush()


def cmd_generate(args: argparse.Namespace) -> int:
    """Load checkpoint and tokenizer (hashes must match), then stream `num_samples` continuations."""
    import torch

    from llm.checkpoint import load_model_file
    from llm.generate import (
        check_tokenizer_matches,
        generate,
        sampling_options,
        token_tensor,
        unknown_prompt_note,
    )
    from llm.hardware import resolve_device, set_threads
    from llm.tokenizers import load_tokenizer

    if not args.prompt:
        raise ConfigError("--prompt is empty: give some text to continue")
    for key in ("max_length", "num_samples", "temperature", "top_k", "top_p", "seed"):  # params' ranges
        check_value(GenerateConfig, key, getattr(args, key), "--" + key.replace("_", "-"))
    if args.checkpoint == DEFAULT_CHECKPOINT and not Path(DEFAULT_CHECKPOINT).is_file() \
            and not Path("params.yaml").is_file():
        raise ConfigError("params.yaml: not found; run from the project root (where params.yaml is), "
                          "or pass --checkpoint and --tokenizer")
    device = resolve_device(args.device)
    model, payload = load_model_file(args.checkpoint, device)
    set_threads(args.threads, model, device, rows=1)  # one sample, one token at a time
    check_tokenizer_matches(args.tokenizer, payload, args.checkpoint)
    tokenizer = load_tokenizer(args.tokenizer)
    prompt_ids = tokenizer.encode(args.prompt)
    if note := unknown_prompt_note(tokenizer, prompt_ids):
        print(note, file=sys.stderr)
    top_k, top_p = sampling_options(args.top_k, args.top_p)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    for number in range(1, args.num_samples + 1):
        if args.num_samples > 1:
            print(f"=== sample {number} ===")
        sys.stdout.write(args.prompt)
        streamer = _Streamer(tokenizer, tokenizer.eot_id, prompt_ids)
        generate(model, token_tensor(prompt_ids, 1, device), args.max_length, temperature=args.temperature,
                 top_k=top_k, top_p=top_p, generator=generator, eot_id=tokenizer.eot_id, on_token=streamer)
        streamer.finish()
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    """Print a checkpoint's model config, parameter count, step and metrics."""
    from llm.checkpoint import load_model_file

    model, payload = load_model_file(args.checkpoint, "cpu")
    print(f"checkpoint: {args.checkpoint}")
    print(f"parameters: {model.num_params():,}")
    print(f"step: {payload.get('step', 'unknown')}")
    print(f"tokenizer sha256: {payload.get('tokenizer_sha256', 'unknown')}")
    print("model config:")
    for key, value in payload["model_config"].items():
        print(f"  {key}: {value}")
    print("metrics:")
    for key, value in (payload.get("metrics") or {}).items():
        print(f"  {key}: {json.dumps(value)}")
    return 0


def cmd_runs(args: argparse.Namespace) -> int:
    """Print the runs table (see llm.runs.runs_table)."""
    from llm.runs import load_runs, render, runs_table

    kind = "csv" if args.csv else "markdown" if args.markdown else "text"
    sys.stdout.write(render(runs_table(load_runs(), every_param=args.all, sort=args.sort), kind))
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    """Write the figure of the runs' overlaid loss curves (see llm.runs.compare)."""
    from llm.runs import compare

    figure = compare(args.runs, args.output, x=args.x)
    runs = [text.get_text().split(":")[0] for text in figure.legends[0].get_texts()]
    print(f"{args.output}: train and validation loss of {', '.join(runs)} against {args.x}")
    return 0


def _with_range(key: str, text: str) -> str:
    """Help for a generate option, ending with its allowed values (the `generate` field's, in llm.config)."""
    meta = GenerateConfig.__dataclass_fields__[key].metadata
    low, high = meta["low"], meta["high"]
    bounds = [] if low is None else [f"> {low:g}" if meta["low_open"] else f">= {low:g}"]
    bounds += [] if high is None else [f"<= {high:g}"]
    return f"{text}; {' and '.join(bounds)}" if bounds else text


def build_parser() -> argparse.ArgumentParser:
    """The `llm` parser; generate's defaults are read from ./params.yaml when it exists."""
    gen, runtime = _project_defaults()
    parser = _Parser(prog="llm", description="A from-scratch GPT trained through DVC.")
    commands = parser.add_subparsers(dest="command", required=True)
    g = commands.add_parser("generate", help="continue a prompt, streaming tokens to stdout")
    g.add_argument("--prompt", default=gen.prompt, help="text to continue (default: %(default)r)")
    g.add_argument("--max-length", type=int, default=gen.max_length,
                   help=_with_range("max_length", "new tokens per sample"))
    g.add_argument("--temperature", type=float, default=gen.temperature,
                   help=_with_range("temperature", "sampling temperature, 0 = greedy"))
    g.add_argument("--top-k", type=int, default=gen.top_k,
                   help=_with_range("top_k", "keep the k most likely tokens, 0 = off"))
    g.add_argument("--top-p", type=float, default=gen.top_p,
                   help=_with_range("top_p", "nucleus probability mass, 1 = off"))
    g.add_argument("--num-samples", type=int, default=gen.num_samples,
                   help=_with_range("num_samples", "continuations, one by one"))
    g.add_argument("--seed", type=int, default=gen.seed, help=_with_range("seed", "sampling seed"))
    g.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT,
                   help="models/model.pt or a training checkpoint such as checkpoints/best_model.pt")
    g.add_argument("--tokenizer", default=DEFAULT_TOKENIZER, help="tokenizer the checkpoint used")
    g.add_argument("--device", default=runtime.device, choices=DEVICES)
    g.add_argument("--threads", type=int, default=runtime.threads,
                   help="CPU threads (0 = auto: 1 for models under 10M parameters, else all cores)")
    g.set_defaults(func=cmd_generate)
    info = commands.add_parser("info", help="print a checkpoint's config, size, step and metrics")
    info.add_argument("checkpoint", help="models/model.pt or a checkpoints/*.pt file")
    info.set_defaults(func=cmd_info)
    runs = commands.add_parser("runs", help="table of the workspace and every experiment: the params that "
                               "differ, the key metrics, best first")
    runs.add_argument("--all", action="store_true", help="every param, not only those that differ")
    export = runs.add_mutually_exclusive_group()
    export.add_argument("--csv", action="store_true", help="CSV with full precision, for pandas or a sheet")
    export.add_argument("--markdown", action="store_true", help="a GitHub markdown table")
    runs.add_argument("--sort", default="valid_bpb", metavar="KEY",
                      help="metric or param to sort by, ascending (default: %(default)s)")
    runs.set_defaults(func=cmd_runs)
    compare = commands.add_parser("compare", help="overlay the train and validation loss curves of runs in "
                                  "one figure")
    compare.add_argument("runs", nargs="+", metavar="EXP",
                         help="experiment names (or revisions) as `llm runs` lists them; the workspace joins")
    compare.add_argument("-o", "--output", default="compare.png",
                         help="figure to write; .png, .svg or .pdf (default: %(default)s)")
    compare.add_argument("--x", choices=("step", "tokens", "time"), default="step",
                         help="x axis: optimizer steps, tokens seen, or training seconds (default: step)")
    compare.set_defaults(func=cmd_compare)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse arguments and run a subcommand; user errors print one line and exit 2, Ctrl-C prints one
    line and exits 130, and a closed stdout (`llm generate | head`) ends quietly with 141."""
    try:
        args = build_parser().parse_args(argv)
        return args.func(args)
    except LLMError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # Python's own flush of stdout at exit would fail again and print a traceback: point it at devnull.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE


if __name__ == "__main__":
    sys.exit(main())
