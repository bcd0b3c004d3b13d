"""Draws the built-in VLM evaluation set `evalImages/` (Pillow only): held-out image+prompt pairs for
`msmodelslim eval` on a vision-language model (app/evaluate_vlm.py).

Same kinds of picture as the calibration set `lab_calib/calibImages` (charts, documents, tables, a receipt, a
clock, scenes), drawn by its generator (lab_calib/make_calib_images.py) but with other titles, labels, words,
times, random seeds (5000 + n, the calibration set uses 1000 + n) and prompts: no image or prompt of the
calibration set is in it. Made here from numbers and words written for this project, under its licence.

    python -m msmodelslim.lab_eval.make_eval_images [--out DIR]

The output is deterministic for a given Pillow version (its bundled default font draws the text).
"""
from __future__ import annotations

import random
from pathlib import Path
from typing import Callable

from PIL import Image

from msmodelslim.lab_calib.make_calib_images import (
    bar_chart,
    clock_face,
    document,
    landscape,
    line_chart,
    pie_chart,
    receipt,
    run_cli,
    shapes_grid,
    still_life,
    street,
    table,
    write_image_set,
)

OUT = Path(__file__).resolve().parent / "evalImages"
SEED_BASE = 5000  # make_calib_images draws with 1000 + n

GARDEN = [
    "The community garden opened twelve new beds this year. Each bed is shared by two families, who agree on a "
    "planting plan in February.",
    "Tomatoes and beans did best in the sunny south corner, while the shaded beds along the wall grew lettuce "
    "and herbs well into October.",
    "A rain barrel collected enough water for most of July, so the tap was only needed during the hottest week.",
]


def images() -> list[tuple[str, Callable[[random.Random], Image.Image], str]]:
    """(file name, how to draw it, its prompt)."""
    return [
        ("bar_rainfall.png", lambda r: bar_chart(r, "Rainfall by season", ["Winter", "Spring", "Summer", "Autumn"],
                                                 "mm"),
         "Which season was the wettest in this chart, and which was the driest?"),
        ("line_prices.png", lambda r: line_chart(r, "Average fruit prices", ["Apples", "Pears"]),
         "Describe how the two prices change over the year."),
        ("pie_time.png", lambda r: pie_chart(r, "How I spend a weekday", ["Sleep", "Work", "Travel", "Meals",
                                                                        "Free time"]),
         "Which activity takes the largest share of the day in this chart?"),
        ("doc_garden.png", lambda r: document("Community garden: season notes", GARDEN),
         "What grew best in the sunny corner, according to this page?"),
        ("table_weather.png", lambda r: table("Weekend forecast", ["Day", "Sky", "High", "Wind"],
                                              [["Friday", "Cloudy", "14", "NW 20"], ["Saturday", "Sunny", "18", "W 10"],
                                               ["Sunday", "Rain", "12", "SW 35"]]),
         "On which day is the wind strongest, and how warm will it be that day?"),
        ("receipt_eval.png", receipt, "List the items on this receipt with their prices."),
        ("clock_eval.png", lambda r: clock_face(3, 45), "Read the time on this clock face."),
        ("landscape_eval.jpg", landscape, "What would you see if you walked into this picture? Describe it."),
        ("street_eval.jpg", street, "Write a short caption for this street scene."),
        ("shapes_eval.png", shapes_grid, "Count the shapes of each kind in this picture."),
        ("still_life_eval.jpg", still_life, "Which object on the table is the largest, and what colour is it?"),
    ]


def write(out: Path = OUT) -> list[Path]:
    return write_image_set(out, images(), SEED_BASE)


def main() -> None:
    run_cli(__doc__.split("\n\n")[0], OUT, write)


if __name__ == "__main__":
    main()
