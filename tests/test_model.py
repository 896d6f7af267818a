"""Tests for the decoder: parity with transformers' PyTorch models, the KV cache,
LoRA trees, bf16 and a sharded forward on 4 fake CPU devices.

The parity checkpoints are tiny random models that transformers writes here
(save_pretrained), read back by our load_hf: the whole path from a user's HF
folder to our logits is checked against the reference implementation.
"""
import copy
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from regrad_jax import parallel
from regrad_jax.model import generation, loaders
from regrad_jax.model import lora as lora_lib
from regrad_jax.model import transformer
from regrad_jax.model.config import tiny_config
from regrad_jax.model.decode import generate
from regrad_jax.model.tokenizer import ByteTokenizer
from tests.test_loaders import VOCAB, write_tokenizer

apply = jax.jit(transformer.apply,
                static_argnames=("config", "lora_config", "remat", "return_hidden"))

_LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
# name -> (transformers class names, config overrides, max_shard_size, save dtype)
PARITY_CASES = {
    "llama_tied": ("Llama", dict(tie_word_embeddings=True), None, "float32"),
    # Untied head, Llama-3 RoPE scaling (wavelengths on all three branches),
    # sharded with an index, stored in bf16.
    "llama_untied_llama3_sharded_bf16": (
        "Llama", dict(tie_word_embeddings=False, rope_scaling=_LLAMA3_ROPE),
        "40KB", "bfloat16"),
    "qwen2_bias": ("Qwen2", dict(tie_word_embeddings=False), None, "float32"),
    "mistral": ("Mistral", dict(tie_word_embeddings=False, sliding_window=None), None,
                "float32"),
}


@pytest.mark.parametrize("case", sorted(PARITY_CASES))
def test_logits_match_transformers(tmp_path, case):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  family, overrides, shard, save_dtype = PARITY_CASES[case]
  hf_cfg = getattr(transformers, f"{family}Config")(
      vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
      num_attention_heads=4, num_key_value_heads=2, head_dim=8, rms_norm_eps=1e-5,
      max_position_embeddings=128, bos_token_id=1, eos_token_id=2, **overrides)
  torch.manual_seed(0)
  model = getattr(transformers, f"{family}ForCausalLM")(hf_cfg).eval()
  save_dtype = getattr(torch, save_dtype)
  with torch.no_grad():  # Default init (std 0.02) gives near-zero logits: widen it.
    for name, p in model.named_parameters():
      w = 1 + 0.2 * torch.randn_like(p) if "norm" in name else 0.3 * torch.randn_like(p)
      p.copy_(w.to(save_dtype))  # Representable in the saved dtype.
  kw = {"max_shard_size": shard} if shard else {}
  # Save a bf16 copy; the fp32 reference keeps its fp32 RoPE buffers.
  copy.deepcopy(model).to(save_dtype).save_pretrained(tmp_path, **kw)
  write_tokenizer(tmp_path)
  if shard:
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert len(list(tmp_path.glob("*.safetensors"))) > 1

  params, config, _ = loaders.load_hf(tmp_path)
  assert config.tie_embeddings == overrides["tie_word_embeddings"]
  assert config.qkv_bias == (family == "Qwen2")
  assert (config.rope_scaling is not None) == ("rope_scaling" in overrides)
  tokens = np.random.default_rng(0).integers(0, VOCAB, (2, 12)).astype(np.int32)
  with torch.no_grad():
    want = model(torch.from_numpy(tokens).long()).logits.numpy()
  got = np.asarray(apply(params, jnp.asarray(tokens), config=config))
  assert np.abs(want).max() > 1.0  # A meaningful comparison, not two near-zeros.
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)


# ------------------------------------------------------------ a tiny random model

CFG = tiny_config()
LCFG = lora_lib.LoraConfig(rank=4, alpha=8.0, start=2, stop=4,
                           targets=("q", "v", "o", "gate", "up", "down"))


