"""What every command line shares: the argument parser (every number finite, paths and seeds checked), loading
the config a command names, logging, and :func:`run_main`, which turns every user mistake into one line on
stderr and exit code 2 and releases the results folders a command held. The commands are in
:mod:`monai_diffusion.cli`."""

from __future__ import annotations

import argparse
import functools
import logging
import math
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from monai_diffusion.config import Config, load_config
from monai_diffusion.errors import UserError

__all__ = ["CONFIG_DIR", "resolve_config_path", "load_cli_config", "run_main"]

CONFIG_DIR = Path(__file__).resolve().parent / "config"
log = logging.getLogger("monai_diffusion")


def _finite(convert: Callable[[str], Any]) -> Callable[[str], Any]:
    """``convert``, refusing a non-finite float result (``nan``, ``inf``, ``1e400``) the way config values are."""

    @functools.wraps(convert)
    def checked(text: str) -> Any:
        value = convert(text)
        if isinstance(value, float) and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
        return value

    return checked


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors as one line (``error: --steps: ...``) and exit code 2, and every number
    option finite: each option's type converter refuses a non-finite float."""

    def add_argument(self, *args: Any, **kwargs: Any) -> argparse.Action:
        if callable(kwargs.get("type")):
            kwargs["type"] = _finite(kwargs["type"])
        return super().add_argument(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        print(f"error: {message.removeprefix('argument ')}; see {self.prog} --help", file=sys.stderr)
        raise SystemExit(2)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def _path(text: str) -> str:
    """A file or folder option: an empty value is an error, never a silent fall-back to the default."""
    if not text.strip():
        raise argparse.ArgumentTypeError(f"expected a path, got {text!r}")
    return text


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer from 0 to 2**63 - 1, got {text!r}") from None
    if not 0 <= value < 2**63:
        raise argparse.ArgumentTypeError(f"expected an integer from 0 to 2**63 - 1, got {value}")
    return value


def _parser(description: str, with_config: bool = True) -> _Parser:
    parser = _Parser(description=description)
    if with_config:
        parser.add_argument("--config", type=_path, default=str(CONFIG_DIR / "ldm_config.yaml"),
                            help="YAML config (a bare file name is also looked up in monai_diffusion/config/)")
        parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                            help="override a config value, e.g. --set autoencoder.training.batch_size=1 (repeatable)")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    return parser


config_parser = _parser


def resolve_config_path(value: str) -> Path:
    """The file as given; a bare file name that does not exist here is looked up among the shipped configs.

    A path with a folder part must exist as given (a mistyped folder is an error, never a silent fallback).
    """
    path = Path(value)
    if path.exists() or path.is_absolute() or len(path.parts) > 1:
        return path
    for candidate in (CONFIG_DIR / value, CONFIG_DIR / "examples" / value):
        if candidate.is_file():
            return candidate
    return path


def load_cli_config(args: argparse.Namespace, stage: str = "autoencoder") -> Config:
    path = resolve_config_path(args.config)
    if path != Path(args.config):
        log.info("config: %s (the shipped file of that name)", path)
    return load_config(path, args.overrides, stage)


def _setup_logging() -> None:
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, format="%(message)s", stream=sys.stdout)
    logging.getLogger("PIL").setLevel(logging.WARNING)


def _lost_peer(err: BaseException) -> bool:
    """A collective that failed because another process of the run ended (gloo / NCCL)."""
    text = str(err)
    return isinstance(err, RuntimeError) and any(
        sign in text for sign in ("Connection closed by peer", "Connection reset by peer", "remote worker crash",
                                  "NCCL communicator was aborted"))


def _out_of_memory(err: BaseException) -> bool:
    """An allocation that failed: Python's or NumPy's MemoryError, torch's CPU allocator or a GPU."""
    return (isinstance(err, MemoryError) or type(err).__name__ == "OutOfMemoryError"
            or (isinstance(err, RuntimeError) and "can't allocate memory" in str(err)))


def run_main(body: Callable[[argparse.Namespace], object], parser: argparse.ArgumentParser,
             argv: Sequence[str] | None) -> int:
    """Parse arguments, run ``body``, turn user errors into one line and exit code 2 (see :func:`_run_main`).

    Under torchrun every process leaves with ``os._exit`` once its output is written, whatever the outcome: the
    interpreter's normal exit tears the process group down, and a gloo group's teardown was seen waiting
    forever for a peer that had already exited (pytorch#75097). After an error torchrun stops the other
    processes and reports the exit codes.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return _run_main(body, parser, argv)
    try:
        code = _run_main(body, parser, argv)
    except Exception:  # --debug, or an unexpected error: its traceback, then leave like any failed rank
        traceback.print_exc()
        code = 1
    _leave_now(code)


def _leave_now(code: int) -> NoReturn:
    """Flush what was written and end this process without the interpreter's teardown."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(code)


def _run_main(body: Callable[[argparse.Namespace], object], parser: argparse.ArgumentParser,
              argv: Sequence[str] | None) -> int:
    """Parse arguments, run ``body``, turn user errors into one line and exit code 2.

    Under torchrun (WORLD_SIZE > 1) one line is printed for the whole run: an error decided alike on every
    process by rank 0 alone, one met by a single process (``UserError.rank_local``) by that process, naming
    its rank. A process whose collective failed because another one ended exits quietly (code 1): that
    process's own message, and torchrun's summary, name the cause. ``--debug`` shows every traceback.
    """
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # --help (0) or a bad option (2, already reported in one line)
        return int(exit_.code or 0)
    _setup_logging()
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    try:
        body(args)
    except UserError as err:
        if args.debug:
            raise
        if rank == 0 or world == 1:
            print(f"error: {err}", file=sys.stderr)
        elif err.rank_local:
            print(f"error: rank {rank}: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if rank == 0:
            print("interrupted; the last checkpoint is intact, continue with --resume", file=sys.stderr)
        return 130
    except Exception as err:
        if world > 1 and not args.debug and _lost_peer(err):
            return 1
        if args.debug or not _out_of_memory(err):
            raise
        lines = str(err).strip().splitlines()
        what = lines[0][:200] if lines else type(err).__name__
        print(f"error: {f'rank {rank}: ' if rank else ''}out of memory ({what}); reduce data.image_size, the batch "
              f"size or the network's channels, or switch on mixed_precision or use_gradient_checkpointing "
              f"(ldm-estimate-memory estimates a training step)", file=sys.stderr)
        return 2
    finally:
        _release_output_folders()
    return 0


def _release_output_folders() -> None:
    """The results folders a command held (see ``runs.claim_output_folder``), whatever way it ended."""
    runs = sys.modules.get("monai_diffusion.runs.folders")
    if runs is not None:
        runs.release_output_folders()
