"""
Spelling and letter counting, offline. Two kinds of item:
- "count": "How many r are in strawberry?" -> spell the word out, list where the letter
  occurs, check with the calculator tool ('strawberry'.count('r')), answer "#### 3".
- "spell": "Spell the word banana." -> "b-a-n-a-n-a".
Tokenizers see words as chunks, not letters, which is why small chat models get these wrong;
spelling out letter by letter first is the habit being taught.

Words come from the built-in list below. Which split a word belongs to is decided by a hash
of the word (1 in 5 go to "test"), so train and test never ask about the same word.
Item i of a split is a pure function of (seed, split, i).
"""

import re
import random

from tasks.common import Task, stable_hash, in_split, evaluate_final_number

WORDS = """
strawberry banana apple cherry orange lemon grape melon papaya mango coconut pineapple raspberry
blueberry apricot avocado broccoli cucumber tomato potato carrot pumpkin spinach lettuce celery
bottle window kitchen blanket pillow mirror ladder hammer scissors pencil notebook library
elephant giraffe kangaroo penguin dolphin octopus squirrel hedgehog butterfly mosquito crocodile
parrot rabbit turtle zebra gorilla cheetah panther buffalo hippopotamus flamingo
mississippi committee balloon coffee address success possession occasion necessary accommodate
embarrass millennium parallel tomorrow bookkeeper assessment referee letter summer dinner
mountain river valley volcano island desert glacier canyon meadow forest ocean horizon
computer keyboard monitor printer software hardware network program function variable
algorithm compiler database processor terminal
happiness kindness darkness wilderness business sweetness goodness loneliness
beautiful wonderful powerful grateful careful cheerful peaceful
umbrella sandwich chocolate spaghetti macaroni vanilla cinnamon pepper mustard
calendar February Wednesday afternoon yesterday midnight tonight weekend
bicycle airplane helicopter submarine scooter tractor railroad
geography chemistry astronomy biology mathematics philosophy history literature
engineer architect musician teacher farmer dentist plumber carpenter
whisper thunder lightning rainbow blizzard hurricane tornado drizzle
bubble puzzle giggle noodle paddle pebble riddle waffle
abracadabra banana bandanna assassin unnecessarily occurrence
""".split()
WORDS = sorted(set(w.lower() for w in WORDS))

COUNT_TEMPLATES = [
    "How many {letter} are in {word}?",
    "How many times does the letter {letter} appear in the word {word}?",
    "Count the letter '{letter}' in \"{word}\".",
    "How many {letter}'s does {word} have?",
    "In the word {word}, how many times do you see the letter {letter}?",
]
SPELL_TEMPLATES = [
    "Spell the word {word}.",
    "How do you spell {word}? Letter by letter, please.",
    "Can you spell out \"{word}\" one letter at a time?",
]


def split_words(split):
    return [w for w in WORDS if in_split(w, split, test_every=5)]


def count_conversation(word, letter, template):
    n = word.count(letter)
    positions = [str(i + 1) for i, ch in enumerate(word) if ch == letter]
    spelled = "-".join(word)
    if positions:
        found = f"The letter {letter} is at position{'s' if n > 1 else ''} {', '.join(positions)}, so I count {n}."
    else:
        found = f"The letter {letter} does not appear at all, so I count 0."
    parts = [
        {"type": "text", "text": f"Let me spell out {word} and look for {letter}:\n{spelled}\n{found}\nChecking with Python: "},
        {"type": "python", "text": f"'{word}'.count('{letter}')"},
        {"type": "python_output", "text": str(n)},
        {"type": "text", "text": f"\nThe letter {letter} appears {n} time{'' if n == 1 else 's'} in {word}.\n#### {n}"},
    ]
    return {"messages": [{"role": "user", "content": template.format(word=word, letter=letter)},
                         {"role": "assistant", "content": parts}],
            "kind": "count", "word": word, "letter": letter, "answer": n}


def spell_conversation(word, template):
    answer = f"{word} is spelled: {'-'.join(word)} ({len(word)} letters)."
    return {"messages": [{"role": "user", "content": template.format(word=word)},
                         {"role": "assistant", "content": answer}],
            "kind": "spell", "word": word}


class Spelling(Task):
    """Letter counting (4 in 5 items) and spelling (1 in 5); size is how many items the split serves."""
    eval_type = "generative"

    def __init__(self, split="train", size=5000, seed=0, **kwargs):
        super().__init__(**kwargs)
        assert split in ("train", "test"), f"Spelling split must be train or test, got {split!r}"
        self.split, self.size, self.seed = split, size, seed
        self.words = split_words(split)
        assert self.words, f"no words in split {split}"

    def num_examples(self):
        return self.size

    def get_example(self, index):
        rng = random.Random(stable_hash("spelling", self.seed, self.split, index))
        word = rng.choice(self.words)
        if rng.random() < 0.2:
            return spell_conversation(word, rng.choice(SPELL_TEMPLATES))
        # mostly a letter of the word (favouring repeated ones), sometimes one it lacks
        if rng.random() < 0.85:
            letter = rng.choice(word)
        else:
            letter = rng.choice([c for c in "abcdefghijklmnopqrstuvwxyz" if c not in word])
        return count_conversation(word, letter, rng.choice(COUNT_TEMPLATES))

    def evaluate(self, conversation, assistant_response):
        """count: the number after '####' is right; spell: the dashed spelling appears in the response as a
        whole (not inside a longer one: p-i-n-e-a-p-p-l-e or a-p-p-l-e-s is not apple)."""
        if conversation["kind"] == "spell":
            spelled = re.escape("-".join(conversation["word"]))
            return re.search(rf"(?<![a-z-]){spelled}(?!-?[a-z])", assistant_response.lower()) is not None
        return evaluate_final_number(conversation, assistant_response)

    def reward(self, conversation, assistant_response):
        return float(self.evaluate(conversation, assistant_response))
