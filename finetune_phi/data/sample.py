"""A deterministic, offline UltraChat-format sample.

Conversations come from a handful of skills with fixed facts and answer templates, phrased in
several ways, some with an opening small-talk turn (so held-out rows carry chat history). A tiny
model cannot learn open-ended chat in minutes, but it can learn these facts and answer shapes, so a
short fine-tune shows a real gain on held-out rows: unseen phrasings, names and number pairs.
"""

from __future__ import annotations

import hashlib
import json
import random

from ..errors import UserError


CAPITALS = {
    "France": "Paris",
    "Germany": "Berlin",
    "Italy": "Rome",
    "Spain": "Madrid",
    "Japan": "Tokyo",
    "Canada": "Ottawa",
    "Egypt": "Cairo",
    "Kenya": "Nairobi",
    "Peru": "Lima",
    "Chile": "Santiago",
    "Norway": "Oslo",
    "Sweden": "Stockholm",
    "Poland": "Warsaw",
    "Greece": "Athens",
    "India": "New Delhi",
    "China": "Beijing",
    "Brazil": "Brasilia",
    "Mexico": "Mexico City",
    "Ireland": "Dublin",
    "Portugal": "Lisbon",
    "Austria": "Vienna",
    "Hungary": "Budapest",
    "Finland": "Helsinki",
    "Denmark": "Copenhagen",
}
OPPOSITES = {
    "hot": "cold",
    "big": "small",
    "fast": "slow",
    "happy": "sad",
    "light": "dark",
    "early": "late",
    "open": "closed",
    "strong": "weak",
    "young": "old",
    "full": "empty",
    "high": "low",
    "rich": "poor",
    "loud": "quiet",
    "hard": "soft",
    "wet": "dry",
    "near": "far",
}
SOUNDS = {
    "dog": "woof",
    "cat": "meow",
    "cow": "moo",
    "duck": "quack",
    "sheep": "baa",
    "lion": "roar",
    "owl": "hoot",
    "horse": "neigh",
    "frog": "ribbit",
    "bee": "buzz",
    "pig": "oink",
    "snake": "hiss",
}
NAMES = [
    "Alice",
    "Bob",
    "Carla",
    "David",
    "Emma",
    "Farid",
    "Grace",
    "Hugo",
    "Ines",
    "Jonas",
    "Kemal",
    "Lena",
    "Maya",
    "Nikos",
    "Olga",
    "Pedro",
    "Quinn",
    "Rosa",
    "Sami",
    "Tara",
    "Umar",
    "Vera",
    "Wang",
    "Yuki",
]

SKILLS = {
    "capital": (
        [
            "What is the capital of {x}?",
            "Which city is the capital of {x}?",
            "Tell me the capital city of {x}.",
            "Do you know the capital of {x}?",
        ],
        "The capital of {x} is {y}.",
    ),
    "opposite": (
        [
            "What is the opposite of {x}?",
            "Give me the opposite of the word {x}.",
            "What word means the opposite of {x}?",
        ],
        "The opposite of {x} is {y}.",
    ),
    "sound": (
        ["What sound does a {x} make?", "How does a {x} sound?", "Which noise does a {x} make?"],
        "A {x} says {y}.",
    ),
    "sum": (
        ["What is {a} plus {b}?", "Add {a} and {b}.", "Can you compute {a} + {b}?"],
        "{a} plus {b} equals {y}.",
    ),
    "greet": (
        ["Write a short greeting for {x}.", "Say hello to {x}.", "Please greet my friend {x}."],
        "Hello {x}! It is great to meet you.",
    ),
}
OPENERS = [
    ("Hi, my name is {n}.", "Hello {n}! How can I help you today?"),
    ("Good morning! I am {n}.", "Good morning {n}! What would you like to know?"),
]


def _conversation(rng: random.Random) -> list[dict]:
    skill = rng.choice(sorted(SKILLS))
    phrasings, answer = SKILLS[skill]
    question = rng.choice(phrasings)
    if skill == "sum":
        a, b = rng.randint(1, 49), rng.randint(1, 49)
        fields = {"a": a, "b": b, "y": a + b}
    else:
        table = {"capital": CAPITALS, "opposite": OPPOSITES, "sound": SOUNDS}.get(skill)
        x = rng.choice(sorted(table)) if table else rng.choice(NAMES)
        fields = {"x": x, "y": table[x] if table else ""}
    messages = []
    if rng.random() < 0.35:
        opener_q, opener_a = rng.choice(OPENERS)
        name = rng.choice(NAMES)
        messages += [
            {"role": "user", "content": opener_q.format(n=name)},
            {"role": "assistant", "content": opener_a.format(n=name)},
        ]
    messages += [
        {"role": "user", "content": question.format(**fields)},
        {"role": "assistant", "content": answer.format(**fields)},
    ]
    return messages


def generate_sample(n: int = 600, seed: int = 0) -> list[dict]:
    """n distinct conversations in the ultrachat_200k schema; the same n and seed give the same rows."""
    rng = random.Random(seed)
    rows, seen = [], set()
    attempts = 0
    while len(rows) < n:
        attempts += 1
        if attempts > 50 * n:
            raise UserError(f"cannot make {n} distinct sample conversations; ask for fewer")
        messages = _conversation(rng)
        key = json.dumps(messages, sort_keys=True)
        if key in seen:
            continue
        seen.add(key)
        prompt = messages[0]["content"]
        rows.append({"prompt": prompt, "prompt_id": hashlib.sha256(key.encode()).hexdigest(), "messages": messages})
    return rows
