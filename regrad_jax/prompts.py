"""The one place that turns passages and questions into model text.

Every stage (meta-learning, the bank, RAG, ReGrad+ICL, evaluation) formats through
here, so a document's gradient in the bank is computed on exactly the text the
meta-learner saw. A tokenizer with a chat template (SmolLM2-Instruct: ChatML) gets
its template; otherwise the plain "Question: ... Answer:" form is used.
"""
import jinja2
import jinja2.sandbox

INSTRUCTION = "Answer the question with a short phrase."


def passage_text(i: int, text: str) -> str:
  """A document as it is trained on and stored: "Passage i: <text>" (i from 1)."""
  return f"Passage {i}: {text}"


def qa_prompt(question: str, tokenizer, passages: list[str] | None = None) -> str:
  """The text the model answers after (without the answer).

  Args:
    question: the question.
    tokenizer: supplies `chat_template` (None -> the plain template).
    passages: for RAG / ICL modes, the passages placed before the question.
  """
  if not isinstance(question, str) or not question.strip():
    raise ValueError("empty question")
  context = ""
  if passages:
    context = "\n".join(passage_text(i + 1, p) for i, p in enumerate(passages)) + "\n"
  if getattr(tokenizer, "chat_template", None):
    user = f"{context}{INSTRUCTION}\nQuestion: {question}"
    return render_chat(tokenizer, [{"role": "user", "content": user}])
  return f"{context}Question: {question}\nAnswer:"


def truncate_text(tokenizer, text: str, max_tokens: int) -> str:
  """`text` cut to its first `max_tokens` tokens (unchanged if shorter).

  Passages placed in a prompt are cut to config.data.max_context_len tokens, the
  length the Gradient Bank sees of each document: a retrieved passage gives RAG
  no more text than it gives ReGrad, and three passages keep a prompt within a
  few hundred tokens (whole cpkc passages reach 1,000+ tokens a prompt, which
  makes prefill and the KV cache several times costlier on a CPU).
  """
  ids = tokenizer.encode(text)
  return text if len(ids) <= max_tokens else tokenizer.decode(ids[:max_tokens])


def answer_text(answer: str, tokenizer) -> str:
  """The target continuation the QA loss is taken on."""
  return answer if getattr(tokenizer, "chat_template", None) else " " + answer


def render_chat(tokenizer, messages: list[dict]) -> str:
  """Renders a Jinja chat template (as transformers does, in a sandbox)."""
  env = jinja2.sandbox.ImmutableSandboxedEnvironment(
      trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
  env.globals["raise_exception"] = _raise
  template = env.from_string(tokenizer.chat_template)
  return template.render(messages=messages, add_generation_prompt=True,
                         bos_token="", eos_token="")


def _raise(message):
  raise jinja2.exceptions.TemplateError(message)


def encode_document(tokenizer, text: str, max_len: int, index: int = 1
                    ) -> tuple[list[int], bool]:
  """Token ids of a document as trained on and banked, truncated to max_len.

  Returns (ids, truncated). Meta-learning passes the passage's position in its task
  as `index` ("Passage 2: ..."), as the reference does; the bank, which stores one
  gradient per document independent of any query, uses index 1.
  """
  if not isinstance(text, str):
    raise TypeError(f"document text must be a str, got {type(text).__name__}")
  ids = tokenizer.encode(passage_text(index, text),
                         add_bos=tokenizer.add_bos_default)
  return ids[:max_len], len(ids) > max_len


def encode_qa(tokenizer, question: str, answer: str | None = None,
              passages: list[str] | None = None) -> tuple[list[int], int]:
  """Prompt (+ answer + EOS) ids, and the number of prompt tokens.

  The answer is followed by EOS so that a meta-learned model learns to stop.
  """
  ids = tokenizer.encode(qa_prompt(question, tokenizer, passages),
                         add_bos=tokenizer.add_bos_default)
  n_prompt = len(ids)
  if answer is not None:
    ids = ids + tokenizer.encode(answer_text(answer, tokenizer)) + [tokenizer.eos_id]
  return ids, n_prompt
