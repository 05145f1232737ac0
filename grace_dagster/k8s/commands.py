"""`grace k8s ...` subcommands."""

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    """Add the `k8s` command group to the `grace` parser."""
