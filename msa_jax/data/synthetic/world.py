"""The synthetic world's vocabulary, built by code: entities, attributes, relations, filler words.

Everything here is a pure function of the source (no files, no randomness): entity names are
invented pronounceable words enumerated arithmetically from syllable tables, the other lists are
written out. The world tokenizer (`world_tokenizer.py`) is built from `all_words()`, so a word the
generators emit is always one token.

Entities are `(first, last)` pairs indexed `0 .. NUM_ENTITIES - 1` (`entity_name(i)`), so a record
can draw thousands of distinct entities with one `rng.permutation`.
"""

from __future__ import annotations

import functools
import re

# --- invented names -------------------------------------------------------------------------------

_ONSETS = ("B", "D", "F", "G", "K", "L", "M", "N", "P", "R", "S", "T", "V", "Z", "H", "J")
_VOWELS = ("a", "e", "i", "o", "u")
_MIDS = ("l", "r", "n", "m", "v", "d", "s", "th", "k", "b")
_FIRST_ENDS = ("n", "ra", "l", "ro", "s", "na", "el", "as")
_LAST_MIDS = ("rn", "lb", "nd", "rk", "st", "lv", "mb", "sk")
_LAST_ENDS = ("ek", "in", "ard", "ow", "ell", "ost", "ane", "ury")


def _mix(x: int, salt: int) -> int:
  """A fixed 32-bit integer hash (deterministic everywhere, unlike Python's `hash`)."""
  x = (x * 0x9E3779B1 + salt) & 0xFFFFFFFF
  x ^= x >> 16
  x = (x * 0x85EBCA6B) & 0xFFFFFFFF
  x ^= x >> 13
  x = (x * 0xC2B2AE35) & 0xFFFFFFFF
  return x ^ (x >> 16)


def _enumerate_words(n: int, tables: tuple[tuple[str, ...], ...], salt: int) -> tuple[str, ...]:
  """`n` distinct capitalised words: word k concatenates one entry of each table, picked by the
  mixed-radix digits of a fixed hash of k (repeats are skipped)."""
  total = 1
  for t in tables:
    total *= len(t)
  words, seen, k = [], set(), 0
  while len(words) < n:
    if k >= 64 * total:
      raise ValueError(f"only {len(words)} distinct words can be made from these tables")
    code, parts = _mix(k, salt) % total, []
    for t in tables:
      code, digit = divmod(code, len(t))
      parts.append(t[digit])
    word = "".join(parts)
    word = word[0].upper() + word[1:]
    if word not in seen:
      seen.add(word)
      words.append(word)
    k += 1
  return tuple(words)


FIRST_NAMES = _enumerate_words(60, (_ONSETS, _VOWELS, _MIDS, _VOWELS, _FIRST_ENDS), salt=1)
LAST_NAMES = _enumerate_words(60, (_ONSETS, _VOWELS, _LAST_MIDS, _LAST_ENDS), salt=2)
NUM_ENTITIES = len(FIRST_NAMES) * len(LAST_NAMES)


def entity_name(i: int) -> str:
  """The name of entity `i` in [0, NUM_ENTITIES): "First Last"."""
  if not 0 <= i < NUM_ENTITIES:
    raise IndexError(f"entity {i} is not in [0, {NUM_ENTITIES})")
  first, last = divmod(int(i), len(LAST_NAMES))
  return f"{FIRST_NAMES[first]} {LAST_NAMES[last]}"


# --- attributes -----------------------------------------------------------------------------------

ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "city": ("Lisbon", "Oslo", "Cairo", "Lima", "Quito", "Dublin", "Vienna", "Prague", "Madrid",
             "Berlin", "Paris", "Rome", "Athens", "Tokyo", "Seoul", "Delhi", "Nairobi", "Dakar",
             "Havana", "Bogota", "Sydney", "Perth", "Denver", "Boston", "Austin", "Toronto",
             "Montreal", "Geneva", "Milan", "Munich"),
    "job": ("baker", "farmer", "pilot", "nurse", "doctor", "teacher", "painter", "sailor", "tailor",
            "miner", "lawyer", "chef", "dentist", "poet", "judge", "plumber", "carpenter",
            "architect", "banker", "jeweler", "librarian", "potter", "weaver", "surgeon",
            "astronomer", "chemist", "engineer", "journalist", "gardener", "mechanic"),
    "color": ("red", "blue", "green", "yellow", "purple", "orange", "black", "white", "gray",
              "pink", "brown", "teal", "violet", "crimson", "amber", "indigo", "ivory", "maroon",
              "olive", "silver"),
    "pet": ("cat", "dog", "parrot", "rabbit", "hamster", "turtle", "goldfish", "ferret", "lizard",
            "canary", "pony", "goat", "snake", "tortoise", "hedgehog", "mouse", "frog", "duck",
            "owl", "iguana"),
    "sport": ("tennis", "soccer", "rugby", "cricket", "hockey", "golf", "rowing", "fencing",
              "boxing", "cycling", "skiing", "surfing", "archery", "judo", "karate", "swimming",
              "climbing", "sailing", "polo", "badminton"),
    "instrument": ("piano", "violin", "cello", "flute", "guitar", "drums", "harp", "trumpet",
                   "clarinet", "oboe", "banjo", "accordion", "saxophone", "trombone", "ukulele",
                   "mandolin", "bassoon", "tuba", "harmonica", "xylophone"),
    "food": ("pasta", "sushi", "curry", "soup", "salad", "pizza", "tacos", "dumplings", "noodles",
             "bread", "cheese", "rice", "stew", "pancakes", "waffles", "lasagna", "risotto",
             "paella", "falafel", "ramen"),
    "drink": ("tea", "coffee", "cocoa", "lemonade", "cider", "milk", "juice", "water", "soda",
              "kefir", "espresso", "smoothie"),
    "birth year": tuple(str(y) for y in range(1950, 1990)),
    "age": tuple(str(a) for a in range(18, 58)),
}
ATTRIBUTE_NAMES = tuple(ATTRIBUTES)

