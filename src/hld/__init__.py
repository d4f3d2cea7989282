"""hld: knowledge distillation during LLM pre-training (CE vs logit KD vs hidden-layer distillation)."""

__version__ = "0.1.0"
