"""RPT (seed 002): robustify a large pretrained model by partially tuning it from a small robust teacher.

Import from the submodules:

- ``partial``: ``PartialConfig``, ``build_partial``, ``PartialModel`` (M_b frozen, M_s + clean/unclean/combined
  heads tuned; ``backbone_features``, ``heads_forward``, ``param_counts``, ``backbone_key``), ``split_model``
- ``losses``: ``RptLossConfig``, ``rpt_loss`` (eq. 3-5 and the one-head variants)
- ``select``: ``SelectConfig``, ``predict``, ``mc_head_logits``, ``select_heads`` (eq. 6), ``selection_tally``
- ``zeroshot``: open_clip ViTs in timm's interface, heads against the class prompt embeddings (sec. 4.4)
- ``baselines``: ``METHODS``, ``build_method``, ``method_loss_config``, linear probe, full fine-tuning, VPT, ``wise_ft``
- ``export``: ``export_rpt`` / ``load_rpt`` (safetensors + json), ``RptClassifier`` (eq. 6 at inference),
  ``is_rpt_export``; the evaluator counts F_correct from ``RptClassifier.last_selection``
"""
