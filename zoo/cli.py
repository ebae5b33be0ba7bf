"""The model flags every entry point shares (inference.py, server.py, the Gradio page): which
model, its published parts (one ``--<component>`` flag per part, read from its card), random
weights, device and dtype, and one way to load from them."""
from __future__ import annotations

import argparse

from . import RANDOM_REPLY_SECONDS, card, load, names
from .core.types import ModelCard, VoiceModel

# the model every entry point runs when none is named (the README's first command)
DEFAULT_MODEL = "mini-omni"


def add_model_flags(parser: argparse.ArgumentParser, argv: list[str] | None, default: str = DEFAULT_MODEL) -> None:
    """Add ``--model``, the chosen model's component flags, ``--tiny``, ``--random-full``,
    ``--device`` and ``--dtype`` to ``parser``. ``argv`` is what the parser will parse: the
    component flags depend on the model named there."""
    group = parser.add_argument_group("model")
    group.add_argument("--model", default=default, choices=names())
    group.add_argument("--tiny", action="store_true",
                       help="tiny random weights: no download, the replies are noise (capped to "
                            f"{RANDOM_REPLY_SECONDS:g} s unless max_new_tokens is given)")
    group.add_argument("--random-full", action="store_true",
                       help="published dimensions with random weights (noise), for benchmarks")
    group.add_argument("--device", help="cuda, cuda:1, cpu (default: cuda if present)")
    model = chosen_model(argv, default)
    packed = card(model).quantizations if model in names() else ()
    group.add_argument("--dtype", help="float32, bfloat16, float16, float64" +
                       (f"; {', '.join(packed)} (quantised weights, computing in bfloat16)" if packed else "") +
                       " (default: the model's own)")
    if model in names():  # an unknown name is reported by the full parser
        add_component_flags(group, card(model))


def chosen_model(argv: list[str] | None, default: str) -> str:
    """``--model`` alone, read before the full parser exists (its flags depend on the model), and
    without help so that ``--help`` later lists the component flags too."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--model", default=default)
    return pre.parse_known_args(argv)[0].model


def add_component_flags(parser, card: ModelCard) -> None:
    for component, default in card.components.items():
        parser.add_argument(f"--{component.replace('_', '-')}", dest=component, metavar="REPO_OR_DIR",
                            help=f"hub repo id or local folder (default {default})")


def component_values(args: argparse.Namespace, card: ModelCard) -> dict[str, str]:
    """The component flags the user gave (the rest keep the model's published defaults)."""
    return {c: getattr(args, c) for c in card.components if getattr(args, c, None)}


def random_weights(args: argparse.Namespace) -> str | None:
    return "full" if args.random_full else "tiny" if args.tiny else None


def load_model(args: argparse.Namespace, seed: int = 0) -> VoiceModel:
    """The model the flags name (zoo.ZooError, e.g. WeightsNotFound, when it cannot be had)."""
    return load(args.model, device=args.device, dtype=args.dtype, random_weights=random_weights(args), seed=seed,
                **component_values(args, card(args.model)))


def noise_notice(model: VoiceModel) -> str | None:
    """What every front end shows about a random-weight model (None for published weights)."""
    if model.random_weights is None:
        return None
    return noise_notice_for(model.card, model.random_weights, model.default_max_new_tokens)


def noise_notice_for(card: ModelCard, random: str, cap: int) -> str:
    """The random-weight notice from the card, before (or without) loading the model."""
    seconds = cap / card.reply_tokens_per_second
    return (f"RANDOM WEIGHTS ({random}): every reply is noise, not speech; replies are capped "
            f"to about {seconds:.0f} s (max_new_tokens={cap}) unless you set max_new_tokens")
