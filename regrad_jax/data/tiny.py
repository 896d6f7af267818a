"""A synthetic knowledge corpus, generated in code, for tests and tiny configs.

Every document describes one invented country with two facts ("The capital of
Velmora is Quenzil. Velmora was founded by Drasko."), and every fact gives one
question ("What is the capital of Velmora?" -> "Quenzil"). Names are built
from random syllables, so no pretrained model can know the answers: they can
only come from the document. A document has at most MAX_DOC_CHARS characters,
so that with a byte tokenizer "Passage 1: <text>" fits the default 128-token
context.

Generation is sequential and seeded: `tiny_corpus(n)` is a prefix of
`tiny_corpus(m)` for n <= m, which is how the splits and the bank's
distractors get disjoint entities from one stream.

Also here: tiny general text (perplexity) and a tiny cloze probe, each of any
requested size.
"""
import random

from regrad_jax.data.records import Document, QARecord

FACTS_PER_DOC = 2
# Documents per split in `tiny_splits`: train gives 64 QA records.
SPLIT_DOCS = {"train": 32, "dev": 8, "test": 8}
# Documents after the splits available as bank distractors ("-1 = all").
NUM_DISTRACTORS = 64
# What "-1 = all" means for the tiny general text and probe (any n works).
NUM_ALL = 64
# Upper bound on a document's length: the two longest fact templates filled
# with 10-letter names (the longest `_name` makes).
MAX_DOC_CHARS = 98

# (relation, fact template, question template); {e} entity, {v} value.
RELATIONS = (
    ("capital", "The capital of {e} is {v}.", "What is the capital of {e}?"),
    ("founder", "{e} was founded by {v}.", "Who founded {e}?"),
    ("river", "The main river of {e} is the {v}.", "What is the main river of {e}?"),
    ("currency", "The currency of {e} is the {v}.", "What is the currency of {e}?"),
    ("language", "The people of {e} speak {v}.", "What language do the people of {e} speak?"),
    ("bird", "The national bird of {e} is the {v}.", "What is the national bird of {e}?"),
)

_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z",
           "br", "dr", "kl", "qu", "th", "sk")
_VOWELS = ("a", "e", "i", "o", "u", "ae", "io")
_CODAS = ("", "", "n", "r", "l", "s", "x", "m")


def _name(rng: random.Random, used: set[str]) -> str:
  """A fresh two-syllable invented name (capitalised), never returned twice."""
  while True:
    name = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS)
                   for _ in range(2)).capitalize()
    if name not in used:
      used.add(name)
      return name


def tiny_corpus(num_docs: int = 24, seed: int = 0) -> tuple[list[Document], list[QARecord]]:
  """`num_docs` invented documents and their FACTS_PER_DOC questions each.

  Returns:
    docs: Document(id="tiny-%03d", title=<entity>, text=<facts>).
    records: QARecord(id="<doc id>-<relation>", answers=(<value>,),
      passage_id=<doc id>, passage=<doc text>), in document order.
  """
  if num_docs < 0:
    raise ValueError(f"num_docs must be >= 0, got {num_docs}.")
  rng = random.Random(seed)
  used: set[str] = set()
  docs, records = [], []
  for i in range(num_docs):
    entity = _name(rng, used)
    relations = rng.sample(RELATIONS, FACTS_PER_DOC)
    values = [_name(rng, used) for _ in relations]
    doc = Document(id=f"tiny-{i:03d}", title=entity,
                   text=" ".join(fact.format(e=entity, v=v)
                                 for (_, fact, _), v in zip(relations, values)))
    docs.append(doc)
    records += [QARecord(id=f"{doc.id}-{rel}", question=question.format(e=entity),
                         answers=(v,), passage_id=doc.id, passage=doc.text)
                for (rel, _, question), v in zip(relations, values)]
  return docs, records


def tiny_splits(seed: int = 0) -> dict[str, tuple[list[Document], list[QARecord]]]:
  """{"train", "dev", "test"} -> (docs, records), on disjoint invented entities.

  Sizes from SPLIT_DOCS (train 32 documents / 64 questions, dev and test 8 / 16).
  """
  docs, records = tiny_corpus(sum(SPLIT_DOCS.values()), seed)
  out, start = {}, 0
  for split, n in SPLIT_DOCS.items():
    ids = {d.id for d in docs[start:start + n]}
    out[split] = (docs[start:start + n], [r for r in records if r.passage_id in ids])
    start += n
  return out


def tiny_distractors(n: int = -1, seed: int = 0) -> list[Document]:
  """Invented documents on entities outside every split (-1 = NUM_DISTRACTORS)."""
  n = NUM_DISTRACTORS if n == -1 else n
  if not 0 <= n <= NUM_DISTRACTORS:
    raise ValueError(f"tiny distractors: asked for {n}, have {NUM_DISTRACTORS} (-1 = all).")
  offset = sum(SPLIT_DOCS.values())
  return tiny_corpus(offset + n, seed)[0][offset:]


_SUBJECTS = ("The old farmer", "A young sailor", "The teacher", "My neighbour", "The baker",
             "A tired traveller", "The doctor", "Our captain")
_ACTIONS = ("walked to the market", "wrote a long letter", "watched the rain",
            "mended the fence", "cooked a simple meal", "read by the window",
            "waited for the train", "counted the coins")
_TIMES = ("in the morning", "after supper", "before the storm", "on a quiet Sunday",
          "late at night", "at the end of summer")
_ENDINGS = ("and then went home.", "and felt much better.", "while the dog slept.",
            "as the bells rang.", "and said nothing more.", "before anyone else woke.")


def tiny_general_text(n: int, seed: int = 0) -> list[Document]:
  """`n` short paragraphs of plain English (for perplexity), deterministic."""
  if n < 0:
    raise ValueError(f"n must be >= 0, got {n}.")
  rng = random.Random(seed)
  return [Document(id=f"tiny-text-{i:03d}", text=" ".join(
      f"{rng.choice(_SUBJECTS)} {rng.choice(_ACTIONS)} {rng.choice(_TIMES)} "
      f"{rng.choice(_ENDINGS)}" for _ in range(3)))
          for i in range(n)]


_PROBE_FACTS = (
    ("The capital of France is", "Paris"), ("The capital of Japan is", "Tokyo"),
    ("The capital of Italy is", "Rome"), ("The capital of Egypt is", "Cairo"),
    ("The largest ocean on Earth is the", "Pacific"), ("Water is made of hydrogen and", "oxygen"),
    ("The color of a clear sky is", "blue"), ("The day after Monday is", "Tuesday"),
    ("The month after March is", "April"), ("The opposite of hot is", "cold"),
    ("The author of Hamlet is", "Shakespeare"), ("The planet we live on is", "Earth"),
)


def tiny_probe(n: int) -> list[QARecord]:
  """`n` closed-book cloze prompts: common facts, then "The number after k is"."""
  if n < 0:
    raise ValueError(f"n must be >= 0, got {n}.")
  facts = list(_PROBE_FACTS[:n])
  facts += [(f"The number after {k} is", str(k + 1)) for k in range(n - len(facts))]
  return [QARecord(id=f"tiny-probe-{i:03d}", question=q, answers=(a,), passage_id=None)
          for i, (q, a) in enumerate(facts)]
