"""q-curate: Q-Tuning data curation for supervised fine-tuning (arXiv 2509.23873)."""

__version__ = "0.1.0"