@functools.cache
def tiny_params():
  """Random params in init_params' layout, std 0.2 (not 0.02): decisive greedy
  choices. Drawn with NumPy: nothing to compile."""
  rng = np.random.default_rng(0)
  return jax.tree_util.tree_map_with_path(
      lambda path, s: jnp.asarray(
          1 + 0.1 * rng.normal(size=s.shape) if "norm" in jax.tree_util.keystr(path)
          else 0.2 * rng.normal(size=s.shape), jnp.float32),
      transformer.param_shapes(CFG))


def tiny_tokens(batch=2, length=12, seed=1):
  return jnp.asarray(np.random.default_rng(seed).integers(0, 256, (batch, length)),
                     jnp.int32)


def random_lora(seed, lcfg=LCFG):
  """A LoRA tree with non-zero B (a fresh tree has B = 0), drawn with NumPy."""
  rng = np.random.default_rng(seed)
  shapes = lora_lib.projection_shapes(CFG)
  n, r = lcfg.num_layers, lcfg.rank
  return {name: {"a": jnp.asarray(rng.normal(0, 0.3, (n, shapes[name][0], r)), jnp.float32),
                 "b": jnp.asarray(rng.normal(0, 0.5, (n, r, shapes[name][1])), jnp.float32)}
          for name in lcfg.targets}


def _greedy_by_recomputation(params, prompts, n_new):
  """Reference decoding: the full forward over the whole sequence at every step."""
  B, T = len(prompts), max(map(len, prompts)) + n_new
  buf, mask = np.zeros((B, T), np.int32), np.zeros((B, T), bool)
  for b, p in enumerate(prompts):
    buf[b, :len(p)], mask[b, :len(p)] = p, True
  lengths = np.array([len(p) for p in prompts])
  out = np.full((B, n_new), CFG.pad_id, np.int32)
  done = np.zeros(B, bool)
  for t in range(n_new):
    logits = np.asarray(apply(params, jnp.asarray(buf), config=CFG,
                              mask=jnp.asarray(mask)))
    nxt = logits[np.arange(B), lengths + t - 1].argmax(-1)
    nxt = np.where(done, CFG.pad_id, nxt)
    out[:, t] = nxt
    done |= nxt == CFG.eos_id
    buf[np.arange(B), lengths + t], mask[np.arange(B), lengths + t] = nxt, True
  return out


def test_kv_cache_generation_equals_recomputation():
  params = tiny_params()
  rng = np.random.default_rng(2)
  prompts = [list(rng.integers(0, 256, n)) for n in (6, 3)]
  n_new, P = 6, 8
  want = _greedy_by_recomputation(params, prompts, n_new)
  # With a per-row LoRA on the upper layers only (the cache then crosses two layer
  # scans), each row decodes as the recomputation over its own merged weights.
  trees = [random_lora(7), random_lora(8)]
  want_lora = np.concatenate([
      _greedy_by_recomputation(lora_lib.merge_into_base(params, t, LCFG), [p], n_new)
      for t, p in zip(trees, prompts)])
  assert (want_lora != want).any()
  stacked = jax.tree.map(lambda *xs: jnp.stack(xs, axis=1), *trees)
  for left, lora in ((True, None), (False, None), (True, stacked)):
    tokens = np.zeros((2, P), np.int32)
    mask = np.zeros((2, P), bool)
    for b, p in enumerate(prompts):
      sl = slice(P - len(p), P) if left else slice(0, len(p))
      tokens[b, sl], mask[b, sl] = p, True
    got = generate(params, jnp.asarray(tokens), jnp.asarray(mask), config=CFG,
                   lora=lora, lora_config=None if lora is None else LCFG,
                   max_new_tokens=n_new)
    np.testing.assert_array_equal(np.asarray(got), want if lora is None else want_lora,
                                  err_msg=f"{'left' if left else 'right'} padding, "
                                          f"lora={lora is not None}")


