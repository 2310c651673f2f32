"""lmtune: adapt language models with the Hugging Face stack, one validated command per workflow."""

__version__ = "0.1.0"
