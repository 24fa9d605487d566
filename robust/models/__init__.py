"""Models; every one takes RGB images in [0, 1] and normalises inside.

Import from the submodules (each pulls in only its own library: timm, open_clip or taming):

- ``normalize``: ``NormalizedModel`` (mean/std in front of any model), ``normalize_images``
- ``timm_models``: ``TimmConfig``, ``build_timm``, ``export_timm`` / ``load_exported`` (students, small teachers)
- ``clip_teacher``: ``ClipTeacherConfig``, ``build_clip_teacher`` (CLIP zero-shot teacher of DAD)
- ``vqgan``: ``VQGANConfig``, ``VQGAN_PRESETS``, ``build_vqgan``, ``discretize`` (the discretizer Q of DAD)
- ``vqgan_train``: ``VQGANTrainConfig``, ``train_vqgan`` (a VQGAN for the local data set)
"""