def test_fresh_lora_leaves_logits_unchanged():
  params, tokens = tiny_params(), tiny_tokens()
  fresh = jax.jit(functools.partial(lora_lib.init_lora, config=CFG, lcfg=LCFG))(
      jax.random.key(3))
  base = apply(params, tokens, config=CFG)
  np.testing.assert_allclose(
      apply(params, tokens, config=CFG, lora=fresh, lora_config=LCFG), base,
      rtol=0, atol=1e-6)


def test_lora_touches_only_its_layers_and_equals_merged_weights():
  params, tokens = tiny_params(), tiny_tokens()
  base = np.asarray(apply(params, tokens, config=CFG))
  tree = random_lora(4)
  outs = []
  for start, stop in ((2, 4), (0, 2)):
    lcfg = lora_lib.LoraConfig(rank=LCFG.rank, alpha=LCFG.alpha, start=start,
                               stop=stop, targets=LCFG.targets)
    merged = lora_lib.merge_into_base(params, tree, lcfg)
    # The merged weights differ from the base exactly on the adapted layers and
    # projections; so, by the equality below, does the LoRA forward.
    for name, w in params["layers"].items():
      diff = np.abs(np.asarray(merged["layers"][name]) - np.asarray(w)).reshape(
          CFG.n_layers, -1).max(-1)
      touched = np.zeros(CFG.n_layers, bool)
      if name in lcfg.targets:
        touched[start:stop] = True
      assert ((diff > 0) == touched).all(), (name, start, stop, diff)
    got = np.asarray(apply(params, tokens, config=CFG, lora=tree, lora_config=lcfg))
    np.testing.assert_allclose(got, apply(merged, tokens, config=CFG), rtol=0,
                               atol=1e-4)
    assert np.abs(got - base).max() > 1e-2
    outs.append(got)
  assert np.abs(outs[0] - outs[1]).max() > 1e-2  # The layer range matters.
  assert jax.tree.all(jax.tree.map(lambda a, b: (a == b).all(), params, tiny_params()))


def test_batched_lora_equals_one_lora_per_example():
  params, tokens = tiny_params(), tiny_tokens()
  trees = [random_lora(5), random_lora(6)]
  stacked = jax.tree.map(lambda *xs: jnp.stack(xs, axis=1), *trees)
  batched = np.asarray(apply(params, tokens, config=CFG, lora=stacked, lora_config=LCFG))
  for i, tree in enumerate(trees):
    one = apply(params, tokens[i:i + 1], config=CFG, lora=tree, lora_config=LCFG)
    np.testing.assert_allclose(batched[i:i + 1], one, rtol=0, atol=1e-5)
  assert np.abs(batched[0] - batched[1]).max() > 0


def test_bf16_compute_is_close_to_fp32():
  params, tokens = tiny_params(), tiny_tokens()
  f32 = np.asarray(apply(params, tokens, config=CFG))
  bf16 = apply(params, tokens, config=CFG.replace(dtype="bfloat16"))
  assert bf16.dtype == jnp.float32  # Logits come back in float32.
  bf16 = np.asarray(bf16)
  assert np.isfinite(bf16).all()
  # bf16 keeps 8 mantissa bits (0.4% per rounding), here through 4 layers of a
  # bf16 residual stream: a few percent, far below the logits' own spread.
  assert np.linalg.norm(bf16 - f32) < 0.05 * np.linalg.norm(f32)
  assert np.abs(bf16 - f32).max() < 0.1 * np.abs(f32).max()


