"""Teacher signals, one module per kind behind one type (hld.distill.signals.base):

    base      Needs, StudentOutputs, TeacherSignals (hidden states per layer + a logit source),
              TeacherLogits (a block of rows of one kind: the protocol every kind implements)
    online    the full distribution from an online teacher (Dense), and the model runners
    topk      top-k logits + the remaining mass (a cache, or objective.top_k)
    sampled   ids drawn from the teacher with importance weights (a cache)
    registry  the kinds by name

Only `base` is imported here: the kinds import the losses, which import `base`.
"""

from hld.distill.signals.base import LogitSource, Needs, StudentOutputs, TeacherLogits, TeacherSignals

__all__ = ["LogitSource", "Needs", "StudentOutputs", "TeacherLogits", "TeacherSignals"]
