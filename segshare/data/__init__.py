"""The NIfTI data pipeline (see docs/data.md).

Modules (imported explicitly; this package imports nothing heavy on its own):

* ``discovery``: ``Case``, ``Dataset``, ``discover_dataset``, ``discover_images``
* ``io``: ``load_nifti``, ``read_label_map``, ``list_nifti``, and the package's atomic writers
  (``atomic_target``, ``atomic_folder``, ``write_text_atomic``, ``write_json_atomic``, ...)
* ``validation``: ``validate_dataset``, ``check_case``, ``DatasetError``, ``Problem``
* ``preprocessing``: ``Plan``, ``preprocess_case``, ``restore_to_original``
* ``resample``: image / label / probability resampling (separate anisotropic axis)
* ``fingerprint``: ``case_statistics``, ``build_fingerprint``, ``make_plan``
* ``cache``: ``preprocess_dataset``, ``load_cached_case``, ``cache_dir_for``
* ``splits``: ``get_split``
* ``prepare``: ``DataSettings`` -> ``prepare_dataset`` -> ``PreparedData`` (validate, fingerprint,
  plan, cache, split)
* ``sampling``: ``PatchSampler``; ``augment``: ``AugmentSettings``, ``augment``, ``spatial_margin``
* ``pipeline``: ``make_training_data`` (tf.data or keras.utils.PyDataset), ``TrainingFeed``
* ``synthetic``: ``SyntheticSpec``, ``generate_synthetic_dataset``, ``ensure_dataset``
* ``parallel``: ``parallel_map`` (the package's one process pool), ``default_num_workers``

The library takes typed arguments and small dataclasses; only the apps see a Hydra config.
"""
