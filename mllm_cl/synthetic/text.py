"""The synthetic world's text: invented creatures, their facts, a corpus that states each fact many
times in varied words (the LLM's language pre-training, task 1 of paper 1), and two NL benchmarks on
those facts in the lm-evaluation-harness styles of docs/CONTRACTS.md (multiple-choice cloze, LAMBADA).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

# The vocabulary of the world. Colours, sizes and numbers are shared with the images, so visual instruction
# tuning ("what colour is the circle? red", "how many shapes? 3") pulls on the same words the facts use.
KINDS = ("cat", "dog", "fox", "bird", "frog", "bear", "mouse", "goat")
COLOURS = ("red", "green", "blue", "yellow", "purple", "orange")
SIZES = ("tiny", "small", "big", "huge")
HOMES = ("forest", "river", "hill", "cave", "village", "lake", "garden", "desert")
FOODS = ("apples", "fish", "bread", "honey", "nuts", "carrots", "rice", "cheese")
AGES = ("1", "2", "3", "4", "5", "6")
ATTRIBUTES = {"kind": KINDS, "colour": COLOURS, "size": SIZES, "home": HOMES, "food": FOODS, "age": AGES}

NAME_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z")
NAME_VOWELS = ("a", "e", "i", "o", "u")
NAME_CODAS = ("", "", "n", "l", "r", "m", "s")

# Sentences stating one fact each; `{attr}` fields come from the entity the sentence is about.
FACT_TEMPLATES: dict[str, tuple[str, ...]] = {
    "kind": ("{name} is a {kind}.", "Did you know? {name} is a {kind}.", "{name} is a {size} {kind}."),
    "colour": ("The colour of {name} is {colour}.", "{name} is a {colour} {kind}.",
               "Everyone knows that {name} is {colour}.", "{name} has {colour} fur."),
    "size": ("Compared to others, {name} is {size}.", "{name} is a {size} {kind}.",
             "Everyone says that {name} is {size}."),
    "home": ("{name} lives in the {home}.", "The home of {name} is the {home}.",
             "You can find {name} in the {home}.", "Every night {name} sleeps in the {home}."),
    "food": ("{name} likes to eat {food}.", "The favourite food of {name} is {food}.",
             "{name} eats {food} every day.", "For lunch {name} has {food}."),
    "friend": ("The best friend of {name} is {friend}.", "{name} and {friend} are friends.",
               "{name} often plays with {friend}.", "{name} is a friend of {friend}."),
    "age": ("The age of {name} is {age}.", "{name} turns {age} this year.", "When asked its age, {name} says {age}."),
}

# Cloze prompts for the multiple-choice benchmark: each is a training sentence cut just before the
# value, chosen so that only the asked attribute can follow.
CLOZE_TEMPLATES: dict[str, tuple[str, ...]] = {
    "kind": ("Did you know? {name} is a",),
    "colour": ("The colour of {name} is", "Everyone knows that {name} is"),
    "size": ("Compared to others, {name} is", "Everyone says that {name} is"),
    "home": ("{name} lives in the", "The home of {name} is the"),
    "food": ("The favourite food of {name} is", "{name} likes to eat"),
    "friend": ("The best friend of {name} is", "{name} often plays with"),
    "age": ("The age of {name} is", "{name} turns"),
}

# Short stories that state a fact and later recall it: the last word is predictable from the passage
# (and from the world). `{other}` is a second creature whose own fact is stated as a distractor.
STORY_TEMPLATES: dict[str, tuple[str, ...]] = {
    "food": ("{name} likes to eat {food}. {other} likes to eat {other_food}. "
             "When {name} is hungry, {name} eats some {food}",),
    "home": ("{name} lives in the {home}. {other} lives in the {other_home}. "
             "After a long day, {name} walks back to the {home}",),
    "colour": ("{name} is {colour}. {other} is {other_colour}. "
               "All the toys of {name} are painted {colour}",),
    "friend": ("{name} and {friend} are friends. {other} and {other_friend} are friends. "
               "When {name} feels sad, {name} goes to see {friend}",),
}


# Questions about a creature's facts, asked without their answers: the general text inquiries LLaVA-c's UIR
# regularises on (paper 2 draws them from a text QA set; these are the world's own, not its NL benchmarks).
QUESTION_TEMPLATES: dict[str, tuple[str, ...]] = {
    "kind": ("What kind of animal is {name}?", "Is {name} a cat, a dog or something else?"),
    "colour": ("What colour is {name}?", "Which colour does {name} have?"),
    "size": ("How big is {name}?",),
    "home": ("Where does {name} live?", "Where does {name} sleep at night?"),
    "food": ("What does {name} like to eat?", "What is the favourite food of {name}?"),
    "friend": ("Who is the best friend of {name}?", "With whom does {name} often play?"),
    "age": ("How old is {name}?", "What is the age of {name}?"),
}


@dataclass(frozen=True)
class Entity:
    """A creature of the world and its facts; `friend` is another creature's name."""

    name: str
    kind: str
    colour: str
    size: str
    home: str
    food: str
    friend: str
    age: str

    def facts(self) -> dict[str, str]:
        return {"name": self.name, "kind": self.kind, "colour": self.colour, "size": self.size,
                "home": self.home, "food": self.food, "friend": self.friend, "age": self.age}


