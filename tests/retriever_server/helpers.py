"""Test helpers: real waitress servers on loopback ports, HTTP calls, a generated corpus."""

from __future__ import annotations

import json
import random
from pathlib import Path

import requests

from retriever_server.http_server import serving  # noqa: F401 (the tests' server fixture, re-exported)


def post_retrieve(url: str, payload, **kwargs) -> requests.Response:
    return requests.post(f"{url}/retrieve", json=payload, timeout=60, **kwargs)


_SUBJECTS = ["harbour", "observatory", "monastery", "railway", "orchard", "lighthouse", "vineyard", "foundry",
             "library", "canal", "glacier", "market", "bridge", "museum", "quarry", "theatre"]
_PLACES = ["Aldermoor", "Brisca", "Corvana", "Delmont", "Eskerby", "Farrowdale", "Galvany", "Hollins",
           "Istria Vale", "Jorrin", "Kestwick", "Lunmere", "Marrow Bay", "Norvik", "Oakhelm", "Pellisar"]
_TRAITS = ["its copper roof", "a spring festival", "rare orchids", "a clock tower", "salt trade", "stone carvings",
           "winter fairs", "a silver mine", "river ferries", "a printing press", "wool dyeing", "glass making"]


def write_generated_corpus(path: Path, count: int, seed: int = 7) -> list[str]:
    """A synthetic jsonl corpus of distinct templated passages; returns their contents."""
    rng = random.Random(seed)
    contents = []
    with open(path, "w", encoding="utf-8") as handle:
        for number in range(count):
            subject, place = rng.choice(_SUBJECTS), rng.choice(_PLACES)
            traits = rng.sample(_TRAITS, 2)
            year = rng.randint(1200, 1990)
            text = (f"The {subject} of {place} number {number} was founded in {year}. It is known for "
                    f"{traits[0]} and {traits[1]}.")
            contents.append(f'"{place} {subject} {number}"\n{text}')
            handle.write(json.dumps({"id": f"g{number}", "contents": contents[-1]}) + "\n")
    return contents
