"""sevjax: severity-aware fine-tuning of Arabic medical language models in JAX."""

__version__ = "0.1.0"
