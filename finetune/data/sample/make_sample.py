"""Regenerate the shipped sample datasets (deterministic): ``python -m finetune.data.sample.make_sample``.

- ``instructions-{train,eval}.jsonl`` (alpaca format): short string tasks on made-up words whose
  answer follows from the word by a fixed rule (:data:`FIRST_RUN_TASKS`), so a tiny character-level
  model visibly learns them in minutes; no held-out word occurs in train.
- ``preference-{train,eval}.jsonl`` (prompt / chosen / rejected): the instruction rows'
  (:data:`FIRST_RUN_TASKS`; the held-out pairs are the held-out instruction prompts) as pairs,
  chosen = the right answer, rejected = a plausible wrong one (:func:`wrong_answer`), for DPO.
- ``kto-{train,eval}.jsonl`` (prompt / completion / boolean label): the instruction rows unpaired for
  KTO, each with either its right answer (label true) or a plausible wrong one (label false).
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

# The instruction files' tasks: each answer follows from the word by a per-character rule a
# 1M-parameter model learns in a couple of minutes of CPU (README.md, "The first run").
FIRST_RUN_TASKS = {
    "Write the word in uppercase.": lambda w: w.upper(),
    "Repeat the word twice.": lambda w: f"{w} {w}",
    "Give the first letter.": lambda w: w[0],
    "Give the last letter.": lambda w: w[-1],
    "Give the first and last letter.": lambda w: f"{w[0]}{w[-1]}",
}

# The earlier, harder tasks: the KTO files are still made from them (unchanged).
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


CONSONANTS, VOWELS = "bdfgklmnprstvz", "aeiou"


def pseudo_word(rng: random.Random) -> str:
    """A made-up, pronounceable word of 2-3 syllables ("bakoti"): too many to memorise, so the
    model has to learn each task's rule."""
    return "".join(rng.choice(CONSONANTS) + rng.choice(VOWELS) for _ in range(rng.randint(2, 3)))


def first_run_rows(rng: random.Random, n_train: int, n_eval: int) -> tuple[list[dict], list[dict]]:
    """(train, held-out) rows of :data:`FIRST_RUN_TASKS` on made-up words; no held-out word occurs
    in train, so the held-out exact match measures the rules learnt, not memory."""
    row = lambda task, word: {"instruction": task, "input": word, "output": FIRST_RUN_TASKS[task](word)}  # noqa: E731
    tasks = list(FIRST_RUN_TASKS)
    held_words: set[str] = set()
    while len(held_words) < n_eval:
        held_words.add(pseudo_word(rng))
    held = [row(tasks[i % len(tasks)], w) for i, w in enumerate(sorted(held_words))]
    rng.shuffle(held)
    train = []
    while len(train) < n_train:
        word = pseudo_word(rng)
        if word not in held_words:
            train.append(row(rng.choice(tasks), word))
    return train, held


def review_rows(rng: random.Random, n: int) -> list[dict]:
    rows = []
    for _ in range(n):
        label, words = rng.choice([("positive", GOOD), ("negative", BAD), ("neutral", MEH)])
        text = rng.choice(TEMPLATES).format(t=rng.choice(THINGS), a=rng.choice(words))
        rows.append({"text": text, "label": label})
    return rows


def wrong_answer(row: dict, rng: random.Random) -> str:
    """A plausible wrong answer to an instruction row: the rule slightly off, never the right one."""
    right, word = row["output"], row["input"]
    if row["instruction"] == "Add the two numbers.":
        return str(int(right) + rng.choice([-10, -2, -1, 1, 2, 10]))
    candidates = {
        "Reverse the word.": [word, word[::-1][1:] + word[0], "".join(sorted(word))],
        "Write the word in uppercase.": [word, word.capitalize(), word.upper()[:-1]],
        "Sort the letters of the word alphabetically.": ["".join(sorted(word, reverse=True)), word,
                                                         "".join(sorted(word))[1:]],
        "Repeat the word twice.": [word, f"{word} {word} {word}", f"{word}{word}"],
        "Give the first and last letter.": [f"{word[-1]}{word[0]}", word[:2], word[0]],
        "Give the first letter.": [word[-1], word[:2], word[1]],
        "Give the last letter.": [word[0], word[-2:], word[-2]],
    }[row["instruction"]]
    return rng.choice([c for c in candidates if c != right] or [right + right[-1]])


def preference_rows(rows: list[dict], rng: random.Random) -> list[dict]:
    return [{"prompt": f"{r['instruction']}\n\n{r['input']}", "chosen": r["output"],
             "rejected": wrong_answer(r, rng)} for r in rows]


def kto_rows(rows: list[dict], rng: random.Random) -> list[dict]:
    out = []
    for r in rows:
        desirable = rng.random() < 0.5
        out.append({"prompt": f"{r['instruction']}\n\n{r['input']}",
                    "completion": r["output"] if desirable else wrong_answer(r, rng), "label": desirable})
    return out


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def main(here: Path = Path(__file__).parent) -> None:
    rng = random.Random(1234)
    train, held_out = instruction_rows(rng, 2000), instruction_rows(rng, 100)
    write_jsonl(here / "reviews-train.jsonl", review_rows(rng, 1200))
    write_jsonl(here / "reviews-eval.jsonl", review_rows(rng, 150))
    kto_rng = random.Random(9012)  # its own stream: the files above stay as they were
    write_jsonl(here / "kto-train.jsonl", kto_rows(train[:1000], kto_rng))
    write_jsonl(here / "kto-eval.jsonl", kto_rows(held_out, kto_rng))
    first_train, first_eval = first_run_rows(random.Random(3456), 2000, 100)
    write_jsonl(here / "instructions-train.jsonl", first_train)
    write_jsonl(here / "instructions-eval.jsonl", first_eval)
    # The preference pairs are the SFT tasks' own rows (the held-out pairs are the SFT held-out
    # prompts), so DPO from the SFT recipe's adapter is measured on the prompts SFT was.
    pref_rng = random.Random(5678)
    write_jsonl(here / "preference-train.jsonl", preference_rows(first_train[:1000], pref_rng))
    write_jsonl(here / "preference-eval.jsonl", preference_rows(first_eval, pref_rng))


if __name__ == "__main__":
    main()
