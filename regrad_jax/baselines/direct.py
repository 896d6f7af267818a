"""Direct: the base model answers closed-book (no injected knowledge at all).

The floor of the comparison: what the model answers from its pretraining alone.
It ignores injected documents, and its generic weights are the base weights.
"""
from typing import Sequence

from regrad_jax.baselines import common


class Direct:
  """Closed-book answers with the base weights.

  Args:
    model: the base model (loaders.Model) (never modified).
    config: the full config; reads adapt.batch_size and adapt.max_new_tokens.
  """
  name = "direct"
  lora, lora_config = None, None  # The base weights (FineTunedDirect: a LoRA).

  def __init__(self, model, config):
    self.params, self.model_cfg, self.tokenizer = model
    self.batch_size = int(config.adapt.batch_size)
    self.max_new_tokens = int(config.adapt.max_new_tokens)

  def inject(self, documents: Sequence) -> None:
    del documents  # Closed-book: nothing to take in.

  def answer(self, questions: Sequence[str]) -> list[str]:
    ids = common.qa_prompt_ids(self.tokenizer, questions)
    return common.generate_answers(
        self.params, ids, self.tokenizer, config=self.model_cfg,
        batch_size=self.batch_size,
        max_new_tokens=self.max_new_tokens, lora=self.lora,
        lora_config=self.lora_config, desc=self.name)

  def generic_params(self) -> dict:
    return self.params
