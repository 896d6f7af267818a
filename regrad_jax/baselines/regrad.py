"""ReGrad and ReGrad + ICL seen through the baselines' Method protocol.

A thin view of the `adapt.ReGrad` engine, so the evaluation drives every method
the same way. Two views ("regrad": passages not in the prompt; "regrad_icl":
passages also in the prompt) may share one engine, bank and index: `inject`
sends the engine only documents its bank does not hold yet, so a shared engine
computes each gradient once.

ReGrad + ICL places the retrieved passages in the prompt exactly as RAG does:
each cut to config.data.max_context_len tokens (the engine's icl_max_tokens);
whole cpkc passages would make three-passage prompts of 1,000-4,000 tokens.

Generic queries are answered by the base weights: theta_q = theta* - gamma
alpha (.) sum_k g_k lives only inside the call that answers a query, and
injection writes to the bank and the index, never to the weights.
"""
from typing import Sequence


class ReGradMethod:
  """Method protocol around an `adapt.ReGrad` engine.

  Args:
    engine: the engine (`answer(questions, k, mode)`, `inject(documents)`,
      `.model`, `.bank`).
    mode: "blind" or "icl".
    k: documents retrieved per question.
  """

  def __init__(self, engine, *, mode: str = "blind", k: int = 3):
    if mode not in ("blind", "icl"):
      raise ValueError(f"ReGrad mode must be 'blind' or 'icl', got {mode!r}")
    self.engine, self.mode, self.k = engine, mode, int(k)
    self.name = "regrad" if mode == "blind" else "regrad_icl"
    self.last_doc_ids: list[list[str]] = []

  def inject(self, documents: Sequence) -> None:
    known = self.engine.kb.documents
    new = [d for d in documents if d.id not in known]
    if new:
      self.engine.inject(new)

  def answer(self, questions: Sequence[str]) -> list[str]:
    results = self.engine.answer(list(questions), k=self.k, mode=self.mode)
    self.last_doc_ids = [list(r.doc_ids) for r in results]
    return [r.answer.strip() for r in results]

  def generic_params(self) -> dict:
    return self.engine.model.params
