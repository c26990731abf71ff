"""Training of the shipped default model, its corpus reader and the perplexity tools.

Not part of the installed palm-serve package: serving never imports it. Run from the
repository root: `.venv/bin/python -m training.train -h` (model/default/MODEL_CARD.md)."""