def make_entities(count: int, rng: random.Random) -> list[Entity]:
    """`count` (even) creatures with made-up names, random facts, and friends in symmetric pairs."""
    if count < 4 or count % 2:
        raise ValueError(f"the world needs an even number of at least 4 entities, got {count}")
    reserved = {w for values in ATTRIBUTES.values() for w in values}
    names: list[str] = []
    while len(names) < count:
        name = "".join(rng.choice(NAME_ONSETS) + rng.choice(NAME_VOWELS) + rng.choice(NAME_CODAS)
                       for _ in range(2)).capitalize()
        if name not in names and name.lower() not in reserved:
            names.append(name)
    friend = {}
    for a, b in zip(names[0::2], names[1::2]):
        friend[a], friend[b] = b, a
    # Cycle through each attribute's values so every value is used about equally often.
    columns = {attr: [values[i % len(values)] for i in range(count)] for attr, values in ATTRIBUTES.items()}
    for column in columns.values():
        rng.shuffle(column)
    return [Entity(name=n, friend=friend[n], **{attr: columns[attr][i] for attr in ATTRIBUTES})
            for i, n in enumerate(names)]


def _story(entity: Entity, other: Entity, attribute: str, template: str) -> tuple[str, str]:
    """A story about `entity` with `other` as distractor, split into (context, last word with its space)."""
    fields = entity.facts() | {f"other_{k}": v for k, v in other.facts().items()} | {"other": other.name}
    text = template.format(**fields)
    context, last = text.rsplit(" ", 1)
    return context, " " + last


def make_document(entity: Entity, entities: list[Entity], rng: random.Random,
                  forbidden_stories: set[tuple[str, str, str]]) -> str:
    """One line of the corpus: several facts about one creature in random order and words, sometimes
    a fact about its friend and a short story."""
    facts = entity.facts()
    attributes = rng.sample(list(FACT_TEMPLATES), rng.randint(3, len(FACT_TEMPLATES)))
    sentences = [rng.choice(FACT_TEMPLATES[a]).format(**facts) for a in attributes]
    if rng.random() < 0.3:
        friend = next(e for e in entities if e.name == entity.friend)
        attribute = rng.choice(list(FACT_TEMPLATES))
        sentences.append(rng.choice(FACT_TEMPLATES[attribute]).format(**friend.facts()))
    if rng.random() < 0.5:
        attribute = rng.choice(list(STORY_TEMPLATES))
        other = rng.choice([e for e in entities if e is not entity])
        if (entity.name, other.name, attribute) not in forbidden_stories:
            context, last = _story(entity, other, attribute, rng.choice(STORY_TEMPLATES[attribute]))
            sentences.append(context + last + ".")
    return " ".join(sentences)


