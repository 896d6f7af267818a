"""Drift: how far a method's *generic* model has moved from the base model.

After a method has injected documents, the weights that answer a query unrelated
to those documents (a "generic query") get four figures:

  ppl_general  token-level perplexity on general text (Moby-Dick and State of the
               Union chunks; `data.load_general_text`).
  ppl_wiki     the same on held-out Wikipedia summaries: the *last* summaries of
               the distractor file, never in a bank (the bank takes distractors
               from the front; `load_drift_data` checks they cannot overlap).
  probe_acc    closed-book accuracy (percent) on cloze facts
               (`data.load_probe`): what the model forgets.
  weight_l2    || W - W_base ||_2 over every base parameter (all leaves, one
               flat vector), in the units of the weights.

Which weights answer a generic query, per method (see baselines/):
  Direct, RAG      the base weights (nothing is ever written): 0 by construction.
  ReGrad, +ICL     the base weights: theta_q = theta* - gamma alpha (.) sum g
                   exists only while a query is answered and is discarded; the
                   bank and the index grow, the weights never do. The figures
                   are still measured, not assumed.
  PRAG             the base weights: per-document LoRAs are applied only to
                   queries that retrieve those documents, never persist.
  CPT              the fine-tuned weights (LoRA CPT: LoRA merged into the base
                   with `lora.merge_into_base`, which is what answers every query).

Definitions (exact, so figures are comparable across methods):
  Perplexity: exp(total NLL / number of predicted tokens). A text is tokenised
    once (BOS as the tokenizer adds it) and cut into windows of at most `window`
    tokens that overlap by one token, so every token after the first is predicted
    exactly once, from the preceding tokens of its window (<= window - 1 of them).
  Probe: the raw cloze prompt ("The capital of France is") is continued greedily
    for `probe_tokens` tokens, without a chat template. The continuation is cut
    at its first newline and SQuAD-normalised (metrics.normalize); a fact counts
    as known when a normalised gold answer of w words occurs as consecutive words
    within the first w + 2 words (the answer, give or take a leading article
    or adjective, must come first).

Every computation is batched and jitted over a few fixed shapes: windows padded
to power-of-two buckets <= window, probe prompts left-padded to a few buckets,
and a fixed number of rows per call.
"""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from regrad_jax import batching
from regrad_jax import data as data_lib
from regrad_jax import metrics
from regrad_jax.data import records as records_lib
from regrad_jax.data import tiny as tiny_data
from regrad_jax.model import losses
from regrad_jax.model import generation
from regrad_jax.model import transformer
from regrad_jax.model.decode import generate
from regrad_jax.model.config import ModelConfig

FIELDS = ("ppl_general", "ppl_wiki", "probe_acc", "weight_l2")
PROBE_BUCKETS = (32, 64, 128)  # Cloze prompts are short.
PROBE_SLACK_WORDS = 2


# --- Weight distance ------------------------------------------------------------


@jax.jit
def _sq_dist(a, b):
  return sum(jnp.sum(jnp.square(x.astype(jnp.float32) - y.astype(jnp.float32)))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def weight_l2(params: dict, base: dict) -> float:
  """|| params - base ||_2 over all leaves (float). Exactly 0.0 for equal trees.

  Raises:
    ValueError: the trees differ in structure or in a leaf's shape.
  """
  if jax.tree.structure(params) != jax.tree.structure(base):
    raise ValueError("weight_l2: the two parameter trees differ in structure")
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(params),
                          jax.tree.leaves(base)):
    if x.shape != y.shape:
      raise ValueError(f"weight_l2: leaf {jax.tree_util.keystr(path)} has shape "
                       f"{x.shape} vs {y.shape} in the base")
  return float(np.sqrt(float(_sq_dist(params, base))))


# --- Perplexity ----------------------------------------------------------------


def windows(ids: list[int], window: int) -> list[list[int]]:
  """Cuts token ids into windows of <= `window` tokens overlapping by one token.

  Window i covers ids[i*(window-1) : i*(window-1) + window]; every id after the
  first is predicted exactly once. A text of < 2 tokens gives no window.
  """
  if window < 2:
    raise ValueError(f"perplexity window must be >= 2 tokens, got {window}")
  step = window - 1
  return [ids[s:s + window] for s in range(0, max(len(ids) - 1, 0), step)]


