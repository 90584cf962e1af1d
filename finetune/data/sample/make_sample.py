"""Regenerate the shipped sample datasets (deterministic): ``python -m finetune.data.sample.make_sample``.

- ``instructions-{train,eval}.jsonl`` (alpaca format): short string tasks whose answer follows from
  the input by a fixed rule, so a tiny character-level model visibly learns them in minutes.
- ``reviews-{train,eval}.jsonl`` (text + label): short product reviews labelled
  positive / negative / neutral by the words they contain.
Written by this project; no third-party data.
"""

import json
import random
from pathlib import Path

WORDS = (
    "apple river stone cloud tiger garden silver planet window candle forest bridge rocket "
    "pencil summer winter orange purple dragon castle market ocean desert island mirror "
    "button yellow butter paper basket guitar violin rabbit turtle monkey parrot spider "
    "coffee cookie honey lemon melon pepper tomato potato carrot cherry banana grape "
    "music poem story letter number circle square engine wheel anchor harbor valley meadow "
    "thunder breeze shadow sunset morning evening silent gentle bright quick happy brave "
    "clever humble simple narrow hollow frozen golden wooden"
).split()

TASKS = {
    "Reverse the word.": lambda w: w[::-1],
    "Write the word in uppercase.": lambda w: w.upper(),
    "Sort the letters of the word alphabetically.": lambda w: "".join(sorted(w)),
    "Repeat the word twice.": lambda w: f"{w} {w}",
    "Give the first and last letter.": lambda w: f"{w[0]}{w[-1]}",
}

GOOD = "great excellent wonderful lovely perfect fantastic superb delightful".split()
BAD = "terrible awful broken useless horrible disappointing poor faulty".split()
MEH = "okay average ordinary acceptable fine standard typical plain".split()
THINGS = "phone blender lamp chair jacket kettle camera backpack keyboard speaker".split()
TEMPLATES = ["the {t} is {a}", "this {t} was {a}", "my new {t} feels {a}", "honestly the {t} is {a}",
             "{a} {t}, would say the same again", "i found the {t} {a}"]


def instruction_rows(rng: random.Random, n: int) -> list[dict]:
    rows = []
    for _ in range(n):
        kind = rng.randrange(len(TASKS) + 1)
        if kind == len(TASKS):
            a, b = rng.randrange(10, 50), rng.randrange(10, 50)
            rows.append({"instruction": "Add the two numbers.", "input": f"{a} + {b}", "output": str(a + b)})
            continue
        instruction, rule = list(TASKS.items())[kind]
        word = rng.choice(WORDS)
        rows.append({"instruction": instruction, "input": word, "output": rule(word)})
    return rows


def review_rows(rng: random.Random, n: int) -> list[dict]:
    rows = []
    for _ in range(n):
        label, words = rng.choice([("positive", GOOD), ("negative", BAD), ("neutral", MEH)])
        text = rng.choice(TEMPLATES).format(t=rng.choice(THINGS), a=rng.choice(words))
        rows.append({"text": text, "label": label})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def main() -> None:
    here = Path(__file__).parent
    rng = random.Random(1234)
    write_jsonl(here / "instructions-train.jsonl", instruction_rows(rng, 2000))
    write_jsonl(here / "instructions-eval.jsonl", instruction_rows(rng, 100))
    write_jsonl(here / "reviews-train.jsonl", review_rows(rng, 1200))
    write_jsonl(here / "reviews-eval.jsonl", review_rows(rng, 150))


if __name__ == "__main__":
    main()
