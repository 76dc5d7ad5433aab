"""Writes data/examples/extract_json.jsonl: a small learnable task of the project's own making, for the
"did it help?" evaluation. Each record asks to pull a person's name, age, city and job out of one sentence
into JSON; the answer is that JSON. Deterministic (seed 0): `python data/make_extract_json.py` rewrites
the same file.
"""

import json
import random
from pathlib import Path

FIRST = ["Bela", "Ana", "Marko", "Ivana", "Tomas", "Lena", "Omar", "Sara", "Luka", "Mira", "Jonas", "Eva",
         "Pavel", "Nina", "Karim", "Alma", "Rui", "Ines", "Dario", "Zora"]
LAST = ["Silva", "Horvat", "Novak", "Kovac", "Berg", "Haddad", "Costa", "Weber", "Marin", "Lund", "Petrov", "Ruiz"]
CITIES = ["Split", "Porto", "Ghent", "Tartu", "Bergen", "Lyon", "Graz", "Cluj", "Malmo", "Bari", "Brno", "Turku"]
JOBS = ["nurse", "baker", "pilot", "teacher", "plumber", "chemist", "florist", "lawyer", "welder", "librarian",
        "architect", "farmer"]
TEMPLATES = [
    "{name} is a {age}-year-old {job} who lives in {city}.",
    "Meet {name}, {age}, a {job} from {city}.",
    "In {city}, {name} works as a {job}; {name_first} turned {age} this year.",
    "{name}, aged {age}, has been a {job} in {city} for years.",
    "The {job} {name} ({age}) moved to {city} last spring.",
]
SYSTEM = ("Extract the person's name, age, city and job from the sentence. Answer with JSON only: "
          '{"name": ..., "age": ..., "city": ..., "job": ...}')


def record(rng: random.Random) -> dict:
    first, last = rng.choice(FIRST), rng.choice(LAST)
    fields = {"name": f"{first} {last}", "age": rng.randint(19, 78), "city": rng.choice(CITIES), "job": rng.choice(JOBS)}
    sentence = rng.choice(TEMPLATES).format(**fields, name_first=first)
    return {"messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": sentence},
                         {"role": "assistant", "content": json.dumps(fields)}]}


def main(n: int = 200, path: Path = Path(__file__).parent / "examples" / "extract_json.jsonl") -> None:
    rng = random.Random(0)
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(n):
            f.write(json.dumps(record(rng)) + "\n")


if __name__ == "__main__":
    main()