@functools.partial(jax.jit, static_argnames=("config",))
def _nll_sums(params, tokens, mask, *, config):
  """(B, S) -> per-row (sum of next-token NLL, number of predicted tokens)."""
  logits = transformer.apply(params, tokens, config=config, mask=mask)
  nll = losses.token_nll(logits[:, :-1], tokens[:, 1:])
  w = (mask[:, :-1] & mask[:, 1:]).astype(jnp.float32)
  return jnp.sum(nll * w, -1), jnp.sum(w, -1)


def perplexity(params: dict, texts: list[str], tokenizer, *, config: ModelConfig,
               window: int = 512, batch_size: int = 8, desc: str = "perplexity"
               ) -> float:
  """Token-level perplexity of `texts` (see the module docstring for the windows).

  Args:
    params: the weights to measure (a full base-layout tree).
    texts: documents; each tokenised with the tokenizer's default BOS.
    window: longest window, tokens.
    batch_size: windows per jitted call (the last call is padded with empty rows).
  Returns:
    exp(sum NLL / predicted tokens), a float.
  """
  if not texts:
    raise ValueError("perplexity: no texts")
  wins = [w for t in texts
          for w in windows(tokenizer.encode(t, add_bos=tokenizer.add_bos_default),
                           window)]
  if not wins:
    raise ValueError("perplexity: every text has fewer than 2 tokens")
  wins.sort(key=len)  # Similar lengths share a bucket.
  buckets = tuple(b for b in (64, 128, 256, 512, 1024, 2048) if b < window) + (window,)
  total, count = 0.0, 0.0
  for i in tqdm(range(0, len(wins), batch_size), desc=desc, leave=False):
    chunk = wins[i:i + batch_size]
    length = batching.bucket(max(map(len, chunk)), buckets)
    tokens, mask = batching.pad(chunk + [[]] * (batch_size - len(chunk)), length,
                                tokenizer.pad_id)
    s, n = _nll_sums(params, tokens, mask, config=config)
    total += float(np.sum(np.asarray(s, np.float64)))
    count += float(np.sum(np.asarray(n, np.float64)))
  return float(np.exp(total / count))


# --- Closed-book probe ---------------------------------------------------------


def probe_hit(continuation: str, answers) -> bool:
  """True when a gold answer opens the continuation (module docstring rule)."""
  words = metrics.normalize(continuation.split("\n")[0]).split()
  for a in answers:
    gold = metrics.normalize(a).split()
    if not gold:
      continue
    head = words[:len(gold) + PROBE_SLACK_WORDS]
    if any(head[j:j + len(gold)] == gold for j in range(len(head) - len(gold) + 1)):
      return True
  return False


def continue_prompts(params: dict, prompts: list[str], tokenizer, *,
                     config: ModelConfig, max_new_tokens: int, batch_size: int = 16,
                     buckets=PROBE_BUCKETS, desc: str = "continue") -> list[str]:
  """Greedy continuations of raw text prompts (no chat template).

  Prompts are tokenised with the default BOS and decoded `batch_size` rows at a
  time by model.generation.generate_batched (left-padded to `buckets`; longer
  prompts keep their last tokens).
  """
  run = lambda tokens, mask, rows: generate(params, tokens, mask, config=config,
                                            max_new_tokens=max_new_tokens)
  ids = [tokenizer.encode(p, add_bos=tokenizer.add_bos_default) for p in prompts]
  new = generation.generate_batched(ids, run, pad_id=tokenizer.pad_id, batch_size=batch_size,
                                    buckets=buckets, desc=desc)
  return [tokenizer.decode(row) for row in new]


def probe_accuracy(params: dict, probe, tokenizer, *, config: ModelConfig,
                   max_new_tokens: int = 8, batch_size: int = 16,
                   buckets=PROBE_BUCKETS) -> float:
  """Closed-book probe accuracy in percent (probe: QARecords, question = prompt)."""
  if not probe:
    raise ValueError("probe_accuracy: no probe records")
  conts = continue_prompts(params, [r.question for r in probe], tokenizer,
                           config=config, max_new_tokens=max_new_tokens,
                           batch_size=batch_size, buckets=buckets, desc="probe")
  return 100.0 * sum(probe_hit(c, r.answers) for c, r in zip(conts, probe)) / len(probe)


# --- All figures ---------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DriftData:
  """The texts drift is measured on (fixed for a whole evaluation)."""
  general: tuple[str, ...]
  wiki: tuple[str, ...]
  probe: tuple  # QARecords.


