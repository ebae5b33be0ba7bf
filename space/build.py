"""Assemble the Hugging Face Space in a folder, ready to upload as it is: its README.md (the Space's
settings in YAML front matter, generated from the model cards and the installed Gradio), app.py,
requirements.txt and the two packages the page imports (zoo, webui).

    python space/build.py dist/space                               # Mini-Omni, suggested on ZeroGPU
    python space/build.py dist/space --model glm-4-voice           # another model (or several: a,b)
    hf upload YOUR_NAME/omni-zoo dist/space . --repo-type space    # create or update the Space

``python space/build.py --check`` says whether space/README.md is what the build writes for the
default model (tests/test_space.py checks it too)."""
from __future__ import annotations

import argparse
import re
import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))

import gradio  # noqa: E402

import zoo  # noqa: E402

PACKAGES = ("zoo", "webui")  # what app.py imports (webui.space -> webui.gradio_chat -> zoo)
DEFAULT_MODELS = ["mini-omni"]
PYTHON_VERSION = "3.11"
ZERO_GPU = "zero-a10g"  # the Spaces flavor name of ZeroGPU (H200 slices since 2025)
ZERO_GPU_MAX_GB = 20  # weights up to this size: ZeroGPU is suggested; more: a dedicated 48 GB card
LARGE_GPU = "l40sx1"


def hub_repos(name: str) -> list[str]:
    """Every hub repo the model's default parts come from (the card's, and any fallback its module
    names, such as the repo Mini-Omni's Whisper weights are read from)."""
    card = zoo.card(name)
    repos = list(card.components.values())
    model_module = sys.modules[zoo._model_class(name).__module__]
    repos += [value for key, value in vars(model_module).items() if key.endswith("_HUB_FALLBACK")]
    return list(dict.fromkeys(repos))


def weights_gb(name: str) -> float:
    found = re.search(r"([\d.]+)\s*GB", zoo.card(name).download_size)
    return float(found[1]) if found else 0.0


def suggested_hardware(models: list[str]) -> str:
    return ZERO_GPU if sum(weights_gb(m) for m in models) <= ZERO_GPU_MAX_GB else LARGE_GPU


def readme(models: list[str], hardware: str | None = None) -> str:
    """The Space's README: front matter (https://huggingface.co/docs/hub/spaces-config-reference)
    and what a visitor of the Space's files should know."""
    repos = [repo for m in models for repo in hub_repos(m)]
    front = [
        "---",
        "title: omni-zoo voice chat",
        "emoji: 🎙️",
        "colorFrom: indigo",
        "colorTo: yellow",
        "sdk: gradio",
        f"sdk_version: {gradio.__version__}",
        f'python_version: "{PYTHON_VERSION}"',
        "app_file: app.py",
        f"suggested_hardware: {hardware or suggested_hardware(models)}",
        "startup_duration_timeout: 1h",
        "models:",
        *[f"  - {repo}" for repo in dict.fromkeys(repos)],
        "license: apache-2.0",
        "short_description: Talk to open end-to-end voice chat models",
        "---",
    ]
    cards = [zoo.card(m) for m in models]
    body = f"""
# omni-zoo voice chat

Speak (or upload a question) and {', '.join(c.title for c in cards)} answers in speech, streamed,
with its text alongside. The page is omni-zoo's Gradio page
(`webui/gradio_chat.py`) with the rules of a public page (`webui/space.py`):

- a queue: a few replies of each model at once, the other visitors wait and see their place;
- per visitor: a few questions a minute, questions up to 30 s (a longer recording is stopped,
  a longer upload refused, with a message saying why); replies up to 30 s;
- nothing you say is stored: each recording is deleted once answered, Gradio's cached replies
  after 5 minutes (unless the operator sets `OMNI_ZOO_KEEP_DIR`);
- an "About this model" panel: the model card's facts, paper, license and time to first audio.

Weights: {', '.join(dict.fromkeys(repos))}, downloaded from the hub on the first start into
`HF_HOME` (on the persistent `/data` volume when the Space has one: then only once).

## Settings (the Space's variables)

| variable | default | what |
|---|---|---|
| `OMNI_ZOO_MODEL` | `{','.join(models)}` | the model, or several separated by commas (a picker; the first loads at start, the others on first use) |
| `OMNI_ZOO_RANDOM_WEIGHTS` | unset | `tiny`: random weights for a smoke test (the page says so in a banner) |
| `OMNI_ZOO_DEVICE`, `OMNI_ZOO_DTYPE` | cuda if present, float32 | e.g. `cuda`, `bfloat16` |
| `OMNI_ZOO_CONCURRENCY` | 1 | replies of one model at once |
| `OMNI_ZOO_QUEUE_SIZE` | 32 | visitors waiting, at most |
| `OMNI_ZOO_RATE_PER_MINUTE` | 6 | questions per visitor per minute |
| `OMNI_ZOO_MAX_RECORDING_S` | 30 | longest question, seconds (never above the model's own limit) |
| `OMNI_ZOO_MAX_REPLY_S` | 30 | longest reply, seconds; on ZeroGPU it sets `spaces.GPU(duration=...)` |
| `OMNI_ZOO_CACHE_S` | 300 | Gradio's cached files are deleted after this many seconds |
| `OMNI_ZOO_KEEP_DIR` | unset | a folder (e.g. `/data/exchanges`): every exchange is kept there. Tell your visitors |
| `OMNI_ZOO_MAX_LOADED` | 0 | models held in memory at once (0: as many as fit; idle ones are unloaded first) |
"""
    return "\n".join(front) + "\n" + body


