"""The Gradio page as a public Hugging Face Space (space/app.py runs ``main``): the same page as
webui/omni_gradio.py (``webui.gradio_chat.build``), with what a page open to everyone needs.

- The model: ``OMNI_ZOO_MODEL`` (default: zoo.cli's default model). A comma-separated list offers several in the
  page's picker: the first loads at start, the others on first use (the status says so), and the
  least recently used idle model is unloaded when memory runs short or ``OMNI_ZOO_MAX_LOADED``
  models are held. ``OMNI_ZOO_RANDOM_WEIGHTS=tiny`` (or ``--tiny``) runs random weights, under a
  banner that says so.
- The GPU: on ZeroGPU the reply's GPU work runs inside ``spaces.GPU(duration=...)``, a duration
  fitted to the page's reply cap; without the ``spaces`` package the same code runs on a
  dedicated GPU or the CPU (a stand-in decorator that does nothing).
- Queue: ``OMNI_ZOO_CONCURRENCY`` replies of each model at once; the others wait in Gradio's queue
  (at most ``OMNI_ZOO_QUEUE_SIZE``), which shows each visitor their place.
- Per visitor: ``OMNI_ZOO_RATE_PER_MINUTE`` questions a minute and questions up to
  ``OMNI_ZOO_MAX_RECORDING_S`` seconds; more is refused at once with a message saying why.
  Replies are capped to ``OMNI_ZOO_MAX_REPLY_S`` seconds.
- Nothing is kept: each recording is deleted once answered and Gradio deletes its cached files
  (the streamed reply, waveforms) after ``OMNI_ZOO_CACHE_S`` seconds, unless the operator sets
  ``OMNI_ZOO_KEEP_DIR``: then each exchange (question, reply audio, text) is saved there.
- An "about" panel per model: the card's facts, paper, license, measured time to first audio and
  this page's own.
- Weights come from the hub into ``HF_HOME``, on the persistent ``/data`` volume when the Space
  has one (``webui.space_env``), so a restart does not download them again.
"""
from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

import gradio as gr

import zoo
from webui.gradio_chat import PAGE_CSS, WAVEFORMS, build
from webui.space_backend import Settings, SpaceBackend
from webui.space_policy import CacheSweeper, SpacePolicy, gradio_cache
from zoo.cli import add_model_flags, component_values, noise_notice, random_weights
from zoo.core.types import VoiceModel


# -- the program -----------------------------------------------------------------------------------
def create(settings: Settings, args: argparse.Namespace | None = None,
           load: Callable[[str], VoiceModel] | None = None) -> tuple[gr.Blocks, SpaceBackend]:
    """The page and its backend; the first model is loaded now (a Space is ready once it serves)."""
    first = settings.models[0]

    def load_model(name: str) -> VoiceModel:
        components = component_values(args, zoo.card(name)) if args is not None and name == first else {}
        model = zoo.load(name, device=settings.device, dtype=settings.dtype, random_weights=settings.random_weights,
                         **components)
        print(f"loaded {name}" + (f" ({noise_notice(model)})" if model.random_weights else ""), flush=True)
        return model

    backend = SpaceBackend(settings, load or load_model)
    backend.model(first)
    policy = SpacePolicy(settings, backend)
    demo = build(backend, live_api=None, policy=policy)
    demo.queue(default_concurrency_limit=policy.concurrency_limit, max_size=settings.queue_size)
    # Gradio's cached copies go whether or not the operator keeps exchanges (those go to keep_dir)
    CacheSweeper([gradio_cache(), WAVEFORMS], age=settings.cache_s, every=policy.sweep_every,
                 in_use=policy.in_use).start()
    return demo, backend


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    settings = Settings.from_env()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_flags(parser, argv, default=settings.models[0])
    page = parser.add_argument_group("page")
    page.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "0.0.0.0"),
                      help="default GRADIO_SERVER_NAME, else 0.0.0.0 (what a Space expects)")
    page.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", "7860")),
                      help="default GRADIO_SERVER_PORT, else 7860")
    args = parser.parse_args(argv)
    if args.model != settings.models[0]:  # --model wins over the environment's first model
        settings.models = [args.model] + [m for m in settings.models if m != args.model]
    settings.random_weights = random_weights(args) or settings.random_weights
    settings.device, settings.dtype = args.device or settings.device, args.dtype or settings.dtype
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    try:
        demo, _backend = create(settings, args)
    except zoo.ZooError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    demo.launch(server_name=args.host, server_port=args.port, css=PAGE_CSS, max_file_size="25mb", ssr_mode=False,
                footer_links=[])
    return 0
