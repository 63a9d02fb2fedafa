"""gemma_cse: a Spanish school-services chatbot built on a small open LLM with KerasHub."""

import os

os.environ.setdefault("KERAS_BACKEND", "jax")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

__version__ = "0.1.0"