def app_source(models: list[str]) -> str:
    source = (HERE / "app.py").read_text()
    default = 'os.environ.setdefault("OMNI_ZOO_MODEL", "mini-omni")'
    assert default in source, "space/app.py no longer sets its default model where build.py looks"
    return source.replace(default, f'os.environ.setdefault("OMNI_ZOO_MODEL", "{",".join(models)}")')


def build(out: Path, models: list[str], hardware: str | None = None) -> Path:
    if out.exists():
        if not (out / "app.py").is_file():
            raise SystemExit(f"error: {out} exists and is not a Space folder; choose an empty or new one")
        shutil.rmtree(out)
    out.mkdir(parents=True)
    (out / "README.md").write_text(readme(models, hardware))
    (out / "app.py").write_text(app_source(models))
    shutil.copyfile(HERE / "requirements.txt", out / "requirements.txt")
    for package in PACKAGES:
        shutil.copytree(REPO / package, out / package, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", nargs="?", type=Path, help="the folder to write (replaced if it holds a Space)")
    parser.add_argument("--model", default=",".join(DEFAULT_MODELS),
                        help=f"the model, or several separated by commas (default {DEFAULT_MODELS[0]}); "
                             f"available: {', '.join(zoo.names())}")
    parser.add_argument("--hardware", help=f"the suggested Spaces hardware (default: {ZERO_GPU} for weights up to "
                                           f"{ZERO_GPU_MAX_GB} GB, else {LARGE_GPU})")
    parser.add_argument("--check", action="store_true", help="check space/README.md against the default build")
    parser.add_argument("--write-readme", action="store_true", help="rewrite space/README.md (the default build's)")
    args = parser.parse_args(argv)
    if args.write_readme:
        (HERE / "README.md").write_text(readme(DEFAULT_MODELS))
        print("wrote space/README.md")
        return 0
    if args.check:
        if (HERE / "README.md").read_text() != readme(DEFAULT_MODELS):
            print("space/README.md differs from the build's: run python space/build.py --write-readme",
                  file=sys.stderr)
            return 1
        print("space/README.md is up to date")
        return 0
    models = [m.strip() for m in args.model.split(",") if m.strip()]
    unknown = [m for m in models if m not in zoo.names()]
    if unknown or not models:
        parser.error(f"unknown model(s) {unknown}; available: {', '.join(zoo.names())}")
    if args.out is None:
        parser.error("the folder to write is required")
    out = build(args.out, models, args.hardware)
    print(f"wrote the Space for {', '.join(models)} to {out}: upload it with "
          f"hf upload YOUR_NAME/omni-zoo {out} . --repo-type space")
    return 0


if __name__ == "__main__":
    sys.exit(main())
