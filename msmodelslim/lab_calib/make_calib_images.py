"""Draws the built-in VLM calibration set `calibImages/` (Pillow only): charts, document pages, tables, diagrams
and simple scenes, each with its own prompt in `calibImages/index.jsonl`.

Every image is made here from numbers and words written for this project (no photograph, font file or dataset
is copied), so the set is the project's own, under its licence. Activation ranges of a vision-language model
depend on what it looks at: the set mixes the kinds of picture VLMs are asked about (text to read, charts to
interpret, tables, diagrams, scenes to describe), not one kind many times.

    python -m msmodelslim.lab_calib.make_calib_images [--out DIR]

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

OUT = Path(__file__).resolve().parent / "calibImages"
SEED_BASE = 1000  # image n is drawn with random.Random(SEED_BASE + n); the evaluation set uses 5000
SIZE = (512, 384)
PALETTE = [(52, 101, 164), (204, 0, 0), (78, 154, 6), (237, 212, 0), (117, 80, 123), (245, 121, 0), (0, 152, 155)]


def font(size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)


def canvas(color=(255, 255, 255), size=SIZE) -> tuple[Image.Image, ImageDraw.ImageDraw]:
    image = Image.new("RGB", size, color)
    return image, ImageDraw.Draw(image)


# ---- charts ----------------------------------------------------------------------------------------------------
def bar_chart(rng: random.Random, title: str, labels: list[str], unit: str) -> Image.Image:
    image, draw = canvas()
    values = [rng.randint(12, 95) for _ in labels]
    left, top, right, bottom = 60, 50, 490, 330
    draw.text((SIZE[0] // 2, 18), title, fill="black", font=font(20), anchor="mt")
    draw.line([(left, top), (left, bottom), (right, bottom)], fill="black", width=2)
    for tick in range(0, 101, 20):
        y = bottom - (bottom - top) * tick / 100
        draw.line([(left - 5, y), (right, y)], fill=(220, 220, 220))
        draw.text((left - 8, y), str(tick), fill="black", font=font(12), anchor="rm")
    width = (right - left) / len(labels)
    for i, (label, value) in enumerate(zip(labels, values)):
        x0 = left + i * width + width * 0.15
        x1 = left + (i + 1) * width - width * 0.15
        y = bottom - (bottom - top) * value / 100
        draw.rectangle([x0, y, x1, bottom], fill=PALETTE[i % len(PALETTE)])
        draw.text(((x0 + x1) / 2, y - 4), f"{value}", fill="black", font=font(12), anchor="mb")
        draw.text(((x0 + x1) / 2, bottom + 6), label, fill="black", font=font(13), anchor="mt")
    draw.text((14, (top + bottom) / 2), unit, fill="black", font=font(12), anchor="lm")
    return image


def line_chart(rng: random.Random, title: str, series: list[str]) -> Image.Image:
    image, draw = canvas()
    left, top, right, bottom = 55, 55, 480, 320
    months = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"]
    draw.text((SIZE[0] // 2, 18), title, fill="black", font=font(20), anchor="mt")
    draw.rectangle([left, top, right, bottom], outline="black")
    for i, month in enumerate(months):
        x = left + (right - left) * i / (len(months) - 1)
        draw.line([(x, top), (x, bottom)], fill=(235, 235, 235))
        draw.text((x, bottom + 6), month, fill="black", font=font(11), anchor="mt")
    for s, name in enumerate(series):
        level, points = rng.uniform(0.3, 0.6), []
        for i in range(len(months)):
            level = min(0.95, max(0.05, level + rng.uniform(-0.12, 0.14)))
            points.append((left + (right - left) * i / (len(months) - 1), bottom - (bottom - top) * level))
        color = PALETTE[s % len(PALETTE)]
        draw.line(points, fill=color, width=3)
        for x, y in points:
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=color)
        draw.rectangle([left + 10 + 110 * s, 35, left + 22 + 110 * s, 47], fill=color)
        draw.text((left + 27 + 110 * s, 41), name, fill="black", font=font(12), anchor="lm")
    return image


def pie_chart(rng: random.Random, title: str, labels: list[str]) -> Image.Image:
    image, draw = canvas((250, 250, 245))
    weights = [rng.uniform(1, 4) for _ in labels]
    total, start = sum(weights), -90.0
    draw.text((SIZE[0] // 2, 16), title, fill="black", font=font(20), anchor="mt")
    box = [40, 70, 320, 350]
    for i, (label, weight) in enumerate(zip(labels, weights)):
        sweep = 360 * weight / total
        draw.pieslice(box, start, start + sweep, fill=PALETTE[i % len(PALETTE)], outline="white", width=2)
        start += sweep
        draw.rectangle([345, 90 + 32 * i, 361, 106 + 32 * i], fill=PALETTE[i % len(PALETTE)])
        draw.text((370, 98 + 32 * i), f"{label} {100 * weight / total:.0f}%", fill="black", font=font(14),
                  anchor="lm")
    return image


# ---- documents and tables --------------------------------------------------------------------------------------
def document(title: str, paragraphs: list[str], size=(448, 576)) -> Image.Image:
    image, draw = canvas((252, 251, 247), size)
    draw.text((32, 28), title, fill="black", font=font(22))
    draw.line([(32, 60), (size[0] - 32, 60)], fill=(120, 120, 120), width=1)
    y = 74
    body = font(14)
    for paragraph in paragraphs:
        line = ""
        for word in paragraph.split():
            trial = f"{line} {word}".strip()
            if draw.textlength(trial, font=body) > size[0] - 64:
                draw.text((32, y), line, fill=(30, 30, 30), font=body)
                y, line = y + 20, word
            else:
                line = trial
        draw.text((32, y), line, fill=(30, 30, 30), font=body)
        y += 32
    return image


def table(title: str, header: list[str], rows: list[list[str]]) -> Image.Image:
    image, draw = canvas()
    draw.text((SIZE[0] // 2, 16), title, fill="black", font=font(19), anchor="mt")
    left, top, row_h = 24, 52, 34
    width = (SIZE[0] - 2 * left) / len(header)
    for r, cells in enumerate([header] + rows):
        y = top + r * row_h
        if r == 0:
            draw.rectangle([left, y, SIZE[0] - left, y + row_h], fill=(52, 101, 164))
        elif r % 2 == 0:
            draw.rectangle([left, y, SIZE[0] - left, y + row_h], fill=(238, 242, 248))
        for c, cell in enumerate(cells):
            draw.text((left + c * width + 8, y + row_h / 2), cell, fill="white" if r == 0 else "black",
                      font=font(14), anchor="lm")
    bottom = top + (len(rows) + 1) * row_h
    draw.rectangle([left, top, SIZE[0] - left, bottom], outline=(90, 90, 90))
    return image


def receipt(rng: random.Random) -> Image.Image:
    image, draw = canvas((255, 255, 250), (320, 480))
    items = [("Rye bread", 3.20), ("Apples 1 kg", 2.85), ("Oat milk", 1.99), ("Coffee beans", 8.50),
             ("Tomatoes", 2.40), ("Notebook A5", 4.10)]
    draw.text((160, 22), "CORNER MARKET", fill="black", font=font(20), anchor="mt")
    draw.text((160, 50), "12 Harbour Road  -  Till 3", fill="black", font=font(12), anchor="mt")
    y, total = 90, 0.0
    for name, price in items:
        count = rng.randint(1, 3)
        total += count * price
        draw.text((20, y), f"{count} x {name}", fill="black", font=font(14))
        draw.text((300, y), f"{count * price:.2f}", fill="black", font=font(14), anchor="ra")
        y += 26
    draw.line([(20, y + 4), (300, y + 4)], fill="black")
    draw.text((20, y + 14), "TOTAL", fill="black", font=font(16))
    draw.text((300, y + 14), f"{total:.2f}", fill="black", font=font(16), anchor="ra")
    draw.text((160, y + 60), "Thank you for shopping with us", fill="black", font=font(12), anchor="mt")
    return image


# ---- diagrams --------------------------------------------------------------------------------------------------
def flowchart() -> Image.Image:
    image, draw = canvas()
    steps = ["Load checkpoint", "Calibrate", "Quantize layer", "Check format", "Save"]
    for i, step in enumerate(steps):
        x, y = 30 + (i % 3) * 165, 60 + (i // 3) * 170
        draw.rounded_rectangle([x, y, x + 130, y + 60], radius=12, fill=PALETTE[i], outline="black")
        draw.text((x + 65, y + 30), step, fill="white", font=font(14), anchor="mm")
        if i < len(steps) - 1:
            nx, ny = 30 + ((i + 1) % 3) * 165, 60 + ((i + 1) // 3) * 170
            start, end = ((x + 130, y + 30), (nx, ny + 30)) if ny == y else ((x + 65, y + 60), (nx + 65, ny))
            draw.line([start, end], fill="black", width=2)
            draw.ellipse([end[0] - 4, end[1] - 4, end[0] + 4, end[1] + 4], fill="black")
    draw.text((SIZE[0] // 2, 20), "Processing pipeline", fill="black", font=font(18), anchor="mt")
    return image


def clock_face(hour: int, minute: int) -> Image.Image:
    image, draw = canvas((240, 236, 228), (384, 384))
    c, r = 192, 160
    draw.ellipse([c - r, c - r, c + r, c + r], fill="white", outline="black", width=4)
    for h in range(1, 13):
        a = math.radians(h * 30 - 90)
        draw.text((c + 0.82 * r * math.cos(a), c + 0.82 * r * math.sin(a)), str(h), fill="black", font=font(22),
                  anchor="mm")
    for angle, length, width in (((hour % 12 + minute / 60) * 30, 0.5, 8), (minute * 6, 0.75, 4)):
        a = math.radians(angle - 90)
        draw.line([(c, c), (c + length * r * math.cos(a), c + length * r * math.sin(a))], fill="black", width=width)
    draw.ellipse([c - 6, c - 6, c + 6, c + 6], fill="black")
    return image


def floor_plan() -> Image.Image:
    image, draw = canvas((250, 250, 250))
    rooms = [("Kitchen", (30, 40, 220, 200)), ("Living room", (220, 40, 480, 240)), ("Bath", (30, 200, 140, 340)),
             ("Bedroom", (140, 200, 330, 340)), ("Study", (330, 240, 480, 340))]
    for name, box in rooms:
        draw.rectangle(box, outline="black", width=4)
        draw.text(((box[0] + box[2]) / 2, (box[1] + box[3]) / 2), name, fill="black", font=font(15), anchor="mm")
    for x, y in ((220, 120), (200, 270), (330, 290)):  # doors: gaps in the walls
        draw.rectangle([x - 3, y - 14, x + 3, y + 14], fill=(250, 250, 250))
    draw.text((SIZE[0] // 2, 362), "Ground floor, 1 square = 1 m", fill=(60, 60, 60), font=font(12), anchor="mm")
    return image


# ---- scenes ----------------------------------------------------------------------------------------------------
def sky(draw: ImageDraw.ImageDraw, top=(110, 170, 230), bottom=(200, 225, 245), height=SIZE[1]) -> None:
    for y in range(height):
        t = y / height
        draw.line([(0, y), (SIZE[0], y)], fill=tuple(int(a + (b - a) * t) for a, b in zip(top, bottom)))


def landscape(rng: random.Random) -> Image.Image:
    image, draw = canvas()
    sky(draw)
    draw.ellipse([400, 40, 460, 100], fill=(255, 220, 90))
    for i in range(3):  # mountains
        x = 60 + 170 * i + rng.randint(-20, 20)
        draw.polygon([(x - 150, 280), (x, 110 + rng.randint(0, 40)), (x + 150, 280)], fill=(100 + 20 * i, 110, 130))
    draw.rectangle([0, 270, SIZE[0], SIZE[1]], fill=(96, 160, 72))
    for _ in range(9):  # trees
        x, y = rng.randint(10, 500), rng.randint(285, 360)
        draw.rectangle([x - 3, y, x + 3, y + 20], fill=(110, 70, 40))
        draw.polygon([(x - 14, y + 4), (x, y - 30), (x + 14, y + 4)], fill=(40, 110, 50))
    return image


def street(rng: random.Random) -> Image.Image:
    image, draw = canvas()
    sky(draw, (150, 190, 235), (225, 235, 245))
    x = 0
    while x < SIZE[0]:  # houses
        w, h = rng.randint(70, 110), rng.randint(110, 190)
        color = (rng.randint(150, 230), rng.randint(120, 200), rng.randint(100, 170))
        draw.rectangle([x, 280 - h, x + w, 280], fill=color, outline=(70, 60, 50))
        draw.polygon([(x - 4, 280 - h), (x + w / 2, 250 - h), (x + w + 4, 280 - h)], fill=(140, 60, 50))
        for wy in range(290 - h, 250, 40):
            for wx in (x + 12, x + w - 30):
                draw.rectangle([wx, wy, wx + 18, wy + 22], fill=(250, 245, 200), outline=(70, 60, 50))
        x += w + rng.randint(4, 12)
    draw.rectangle([0, 280, SIZE[0], SIZE[1]], fill=(90, 90, 95))
    for lx in range(10, SIZE[0], 70):
        draw.rectangle([lx, 326, lx + 40, 332], fill="white")
    car = rng.randint(60, 360)
    draw.rounded_rectangle([car, 300, car + 110, 340], radius=10, fill=(204, 0, 0))
    draw.rectangle([car + 20, 284, car + 85, 304], fill=(204, 0, 0))
    for wx in (car + 22, car + 88):
        draw.ellipse([wx - 12, 330, wx + 12, 354], fill="black")
    return image


def still_life(rng: random.Random) -> Image.Image:
    image, draw = canvas((236, 226, 210))
    draw.rectangle([0, 250, SIZE[0], SIZE[1]], fill=(150, 105, 70))
    draw.ellipse([60, 180, 180, 300], fill=(200, 30, 40))  # apple
    draw.line([(120, 185), (126, 160)], fill=(90, 60, 30), width=5)
    draw.polygon([(230, 120), (300, 120), (310, 300), (220, 300)], fill=(60, 120, 170))  # vase
    for _ in range(5):
        x, y = rng.randint(215, 315), rng.randint(40, 110)
        draw.line([(265, 120), (x, y)], fill=(40, 110, 50), width=3)
        draw.ellipse([x - 12, y - 12, x + 12, y + 12], fill=PALETTE[rng.randint(1, 5)])
    draw.rectangle([350, 200, 470, 300], fill=(245, 245, 235), outline=(80, 80, 80), width=2)  # book
    draw.text((410, 250), "POEMS", fill="black", font=font(16), anchor="mm")
    return image


def shapes_grid(rng: random.Random) -> Image.Image:
    image, draw = canvas()
    kinds = ["circle", "square", "triangle"]
    for row in range(3):
        for col in range(4):
            x, y, kind = 70 + 125 * col, 70 + 120 * row, rng.choice(kinds)
            color = PALETTE[rng.randint(0, len(PALETTE) - 1)]
            if kind == "circle":
                draw.ellipse([x - 35, y - 35, x + 35, y + 35], fill=color)
            elif kind == "square":
                draw.rectangle([x - 32, y - 32, x + 32, y + 32], fill=color)
            else:
                draw.polygon([(x, y - 38), (x - 38, y + 30), (x + 38, y + 30)], fill=color)
    return image


def night_sky(rng: random.Random) -> Image.Image:
    image, draw = canvas()
    sky(draw, (8, 12, 40), (40, 50, 100))
    for _ in range(160):
        x, y, r = rng.randint(0, SIZE[0]), rng.randint(0, 260), rng.choice((1, 1, 1, 2))
        draw.ellipse([x - r, y - r, x + r, y + r], fill=(255, 255, 230))
    draw.ellipse([380, 40, 450, 110], fill=(245, 240, 210))
    draw.ellipse([400, 32, 468, 100], fill=(20, 26, 62))  # crescent
    draw.polygon([(0, 384), (0, 300), (120, 250), (260, 310), (380, 270), (512, 320), (512, 384)], fill=(10, 10, 20))
    return image


PARAGRAPHS = [
    "The river project began in spring with a survey of the banks. Volunteers counted birds at six points every "
    "morning and wrote the numbers in a shared notebook.",
    "By midsummer the water was clearer. The team noted that herons returned to the northern reach first, and "
    "that the reeds planted in April had doubled in height.",
    "Next year the group plans to add two counting points and to publish the data each month.",
]
NOTICE = [
    "From Monday 3 March the library opens at 9:00 and closes at 20:00 on weekdays.",
    "On Saturdays the reading room is open from 10:00 to 16:00. The archive is closed on Sundays.",
    "Please return borrowed laptops to the front desk before closing time.",
]
RECIPE = [
    "Ingredients: 200 g flour, 2 eggs, 300 ml milk, a pinch of salt, butter for the pan.",
    "1. Whisk the flour and salt, then add the eggs and half of the milk. 2. Stir until smooth and add the rest "
    "of the milk. 3. Rest the batter for 20 minutes.",
    "4. Heat a little butter in a pan and pour a thin layer of batter. Cook each side for about one minute.",
]


def images() -> list[tuple[str, Callable[[random.Random], Image.Image], str]]:
    """(file name, how to draw it, its prompt)."""
    return [
        ("bar_sales.png", lambda r: bar_chart(r, "Quarterly sales by region", ["North", "South", "East", "West"],
                                              "k units"),
         "Which region had the highest sales in this chart, and by how much did it lead the lowest?"),
        ("bar_energy.png", lambda r: bar_chart(r, "Energy use by appliance", ["Oven", "Fridge", "Heater", "TV",
                                                                              "Lamp"], "kWh"),
         "Describe this bar chart and list the appliances from highest to lowest energy use."),
        ("line_temperature.png", lambda r: line_chart(r, "Monthly average temperature", ["Oslo", "Lisbon"]),
         "Compare the two lines in this chart. In which months is the difference largest?"),
        ("line_traffic.png", lambda r: line_chart(r, "Website visitors (thousands)", ["Desktop", "Mobile", "Tablet"]),
         "What trends do you see for each device type over the year?"),
        ("pie_budget.png", lambda r: pie_chart(r, "Household budget", ["Rent", "Food", "Transport", "Savings",
                                                                        "Other"]),
         "Summarize how this household budget is split."),
        ("doc_report.png", lambda r: document("River survey: summary", PARAGRAPHS),
         "Read the document in the image and summarize it in two sentences."),
        ("doc_notice.png", lambda r: document("Library opening hours", NOTICE),
         "When does the library close on Saturdays, according to this notice?"),
        ("doc_recipe.png", lambda r: document("Simple pancakes", RECIPE),
         "Transcribe the ingredient list from this recipe card."),
        ("table_trains.png", lambda r: table("Departures", ["Train", "To", "Time", "Platform"],
                                             [["IC 512", "Hamburg", "08:14", "4"], ["RE 7", "Kiel", "08:32", "2"],
                                              ["ICE 90", "Berlin", "09:05", "6"], ["RB 21", "Rostock", "09:20", "1"],
                                              ["IC 516", "Bremen", "10:14", "4"]]),
         "Which train leaves for Berlin, and from which platform?"),
        ("table_grades.png", lambda r: table("Course results", ["Student", "Math", "Physics", "Art"],
                                             [["Ana", "91", "84", "77"], ["Ben", "68", "72", "95"],
                                              ["Chen", "88", "93", "81"], ["Dara", "74", "65", "90"]]),
         "Who has the best physics score in this table? Explain how you found it."),
        ("receipt.png", receipt, "What is the total on this receipt, and which item cost the most?"),
        ("flowchart.png", lambda r: flowchart(), "Explain the steps shown in this diagram in order."),
        ("clock.png", lambda r: clock_face(10, 10), "What time does this clock show?"),
        ("floor_plan.png", lambda r: floor_plan(), "Describe the layout of this floor plan. Which rooms are next to "
                                                   "the bedroom?"),
        ("landscape.jpg", landscape, "Describe this image in detail."),
        ("street.jpg", street, "Describe the scene. What colour is the car and where is it?"),
        ("still_life.jpg", still_life, "List the objects on the table and their colours."),
        ("shapes.png", shapes_grid, "How many circles, squares and triangles are in this picture?"),
        ("night_sky.jpg", night_sky, "Describe this image in detail."),
        ("bar_languages.png", lambda r: bar_chart(r, "Survey: languages used at work", ["Python", "C++", "Java", "Go",
                                                                                          "Rust", "SQL"], "%"),
         "Which languages are used by more than half of the respondents?"),
    ]


def write_image_set(out: Path, entries: list[tuple[str, Callable[[random.Random], Image.Image], str]],
                    seed_base: int) -> list[Path]:
    """Draw `entries` (file name, how to draw it, its prompt) into `out` with one seeded generator per image
    (seed_base + n), and write their index.jsonl."""
    out.mkdir(parents=True, exist_ok=True)
    written, index = [], []
    for number, (name, draw, prompt) in enumerate(entries):
        image = draw(random.Random(seed_base + number))
        path = out / name
        if path.suffix == ".jpg":
            image.save(path, quality=85, optimize=True)
        else:
            image.save(path, optimize=True)
        written.append(path)
        index.append({"image": name, "text": prompt})
    (out / "index.jsonl").write_text("".join(json.dumps(e, ensure_ascii=False) + "\n" for e in index),
                                     encoding="utf-8")
    return written


def write(out: Path = OUT) -> list[Path]:
    return write_image_set(out, images(), SEED_BASE)


def run_cli(description: str, default_out: Path, write_to: Callable[[Path], list[Path]]) -> None:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--out", type=Path, default=default_out)
    args = parser.parse_args()
    paths = write_to(args.out)
    print(f"{len(paths)} images, {sum(p.stat().st_size for p in paths) / 1024:.0f} KiB in {args.out}")


def main() -> None:
    run_cli(__doc__.split("\n\n")[0], OUT, write)


if __name__ == "__main__":
    main()
