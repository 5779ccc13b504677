"""A synthetic table-to-text task (E2E-like: a table row -> one sentence), for tests, benchmarks and
trying the training API without a dataset."""

from __future__ import annotations

import random

NAMES = ["Aromi", "Cotto", "Zizzi", "The Mill", "Blue Spice", "The Eagle"]
FOODS = ["Italian", "French", "Indian", "Chinese"]
AREAS = ["riverside", "city centre", "the north"]


def table_to_text(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """n (input, output) pairs, e.g. ("name : Aromi | food : Italian | area : riverside",
    "Aromi is a Italian restaurant in riverside.")."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        name, food, area = rng.choice(NAMES), rng.choice(FOODS), rng.choice(AREAS)
        out.append(
            (f"name : {name} | food : {food} | area : {area}", f"{name} is a {food} restaurant in {area}.")
        )
    return out