def make_corpus(entities: list[Entity], n_train: int, n_heldout: int, rng: random.Random,
                forbidden_stories: set[tuple[str, str, str]]) -> tuple[list[str], list[str]]:
    """Training documents and held-out documents (none identical to a training one), one per line."""
    train = [make_document(entities[i % len(entities)], entities, rng, forbidden_stories) for i in range(n_train)]
    seen = set(train)
    heldout: list[str] = []
    while len(heldout) < n_heldout:
        doc = make_document(rng.choice(entities), entities, rng, forbidden_stories)
        if doc not in seen:
            seen.add(doc)
            heldout.append(doc)
    return train, heldout


def _balanced_gold(n: int, k: int, rng: random.Random) -> list[int]:
    gold = [i % k for i in range(n)]
    rng.shuffle(gold)
    return gold


def make_facts_mc(entities: list[Entity], n: int, rng: random.Random) -> list[dict]:
    """Multiple-choice cloze over facts: one context, four continuations, the gold one balanced over A-D."""
    questions = [(e, attr, template) for e in entities for attr, templates in CLOZE_TEMPLATES.items()
                 for template in templates]
    rng.shuffle(questions)
    questions = questions[:n]
    gold_positions = _balanced_gold(len(questions), 4, rng)
    docs = []
    for i, ((entity, attribute, template), gold) in enumerate(zip(questions, gold_positions)):
        answer = entity.facts()[attribute]
        pool = [e.name for e in entities if e.name not in (entity.name, answer)] if attribute == "friend" \
            else [v for v in ATTRIBUTES[attribute] if v != answer]
        choices = rng.sample(pool, 3)
        choices.insert(gold, answer)
        context = template.format(**entity.facts())
        docs.append({"id": f"facts_mc-{i:05d}", "kind": "multiple_choice",
                     "requests": [[context, " " + c] for c in choices], "gold": gold})
    return docs


def story_keys(entities: list[Entity], n: int, rng: random.Random) -> list[tuple[str, str, str]]:
    """(entity, distractor, attribute) triples for the last-word benchmark, chosen before the corpus so the
    corpus can leave those exact stories out."""
    keys = [(e.name, o.name, attribute) for e in entities for o in entities for attribute in STORY_TEMPLATES
            if o is not e and not (attribute == "friend" and o.name == e.friend)]
    rng.shuffle(keys)
    return keys[:n]


def make_last_word(entities: list[Entity], keys: list[tuple[str, str, str]], rng: random.Random) -> list[dict]:
    """LAMBADA-style passages: the target word was stated earlier in the passage, next to a distractor."""
    by_name = {e.name: e for e in entities}
    docs = []
    for i, (name, other, attribute) in enumerate(keys):
        template = rng.choice(STORY_TEMPLATES[attribute])
        context, target = _story(by_name[name], by_name[other], attribute, template)
        docs.append({"id": f"last_word-{i:05d}", "kind": "last_word", "context": context, "target": target})
    return docs


def make_text_qa(entities: list[Entity], n: int, rng: random.Random) -> list[tuple[str, str]]:
    """`n` (question, answer) pairs about the creatures' facts, drawn uniformly over creature, attribute and
    wording."""
    pool = [(template.format(**e.facts()), e.facts()[attribute]) for e in entities
            for attribute, templates in QUESTION_TEMPLATES.items() for template in templates]
    return [rng.choice(pool) for _ in range(n)]


def make_text_conversations(entities: list[Entity], n: int, rng: random.Random) -> list[tuple[str, str]]:
    """`n` (question, answer) pairs about the creatures' facts, each answered with a sentence of the corpus that
    states the fact (a FACT_TEMPLATES wording), drawn uniformly over creature, attribute and wordings."""
    pairs = []
    for _ in range(n):
        facts = rng.choice(entities).facts()
        attribute = rng.choice(list(QUESTION_TEMPLATES))
        pairs.append((rng.choice(QUESTION_TEMPLATES[attribute]).format(**facts),
                      rng.choice(FACT_TEMPLATES[attribute]).format(**facts)))
    return pairs


def make_text_questions(entities: list[Entity], n: int, rng: random.Random) -> list[str]:
    """`n` questions about the creatures' facts, without their answers."""
    return [question for question, _ in make_text_qa(entities, n, rng)]
