"""Draws the built-in video calibration set `calibVideos/` (Pillow only): short synthetic clips of moving rendered
shapes and text, each a directory of numbered PNG frames (no video container, so no decoder is needed to read
them), with a prompt per clip in `calibVideos/index.jsonl` (one entry also pairs a clip with a still image).

Every frame is drawn here from numbers and words written for this project (no footage, font file or dataset is
copied), so the set is the project's own, under its licence. The clips differ in what a video model is asked
about: motion direction, counting, text that changes, a growing chart, a rotating object. Frames are small
(224 x 160) and few (6 per clip, 2 frames per second as the Qwen-Omni processors assume by default), so the set
stays tiny on disk and cheap to calibrate on.

    python -m msmodelslim.lab_calib.make_calib_videos [--out DIR]

The output is deterministic for a given Pillow version (its bundled default font draws the text).
"""
from __future__ import annotations

import argparse
import json
import math
import random
from pathlib import Path
from typing import Callable

from PIL import Image, ImageDraw, ImageFont

OUT = Path(__file__).resolve().parent / "calibVideos"
SEED = 2000
SIZE = (224, 160)
FRAMES = 6
PALETTE = [(52, 101, 164), (204, 0, 0), (78, 154, 6), (237, 212, 0), (117, 80, 123), (245, 121, 0)]


def font(size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)


def frame(color=(245, 245, 240)) -> tuple[Image.Image, ImageDraw.ImageDraw]:
    image = Image.new("RGB", SIZE, color)
    return image, ImageDraw.Draw(image)


def moving_ball(rng: random.Random, t: int) -> Image.Image:
    image, draw = frame((200, 225, 245))
    draw.rectangle([0, 120, SIZE[0], SIZE[1]], fill=(90, 160, 80))  # ground
    x = 20 + t * 34
    y = 110 - abs(math.sin(t * 0.9)) * 60
    draw.ellipse([x - 12, y - 12, x + 12, y + 12], fill=PALETTE[1], outline="black")
    draw.text((8, 8), "ball", fill="black", font=font(14))
    return image


def counting_squares(rng: random.Random, t: int) -> Image.Image:
    image, draw = frame()
    for i in range(t + 1):  # one more square each frame
        x0, y0 = 16 + (i % 4) * 50, 20 + (i // 4) * 60
        draw.rectangle([x0, y0, x0 + 36, y0 + 36], fill=PALETTE[i % len(PALETTE)])
    draw.text((SIZE[0] - 8, SIZE[1] - 8), f"{t + 1}", fill="black", font=font(16), anchor="rb")
    return image


def ticking_clock(rng: random.Random, t: int) -> Image.Image:
    image, draw = frame((255, 255, 255))
    cx, cy, r = 80, 80, 60
    draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline="black", width=3)
    for h in range(12):
        a = h / 12 * 2 * math.pi
        draw.line([(cx + 0.85 * r * math.sin(a), cy - 0.85 * r * math.cos(a)),
                   (cx + r * math.sin(a), cy - r * math.cos(a))], fill="black", width=2)
    a = t / FRAMES * 2 * math.pi
    draw.line([(cx, cy), (cx + 0.8 * r * math.sin(a), cy - 0.8 * r * math.cos(a))], fill=PALETTE[0], width=4)
    draw.text((160, 70), f"0:{t * 10:02d}", fill="black", font=font(18))
    return image


def scrolling_text(rng: random.Random, t: int) -> Image.Image:
    image, draw = frame((30, 30, 40))
    words = ["NEXT", "TRAIN", "TO", "HARBOUR", "ARRIVES", "IN", "4", "MINUTES"]
    line = "  ".join(words)
    draw.text((150 - t * 60, 66), line, fill=(255, 200, 0), font=font(22))
    draw.text((8, 8), "platform 2", fill=(200, 200, 200), font=font(12))
    return image


def growing_bars(rng: random.Random, t: int) -> Image.Image:
    image, draw = frame()
    values = [30, 55, 80, 45]
    labels = ["Q1", "Q2", "Q3", "Q4"]
    for i, (value, label) in enumerate(zip(values, labels)):
        height = value * min(1.0, (t + 1) / FRAMES) * 1.3
        x0 = 24 + i * 48
        draw.rectangle([x0, 130 - height, x0 + 30, 130], fill=PALETTE[i])
        draw.text((x0 + 15, 134), label, fill="black", font=font(12), anchor="mt")
    draw.line([(16, 130), (210, 130)], fill="black", width=2)
    return image


def rotating_arrow(rng: random.Random, t: int) -> Image.Image:
    image, draw = frame((250, 240, 225))
    cx, cy = 112, 80
    a = t / FRAMES * math.pi  # half a turn over the clip
    tip = (cx + 55 * math.cos(a), cy + 55 * math.sin(a))
    tail = (cx - 55 * math.cos(a), cy - 55 * math.sin(a))
    draw.line([tail, tip], fill=PALETTE[4], width=6)
    left = (tip[0] - 16 * math.cos(a - 0.5), tip[1] - 16 * math.sin(a - 0.5))
    right = (tip[0] - 16 * math.cos(a + 0.5), tip[1] - 16 * math.sin(a + 0.5))
    draw.polygon([tip, left, right], fill=PALETTE[4])
    return image


CLIPS: list[tuple[str, Callable[[random.Random, int], Image.Image], str]] = [
    ("ball", moving_ball, "Describe how the ball moves across this video."),
    ("squares", counting_squares, "How many squares are there at the end of the video, and how did the number "
                                  "change?"),
    ("clock", ticking_clock, "What does the clock show, and how does it change from the first frame to the last?"),
    ("ticker", scrolling_text, "Read the scrolling message in this video."),
    ("bars", growing_bars, "Describe this animated chart. Which quarter ends highest?"),
    ("arrow", rotating_arrow, "In which direction does the arrow turn, and by about how much?"),
]
STILL = ("still.png", "Compare the still image with the video: which shape appears in both?")


def write(out: Path = OUT) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    written, index = [], []
    for n, (name, draw_frame, prompt) in enumerate(CLIPS):
        clip = out / name
        clip.mkdir(exist_ok=True)
        for old in clip.glob("frame_*.png"):
            old.unlink()
        for t in range(FRAMES):
            path = clip / f"frame_{t:03d}.png"
            draw_frame(random.Random(SEED + 100 * n + t), t).quantize(colors=64).save(path, optimize=True)
            written.append(path)
        index.append({"video": name, "text": prompt})
    still = out / STILL[0]
    counting_squares(random.Random(SEED), 0).quantize(colors=64).save(still, optimize=True)
    written.append(still)
    index.append({"image": STILL[0], "video": "squares", "text": STILL[1]})
    (out / "index.jsonl").write_text("".join(json.dumps(e, ensure_ascii=False) + "\n" for e in index),
                                     encoding="utf-8")
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    paths = write(args.out)
    print(f"{len(paths)} frames and images, {sum(p.stat().st_size for p in paths) / 1024:.0f} KiB in {args.out}")


if __name__ == "__main__":
    main()
