"""`trimvlm`: the command line's entry point. It holds no commands itself: each package of the
install adds its own through the `trimvlm.commands` entry points (pyproject.toml) - serving and the
model repository from service/cli.py, offline ones from compression/cli.py, bench from
benchmarks/cli.py. A package missing from the install (the serving image has service/ only) is
skipped: its commands are not listed, and --help says it is not installed. Heavy imports happen
inside the commands."""

from __future__ import annotations

from importlib.metadata import entry_points

import typer

GROUP = "trimvlm.commands"
ORDER = ("service", "compression", "benchmarks")  # how --help lists the groups (the metadata sorts by name)


def build_app() -> typer.Typer:
    found = entry_points(group=GROUP)
    if not found:  # run from a checkout that was never installed, or installed before these entry points
        typer.echo("error: no trimvlm commands are registered: install the package (pip install -e . or make run)", err=True)
        raise SystemExit(1)
    registers, absent = [], []
    for ep in sorted(found, key=lambda ep: ORDER.index(ep.name) if ep.name in ORDER else len(ORDER)):
        try:
            registers.append(ep.load())
        except ModuleNotFoundError as e:
            if e.name != ep.module.partition(".")[0]:
                raise  # a package that is installed but broken: show it
            absent.append(f"{e.name}/")  # that package is not in this install (the serving image)
    epilog = f"Not in this install: {', '.join(absent)} (their commands are not listed)." if absent else None
    app = typer.Typer(
        help="TrimVLM: compress vision-language models offline and serve them fast.", epilog=epilog, no_args_is_help=True
    )
    for register in registers:
        register(app)
    return app


def main() -> None:  # console-script entry point
    build_app()(prog_name="trimvlm")