def load_drift_data(config, corpus_ids=()) -> DriftData:
  """General text, held-out summaries and probe facts, sized by config.eval.

  config.eval.num_ppl_docs texts of each kind and config.eval.num_probe facts.
  Held-out summaries are the last num_ppl_docs of config.data.distractors (for
  the tiny dataset, the last tiny distractors); `corpus_ids` (the bank's
  documents) must not contain any of them.
  """
  n = int(config.eval.num_ppl_docs)
  general = data_lib.load_general_text(config, n)
  if config.data.name == "tiny":
    pool = tiny_data.tiny_distractors(-1)
  else:
    if not config.data.distractors:
      raise ValueError("ppl_wiki needs config.data.distractors (Wikipedia summaries)")
    pool = records_lib.read_wiki_summaries(
        data_lib.resolve_root(config) / config.data.distractors)
  if n > len(pool):
    raise ValueError(f"config.eval.num_ppl_docs={n} exceeds the {len(pool)} "
                     "available summaries")
  wiki = pool[len(pool) - n:]
  clash = {d.id for d in wiki} & set(corpus_ids)
  if clash:
    raise ValueError(f"{len(clash)} held-out summaries for ppl_wiki are also bank "
                     f"documents (e.g. {sorted(clash)[:2]}): lower "
                     "config.data.num_distractors or config.eval.num_ppl_docs")
  probe = data_lib.load_probe(config, int(config.eval.num_probe))
  return DriftData(tuple(d.text for d in general), tuple(d.text for d in wiki),
                   tuple(probe))


class DriftMeter:
  """Measures FIELDS for any weight set against one base model.

  Figures of weights bitwise equal to the base (weight_l2 == 0.0 exactly) are
  computed once and reused: identical weights give identical figures.

  Args:
    base_params, tokenizer, model_cfg: the base model.
    data: what to measure on (`load_drift_data`).
    window: perplexity window; batch_size: perplexity windows per call.
    probe_tokens: greedy tokens per probe prompt.
    probe_batch_size, probe_buckets: probe decoding shapes (the evaluation passes
      the QA answering shapes, so the probe reuses their compiled decoder).
  """

  def __init__(self, base_params: dict, tokenizer, model_cfg: ModelConfig,
               data: DriftData, *, window: int = 512, batch_size: int = 8,
               probe_tokens: int = 8, probe_batch_size: int = 16,
               probe_buckets=PROBE_BUCKETS):
    self.base = base_params
    self.tokenizer, self.model_cfg, self.data = tokenizer, model_cfg, data
    self.window, self.batch_size, self.probe_tokens = window, batch_size, probe_tokens
    self.probe_batch_size, self.probe_buckets = probe_batch_size, tuple(probe_buckets)
    self._base_figures = None

  @classmethod
  def from_config(cls, config, model, corpus_ids=()) -> "DriftMeter":
    """The meter of `model` (loaders.Model: its params are the base weights).

    Sizes from config.eval; probe shapes as the answering methods' (adapt.
    batch_size rows, generation.PROMPT_BUCKETS); see `load_drift_data`."""
    return cls(model.params, model.tokenizer, model.config,
               load_drift_data(config, corpus_ids=corpus_ids),
               window=int(config.eval.ppl_window),
               batch_size=int(config.eval.batch_size),
               probe_tokens=int(config.eval.probe_tokens),
               probe_batch_size=int(config.adapt.batch_size),
               probe_buckets=generation.PROMPT_BUCKETS)

  def measure(self, params: dict | None = None) -> dict:
    """{"ppl_general", "ppl_wiki", "probe_acc", "weight_l2"} of `params`
    (None = the base weights)."""
    params = self.base if params is None else params
    l2 = weight_l2(params, self.base)
    if l2 == 0.0 and self._base_figures is not None:
      return dict(self._base_figures)
    kw = dict(config=self.model_cfg)
    figures = {
        "ppl_general": perplexity(params, list(self.data.general), self.tokenizer,
                                  window=self.window, batch_size=self.batch_size,
                                  desc="ppl general", **kw),
        "ppl_wiki": perplexity(params, list(self.data.wiki), self.tokenizer,
                               window=self.window, batch_size=self.batch_size,
                               desc="ppl wiki", **kw),
        "probe_acc": probe_accuracy(params, list(self.data.probe), self.tokenizer,
                                    max_new_tokens=self.probe_tokens,
                                    batch_size=self.probe_batch_size,
                                    buckets=self.probe_buckets, **kw),
        "weight_l2": l2,
    }
    if l2 == 0.0:
      self._base_figures = dict(figures)
    return figures
