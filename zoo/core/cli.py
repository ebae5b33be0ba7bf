"""Command-line flags every entry point (inference.py, server.py) shares: one ``--<component>``
flag per published part of the chosen model, read from its card."""
from __future__ import annotations

import argparse

from .types import ModelCard


def chosen_model(argv: list[str] | None, default: str) -> str:
    """``--model`` alone, read before the full parser exists (its flags depend on the model), and
    without help so that ``--help`` later lists the component flags too."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--model", default=default)
    return pre.parse_known_args(argv)[0].model


def add_component_flags(parser: argparse.ArgumentParser, card: ModelCard) -> None:
    for component, default in card.components.items():
        parser.add_argument(f"--{component.replace('_', '-')}", dest=component, metavar="REPO_OR_DIR",
                            help=f"hub repo id or local folder (default {default})")


def component_values(args: argparse.Namespace, card: ModelCard) -> dict[str, str]:
    """The component flags the user gave (the rest keep the model's published defaults)."""
    return {c: getattr(args, c) for c in card.components if getattr(args, c, None)}