RELATIONS = ("mentor", "sibling", "neighbour", "colleague", "friend", "partner", "cousin",
             "manager")

# --- filler ---------------------------------------------------------------------------------------

FILLER_NOUNS = (
    "river", "mill", "harbor", "bridge", "garden", "forest", "valley", "market", "tower", "lantern",
    "meadow", "village", "orchard", "window", "cart", "wagon", "ship", "boat", "storm", "cloud",
    "road", "path", "hill", "lake", "stone", "wall", "gate", "field", "barn", "fence", "well",
    "clock", "bell", "candle", "letter", "table", "chair", "door", "roof", "chimney", "shadow",
    "wind", "rain", "snow", "moon", "sun", "star", "island", "shore", "cliff", "cave", "fountain",
    "square", "station", "train", "kettle", "basket", "ladder", "rope", "flag",
)
FILLER_ADJECTIVES = (
    "old", "quiet", "small", "large", "bright", "dark", "narrow", "wide", "cold", "warm", "gentle",
    "distant", "empty", "busy", "ancient", "silent", "heavy", "light", "tall", "low", "muddy",
    "sunny", "windy", "calm", "wooden", "rusty", "golden", "pale", "hidden", "broken", "steep",
    "shallow", "deep", "humble", "crowded", "lonely",
)
FILLER_VERBS = (
    "rested", "waited", "drifted", "glowed", "rolled", "paused", "stood", "leaned", "shivered",
    "creaked", "trembled", "faded", "lingered", "wandered", "shone", "sank", "rose", "turned",
    "settled", "swayed", "echoed", "vanished", "returned", "appeared", "slept", "gleamed",
    "rattled", "hummed", "stayed", "remained", "shifted", "crumbled",
)
FILLER_PREPOSITIONS = (
    "near", "beside", "under", "above", "behind", "across", "along", "past", "beyond", "around",
    "inside", "over", "toward", "below",
)
FILLER_ADVERBS = (
    "slowly", "quietly", "again", "briefly", "softly", "gently", "calmly", "rarely", "often",
    "early", "later", "suddenly", "still", "once",
)
FILLER_STARTERS = ("The", "One", "Every", "Each", "That", "This", "Another")
FILLER_INTERJECTIONS = ("Indeed", "Certainly", "Perhaps", "Naturally", "Sometimes", "Afterwards",
                        "Meanwhile", "Eventually")
FILLER_PRONOUNS = ("It", "She", "He", "They", "We", "Everyone")
FILLER_FUNCTION_WORDS = ("the", "while", "and")

# --- fixed phrases --------------------------------------------------------------------------------

# Words of the question templates and of the NIAH needle sentence.
TEMPLATE_WORDS = ("What", "Which", "is", "are", "the", "of", "all", "special", "magic", "number",
                  "numbers", "for", "mentioned", "in", "provided", "text", "and", "The")

# Words of msa_jax.data.prompt_format's fixed strings (kept in sync by a test).
PROMPT_WORDS = ("Please", "answer", "the", "question", "based", "on", "above", "historical",
                "document", "information", "return", "all", "documents", "related", "to", "The",
                "user", "s", "is")

WORD_RE = re.compile(r"[A-Za-z]+")


def _words_of(phrases) -> list[str]:
  return [w for p in phrases for w in WORD_RE.findall(p)]


@functools.lru_cache(maxsize=None)
def all_words() -> tuple[str, ...]:
  """Every word the synthetic generators and the prompt format produce, each once, in a fixed
  order (the tokenizer's vocabulary order)."""
  groups = [FIRST_NAMES, LAST_NAMES, _words_of(ATTRIBUTE_NAMES),
            _words_of(v for vals in ATTRIBUTES.values() for v in vals), RELATIONS, FILLER_NOUNS,
            FILLER_ADJECTIVES, FILLER_VERBS, FILLER_PREPOSITIONS, FILLER_ADVERBS, FILLER_STARTERS,
            FILLER_INTERJECTIONS, FILLER_PRONOUNS, FILLER_FUNCTION_WORDS, TEMPLATE_WORDS,
            PROMPT_WORDS]
  return tuple(dict.fromkeys(w for g in groups for w in g))


@functools.lru_cache(maxsize=None)
def bare_words() -> tuple[str, ...]:
  """Words that may start a text or follow a non-space character (a newline, `<|im_start|>`, `'`),
  so the tokenizer also needs them without a leading space: capitalised words but surnames (a
  document starts with a first name), attribute values (an answer on its own starts with one), and
  `user`/`s` of the prompt format."""
  values = set(_words_of(v for vals in ATTRIBUTES.values() for v in vals))
  last = set(LAST_NAMES)
  return tuple(w for w in all_words()
               if (w[0].isupper() and w not in last) or w in values or w in ("user", "s"))


def _check() -> None:
  names = set(FIRST_NAMES) | set(LAST_NAMES)
  others = set(all_words()) - names
  clash = {w for w in names if w in others or w.lower() in {o.lower() for o in others}}
  if clash:
    raise AssertionError(f"invented names clash with other world words: {sorted(clash)}")
  if set(FIRST_NAMES) & set(LAST_NAMES):
    raise AssertionError("first and last names overlap")


_check()