def test_bf16_matmuls_are_close_to_fp32_and_differentiable():
  """matmul_dtype="bfloat16": bf16 operands, float32 sums, in the forward and in
  both backward products (a custom VJP): the loss and the LoRA gradient differ
  from float32's, within bf16 rounding; other values are refused."""
  params, tokens = tiny_params(), tiny_tokens()
  lora = jax.tree.map(lambda x: x + 0.05, lora_lib.init_lora(jax.random.key(1), CFG, LCFG))
  bf = CFG.replace(matmul_dtype="bfloat16")
  loss = lambda cfg: lambda l: jnp.mean(
      apply(params, tokens, config=cfg, lora=l, lora_config=LCFG) ** 2)
  (f32, g32), (b16, g16) = (jax.value_and_grad(loss(c))(lora) for c in (CFG, bf))
  assert 0 < abs(float(b16 - f32)) < 0.02 * abs(float(f32))
  for a, b in zip(jax.tree.leaves(g16), jax.tree.leaves(g32)):
    assert np.linalg.norm(a - b) < 0.05 * np.linalg.norm(b)
  with pytest.raises(ValueError, match="matmul_dtype"):
    CFG.replace(matmul_dtype="float16")


def test_sharded_forward_equals_unsharded():
  assert jax.device_count() == 4, "tests/conftest.py sets 4 fake CPU devices"
  params, tokens = tiny_params(), tiny_tokens(batch=4)
  want = np.asarray(apply(params, tokens, config=CFG))
  mesh = parallel.make_mesh(data=2, model=2)
  sharded = parallel.shard_params(params, mesh, transformer.logical_axes(CFG))
  for name in ("q", "k", "v", "gate", "up"):  # Output features over "model".
    assert sharded["layers"][name].sharding.spec == P(None, None, parallel.MODEL)
  for name in ("o", "down"):  # Input features over "model".
    assert sharded["layers"][name].sharding.spec == P(None, parallel.MODEL, None)
  # The vocabulary axis goes over "model" unless it does not divide (259 rows).
  assert parallel.param_specs(transformer.logical_axes(CFG))["embed"] == P(parallel.MODEL, None)
  assert sharded["embed"].sharding.spec == P(None, None)
  assert sharded["final_norm"].sharding.spec == P(None)
  got = apply(sharded, jax.device_put(tokens, parallel.data_sharded(mesh)), config=CFG)
  np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=1e-5)


def test_answer_decodes_batched_greedy_continuations():
  tok, params = ByteTokenizer(), tiny_params()
  texts = ["The capital of", "Hi"]
  got = generation.answer(params, CFG, tok, texts, max_new_tokens=5)
  want = _greedy_by_recomputation(params, [tok.encode(t, add_bos=True) for t in texts], 5)
  assert got == [tok.decode(row) for row in want]
  tokens, mask = generation.encode_prompts(tok, texts)
  assert tokens.shape == (2, 32) and mask[:, -1].all() and not mask[1, 0]  # Left-padded.
  with pytest.raises(ValueError, match="no prompts"):
    generation.answer(params, CFG, tok, [], 5)


def test_generate_batched_keeps_order_and_compiles_once_per_bucket():
  chex.clear_trace_counter()

  @jax.jit
  @chex.assert_max_traces(n=2)  # Two buckets (32, 64) below: a third trace fails.
  def last_token(tokens, mask):
    return jnp.where(mask[:, -1:], tokens[:, -1:], -1)

  lengths = [5, 40, 3, 60, 33, 7, 1, 64, 12, 50, 2]  # 11 prompts: batches of 4, 4, 3.
  ids = [[100 + i] * (n - 1) + [i] for i, n in enumerate(lengths)]
  seen = []

  def run(tokens, mask, rows):
    seen.append((tokens.shape, tuple(rows)))
    assert all(len(ids[r]) <= tokens.shape[1] for r in rows)
    return last_token(tokens, mask)

  out = generation.generate_batched(ids, run, pad_id=0, batch_size=4, buckets=(32, 64),
                                    progress=False)
  assert [int(row[0]) for row in out] == list(range(len(ids)))  # Input order.
  assert [shape for shape, _ in seen] == [(4, 32), (4, 64), (4, 64)]
  assert seen[-1][1][-1] == seen[-1][1][-2]  # The short batch repeats its last row.
  with pytest.raises(AssertionError, match="max_traces"):
    generation.generate_batched([[1] * 90], run, pad_id=0, batch_size=4,
                                buckets=(32, 64, 128), progress=False)
