"""Distillation across tokenizers (issue 34, items 2 and 3): losses and pooling over the chunks that
`hld.data.align` finds, where a run of teacher tokens and a run of student tokens spell the same text.

- `chunks`: an alignment's chunks as flat row indices into a batch of windows, and which rows predict
  each chunk (the positions every loss here pairs up).
- `uld`: Universal Logit Distillation, the sorted-probability distance (Boizard et al., arXiv 2402.12030).
- `alm`: Approximate Likelihood Matching over chunk likelihoods (Minixhofer et al., arXiv 2503.20083).
- `vocab`: the vocabulary both tokenizers share, by the text each token spells.
- `gold`: exact KD over the shared vocabulary where a chunk is one token on each side, ULD elsewhere
  (the hybrid of TRL's GOLD trainer).
- `pooling`: hidden states pooled per chunk (last token or mean), for hidden-layer distillation.
- `objectives`: the training objectives over paired windows (CE + a loss above; the pooled hidden loss)
  and their plan, `build_cross_plan`.

Every loss returns a sum over the chunks it is given (fp32), normalised once by the caller, as in
`hld.distill.losses`. This `__init__` imports nothing (scripts/import_layers.py).
"""
