"""Retrieval (ReGrad stage 3): dense MiniLM + ScaNN, exact brute force, or BM25.

Public API:
  Retriever.build(config, documents) / .search(questions, k) / .save / .load
  build_and_save(config, workdir)       the knowledge base's passages -> workdir/index
  Encoder.load("minilm") / Encoder.tiny() / .embed(texts)
  encode(params, config, token_ids, mask), load_minilm(path=None)
  ScannIndex, BruteForceIndex, BM25Index, exact_search, load_index, make_index
  bm25.neighbours(ids, texts, questions, k, gold)   the passages of meta-learning tasks
"""
from regrad_jax.retrieval.bm25 import BM25Index
from regrad_jax.retrieval.encoder import BertConfig
from regrad_jax.retrieval.encoder import encode
from regrad_jax.retrieval.encoder import Encoder
from regrad_jax.retrieval.encoder import load_minilm
from regrad_jax.retrieval.index import BruteForceIndex
from regrad_jax.retrieval.index import exact_search
from regrad_jax.retrieval.index import Index
from regrad_jax.retrieval.index import ScannIndex
from regrad_jax.retrieval.retriever import build_and_save
from regrad_jax.retrieval.retriever import load_index
from regrad_jax.retrieval.retriever import make_encoder
from regrad_jax.retrieval.retriever import make_index
from regrad_jax.retrieval.retriever import Retriever
