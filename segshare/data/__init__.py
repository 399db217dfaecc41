"""The NIfTI data pipeline (see docs/data.md).

Modules (imported explicitly; this package imports nothing heavy on its own):

* ``discovery``: ``Case``, ``Dataset``, ``discover_dataset``, ``discover_images``
* ``io``: ``load_nifti``, ``save_nifti_atomic``, ``save_npy_atomic``, ``write_json_atomic``
* ``validation``: ``validate_dataset``, ``check_case``, ``DatasetError``, ``Problem``
* ``preprocessing``: ``Plan``, ``preprocess_case``, ``restore_to_original``
* ``resample``: image / label / probability resampling (separate anisotropic axis)
* ``fingerprint``: ``case_statistics``, ``build_fingerprint``, ``make_plan``
* ``cache``: ``preprocess_dataset``, ``load_cached_case``, ``cache_dir_for``
* ``splits``: ``get_split``
* ``prepare``: ``prepare_dataset`` -> ``PreparedData`` (validate, fingerprint, plan, cache, split)
* ``sampling``: ``PatchSampler``; ``augment``: ``augment``, ``spatial_margin``
* ``pipeline``: ``make_training_data`` (tf.data or keras.utils.PyDataset)
* ``synthetic``: ``generate_synthetic_dataset``, ``ensure_dataset``
"""
