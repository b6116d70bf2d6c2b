"""`pcm`: the command-line entry point; it parses arguments and dispatches to `pcm_policy.commands`.

    pcm data info PATH [--json]
    pcm export CHECKPOINT OUTPUT [--format pcm|lerobot|diffusion-policy|onnx] [--dtype float16] [--link-head] [pcm=DIR]
    pcm import diffusion-policy|lerobot PATH output_dir=DIR [dataset.path=FILE]
    pcm train task=pusht dataset.path=... train.steps=200 output_dir=...   (and eval, collect, train-pcm, train-encoder,
                                                                             bench, demo)
    pcm serve checkpoint=DIR port=8000   (a policy server on openpi's websocket protocol)

User errors (bad files, unknown keys, missing devices) print one line on stderr and exit with status 2.
Set PCM_DEBUG=1 to see full tracebacks.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import textwrap
from typing import Sequence

os.environ.setdefault("PYGAME_HIDE_SUPPORT_PROMPT", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pcm_policy.commands import COMMANDS, command_module, compose_command, run_command  # noqa: E402
from pcm_policy.commands import data as data_command  # noqa: E402
from pcm_policy.commands import export as export_command  # noqa: E402
from pcm_policy.commands import import_policy as import_command  # noqa: E402
from pcm_policy.config import CONFIG_DIR  # noqa: E402
from pcm_policy.errors import PcmError  # noqa: E402
from pcm_policy.tasks import TASKS  # noqa: E402

EXIT_USER_ERROR = 2


def _run_overrides(args: argparse.Namespace) -> int:
    if args.print_config:
        print(json.dumps(compose_command(args.command, args.overrides), indent=2))
        return 0
    run_command(args.command, args.overrides)
    return 0


def _run_plain(args: argparse.Namespace) -> int:
    args.command_run(args.command_config(args))
    return 0


def _tasks_and_policies() -> str:
    """`pcm --help`'s list of every task (with its cameras and default policy) and every `policy=` config, from
    the task registry and configs/policy (so an image task or policy added there is listed)."""
    import yaml

    lowdim = ", ".join(t.name for t in TASKS.values() if not t.cameras)
    image = "; ".join(f"{t.name} ({' + '.join(t.cameras)}, policy={t.policy})" for t in TASKS.values() if t.cameras)
    configs = {p.stem: yaml.safe_load(p.read_text()) or {} for p in sorted(CONFIG_DIR.glob("policy/*.yaml"))}
    networks = {name: cfg for name, cfg in configs.items() if "horizon" in cfg}  # not checkpoint / expert
    lines = (f"tasks (task=...): low-dim {lowdim}; with cameras {image}",
             f"policies (policy=...): low-dim {', '.join(n for n, c in networks.items() if not c.get('vision'))}; "
             f"image {', '.join(n for n, c in networks.items() if c.get('vision'))}; "
             f"{', '.join(n for n in configs if n not in networks)} (eval)")
    return "\n".join(textwrap.fill(line, 100, subsequent_indent="  ") for line in lines)


def build_parser() -> argparse.ArgumentParser:
    """The `pcm` argument parser: `data info`, `export`, `import`, and the Hydra-override commands of
    `pcm_policy.commands.COMMANDS`; each subparser's `func` runs its command on the parsed args."""
    parser = argparse.ArgumentParser(prog="pcm", description="Fast, exact diffusion-policy control (Picard Consistency Models).",
                                     epilog=_tasks_and_policies(), formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in (data_command, export_command, import_command):
        module.add_parser(sub)
    for p in sub.choices.values():
        p.set_defaults(func=_run_plain)
    for name, (config_name, help_text, keys) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=f"{help_text}\n\nCommon overrides:\n{keys}",
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("overrides", nargs="*", metavar="key=value", help=f"Hydra overrides (configs/{config_name}.yaml)")
        p.add_argument("--print-config", action="store_true", help="print the composed config and exit")
        p.set_defaults(func=_run_overrides)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one `pcm` command (the console-script entry point).

    Args:
        argv: the arguments after the program name; None reads `sys.argv`.

    Returns:
        The exit status: 0 on success, 2 (`EXIT_USER_ERROR`) after a `PcmError` or an `OSError` (a disk full, a
        permission refused: one line on stderr naming the file), 130 on Ctrl-C, 1 after any other exception (one line on stderr; `PCM_DEBUG=1` re-raises it instead).

    Raises:
        SystemExit: from argparse, status 2 for a usage error and 0 for `--help`.
    """
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # key=value options given after a subcommand's optional flags (`pcm export CKPT OUT --format onnx pcm=DIR`):
    # argparse has already filled the positional list before the flags, so they arrive here
    trailing = getattr(args, "trailing_options", None)
    if extra and trailing and not any(e.startswith("-") for e in extra):
        setattr(args, trailing, list(getattr(args, trailing) or []) + extra)
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return int(args.func(args) or 0)
    except PcmError as e:
        print(f"pcm: error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("pcm: interrupted", file=sys.stderr)
        return 130
    except OSError as e:  # the machine refused a read or write (disk full, permissions): the user's to fix
        if os.environ.get("PCM_DEBUG"):
            raise
        where = f"{e.filename}: " if e.filename else ""
        detail = e.strerror or (str(e).splitlines()[0] if str(e) else type(e).__name__)
        print(f"pcm: error: {where}{detail}", file=sys.stderr)
        return EXIT_USER_ERROR
    except Exception as e:  # a bug, not a user error: keep it to one line unless debugging
        if os.environ.get("PCM_DEBUG"):
            raise
        print(f"pcm: internal error: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''} "
              "(set PCM_DEBUG=1 for a traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
