"""The methods ReGrad is compared with, all on the same model, documents, questions.

Each is an object with `name`, `inject(documents)`, `answer(questions)` and
`generic_params()` (see common.Method):

  Direct        closed-book, base weights                       (direct.py)
  RAG           top-K retrieved passages in the prompt          (rag.py)
  CPT           next-token fine-tuning on the documents, as a
                stream; full weights or LoRA                    (cpt.py)
  PRAG          one LoRA per document, top-K merged per query   (prag.py)
  FineTunedRAG  RAG with a LoRA trained on the meta-state's
                training tasks, passages in the prompt (rag_ft)  (finetuned.py)
  FineTunedDirect  the same, closed-book (direct_ft)            (finetuned.py)
  ICPT          Instruction CPT: CPT on the documents mixed
                with training QA pairs                          (icpt.py)
  ReGradMethod  the ReGrad engine, blind or ICL                 (regrad.py)
"""
from regrad_jax.baselines.common import Method, generate_answers, qa_prompt_ids
from regrad_jax.baselines.cpt import CPT
from regrad_jax.baselines.direct import Direct
from regrad_jax.baselines.finetuned import FineTunedDirect, FineTunedRAG
from regrad_jax.baselines.icpt import ICPT
from regrad_jax.baselines.prag import PRAG
from regrad_jax.baselines.rag import RAG
from regrad_jax.baselines.regrad import ReGradMethod

__all__ = ["CPT", "Direct", "FineTunedDirect", "FineTunedRAG", "ICPT", "Method",
           "PRAG", "RAG", "ReGradMethod",
           "generate_answers", "qa_prompt_ids"]
