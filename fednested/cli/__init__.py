"""The `fednested` command line (Typer); `main` is the console-script entry point."""

from fednested.cli.app import LAZY_GROUPS, LazyCommandGroup, app, build_app, main

__all__ = ["LAZY_GROUPS", "LazyCommandGroup", "app", "build_app", "main"]
