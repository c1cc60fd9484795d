"""Serving a registered model: the inference path (:mod:`~components.serving.predictor`), what a registered model
bundles besides its checkpoint (:mod:`~components.serving.bundle`) and ``vilbert serve``, which follows the
``champion`` alias (:mod:`~components.serving.live`)."""
