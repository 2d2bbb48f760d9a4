"""safety-jax: one Llama, one training engine and one analysis toolkit in JAX for LLM safety fine-tuning studies."""

from safety_jax.model.config import LlamaConfig, get_preset
from safety_jax.model.generate import generate, generate_text
from safety_jax.model.hf import load_hf, save_hf
from safety_jax.model.llama import forward, init_params

__all__ = ["LlamaConfig", "forward", "generate", "generate_text", "get_preset", "init_params", "load_hf", "save_hf"]
__version__ = "0.1.0"
