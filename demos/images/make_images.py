"""Writes the preset images next to this file (simple shapes and colours drawn with PIL, no
downloaded data) and, where espeak-ng is installed, the spoken questions about them (presets.json
pairs them). Run again to recreate them: python demos/images/make_images.py"""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

from PIL import Image, ImageDraw

HERE = Path(__file__).resolve().parent


def red_circle() -> Image.Image:
    image = Image.new("RGB", (320, 240), "white")
    ImageDraw.Draw(image).ellipse((100, 60, 220, 180), fill=(220, 30, 30), outline="black", width=3)
    return image


def blue_square() -> Image.Image:
    image = Image.new("RGB", (256, 256), (235, 235, 220))
    ImageDraw.Draw(image).rectangle((64, 64, 192, 192), fill=(30, 60, 200))
    return image


def green_triangle() -> Image.Image:
    # a palette image of an odd, tall size: CLIP's transform resizes it in its own mode
    image = Image.new("RGB", (97, 301), "black")
    ImageDraw.Draw(image).polygon([(48, 60), (90, 240), (6, 240)], fill=(40, 200, 60))
    return image.convert("P", palette=Image.Palette.ADAPTIVE, colors=8)


def traffic_light() -> Image.Image:
    image = Image.new("RGBA", (180, 400), (0, 0, 0, 0))
    draw = ImageDraw.Draw(image)
    draw.rounded_rectangle((40, 20, 140, 380), radius=20, fill=(40, 40, 40, 255))
    for i, colour in enumerate([(230, 40, 40), (240, 200, 30), (40, 200, 80)]):
        draw.ellipse((60, 40 + 115 * i, 120, 100 + 115 * i), fill=(*colour, 255))
    return image


# image -> the spoken question about it (demos/images/presets.json; inference.py reads it)
QUESTIONS = {"red_circle.png": "What shape is in this picture?", "blue_square.png": "What color is the square?",
             "green_triangle.png": "What do you see in this image?", "traffic_light.png": "What is this object?"}

IMAGES = {"red_circle.png": red_circle, "blue_square.png": blue_square, "green_triangle.png": green_triangle,
          "traffic_light.png": traffic_light}


def speak(text: str, path: Path) -> None:
    subprocess.run(["espeak-ng", "-v", "en-us", "-s", "150", "-w", str(path), text], check=True)


if __name__ == "__main__":
    presets = []
    for name, draw in IMAGES.items():
        draw().save(HERE / name, optimize=True)
        wav = Path(name).stem + "_question.wav"
        if shutil.which("espeak-ng"):
            speak(QUESTIONS[name], HERE / wav)
        presets.append({"image": name, "audio": wav, "question": QUESTIONS[name]})
        print(HERE / name, HERE / wav)
    (HERE / "presets.json").write_text(json.dumps(presets, indent=2) + "\n")
