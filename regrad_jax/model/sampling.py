"""Text in, text out: batched prompting around `generate` (launches, notebooks)."""
import jax.numpy as jnp
import numpy as np

from regrad_jax import batching
from regrad_jax import prompts as prompts_lib
from regrad_jax.model.decode import generate

# Padded prompt lengths in steps of x1.5 (x2 below 96), a few jit shapes for any
# prompt up to 4096 tokens, plus 160 and 640 where ReGrad's prompts fall: a cpkc
# question in SmolLM2's chat template is ~140 tokens (192 padded it by 36%), and
# ICL prompts with K=3 128-token passages ~530 (768: 45%). Each shape compiles
# once per machine (compile_cache.py).
PROMPT_BUCKETS = (32, 64, 96, 128, 160, 192, 256, 384, 512, 640, 768, 1024, 1536, 2048,
                  3072, 4096)


def encode_prompts(tokenizer, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
  """Tokenises and left-pads texts to one bucket length.

  Returns:
    tokens (B, P) int32 and mask (B, P) bool, P from PROMPT_BUCKETS; prompts
    longer than the largest bucket keep their last tokens.
  """
  if not texts:
    raise ValueError("no prompts given")
  ids = [tokenizer.encode(t, add_bos=tokenizer.add_bos_default) for t in texts]
  if not all(ids):
    raise ValueError("a prompt encodes to zero tokens; give some text")
  length = batching.bucket(max(map(len, ids)), PROMPT_BUCKETS)
  return batching.pad(ids, length, tokenizer.pad_id, left=True)


def answer(params: dict, config, tokenizer, prompts: list[str],
           max_new_tokens: int = 20, chat: bool = False, *, lora=None,
           lora_config=None) -> list[str]:
  """Greedy continuations of a batch of prompts.

  Args:
    params, config: the base model (config: a ModelConfig).
    tokenizer: encodes prompts and decodes answers (text stops at EOS).
    prompts: raw texts, or questions when `chat` is set (formatted with
      prompts.qa_prompt: the chat template when the tokenizer has one).
    max_new_tokens: decoding budget per prompt.
    lora, lora_config: optional adapter (shared, or batched per prompt).
  Returns:
    One decoded continuation per prompt.
  """
  texts = [prompts_lib.qa_prompt(p, tokenizer) for p in prompts] if chat else list(prompts)
  tokens, mask = encode_prompts(tokenizer, texts)
  out = generate(params, jnp.asarray(tokens), jnp.asarray(mask), config=config,
                 lora=lora, lora_config=lora_config, max_new_tokens=max_new_tokens)
  return [tokenizer.decode(row) for row in np.asarray(out)]
