"""The one place that turns passages and questions into model text.

Every stage (meta-learning, the bank, RAG, ReGrad+ICL, evaluation) formats through
here, so a document's gradient in the bank is computed on exactly the text the
meta-learner saw. Two styles, carried by the tokenizer as `prompt_style` (set
from config.model.prompt_style by `loaders.load_model`):

  "auto"       a tokenizer with a chat template (SmolLM2-Instruct: ChatML) gets its
               template, otherwise "Question: ... Answer:"; targets end with EOS;
               passages are numbered from 1.
  "reference"  the ReGrad paper's fixed Llama-3 prompt strings, written out as text
               (METHOD.md); targets end with "\n" (no EOS); the answer is the first
               line of the output; passages are numbered from 0.
"""
import jinja2
import jinja2.sandbox

INSTRUCTION = "Answer the question with a short phrase."
STYLES = ("auto", "reference")
# The reference's prompt pieces (their src/ICL.py), Llama-3 header tokens as text.
_REF_SYSTEM = "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n"
_REF_ASK = "You are a helpful AI assistant who is ready to answer user's question"
_REF_CONCISE = ("Your answer should be concise, which means it must be a short phrase "
                "or a single word, and sentences are not allowed!")
_REF_USER = "<|eot_id|><|start_header_id|>user<|end_header_id|>\n"
_REF_ASSISTANT = "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\nAnswer: "


def style(tokenizer) -> str:
  """The tokenizer's prompt style ("auto" unless load_model set another)."""
  value = getattr(tokenizer, "prompt_style", "auto")
  if value not in STYLES:
    raise ValueError(f"prompt style {value!r} is not one of {STYLES}")
  return value


def first_index(tokenizer) -> int:
  """The number of the first passage of a task or prompt: 0 (reference) or 1."""
  return 0 if style(tokenizer) == "reference" else 1


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
  first = first_index(tokenizer)
  numbered = [passage_text(i + first, p) for i, p in enumerate(passages or ())]
  if style(tokenizer) == "reference":
    if not numbered:
      return f"{_REF_SYSTEM}{_REF_ASK}. \n{_REF_CONCISE}\n{_REF_USER}{question}{_REF_ASSISTANT}"
    context = "\n".join(["####CONTEXT begin####", *numbered, "####CONTEXT end####"])
    return (f"{_REF_SYSTEM}{context}\n{_REF_ASK} according to the CONTEXT. \n"
            f"{_REF_CONCISE}\n{_REF_USER}{question}{_REF_ASSISTANT}")
  context = "\n".join(numbered) + "\n" if numbered else ""
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
  if style(tokenizer) == "reference":
    return answer + "\n"
  return answer if getattr(tokenizer, "chat_template", None) else " " + answer


def extract_answer(tokenizer, text: str) -> str:
  """The answer in a decoded continuation: its first line (reference), or the
  whole text up to EOS (auto; the tokenizer's decode already stops there)."""
  if style(tokenizer) == "reference":
    text = text.split("\n", 1)[0]
  return text.strip()


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


def encode_document(tokenizer, text: str, max_len: int, index: int | None = 1
                    ) -> tuple[list[int], bool]:
  """Token ids of a document as trained on and banked, truncated to max_len.

  Returns (ids, truncated). Meta-learning passes the passage's position in its task
  as `index` ("Passage 2: ..."), as the reference does; the bank, which stores one
  gradient per document independent of any query, uses index 1, or None for the
  raw text (config.bank.raw_text, as the reference banks).
  """
  if not isinstance(text, str):
    raise TypeError(f"document text must be a str, got {type(text).__name__}")
  ids = tokenizer.encode(text if index is None else passage_text(index, text),
                         add_bos=tokenizer.add_bos_default)
  return ids[:max_len], len(ids) > max_len


def encode_qa(tokenizer, question: str, answer: str | None = None,
              passages: list[str] | None = None) -> tuple[list[int], int]:
  """Prompt (+ answer + EOS) ids, and the number of prompt tokens.

  The answer is followed by EOS so that a meta-learned model learns to stop (by
  "\n" alone in the reference style).
  """
  ids = tokenizer.encode(qa_prompt(question, tokenizer, passages),
                         add_bos=tokenizer.add_bos_default)
  n_prompt = len(ids)
  if answer is not None:
    ids = ids + tokenizer.encode(answer_text(answer, tokenizer))
    ids += [] if style(tokenizer) == "reference" else [tokenizer.eos_id]
  return ids, n_prompt
