"""The model registry's library (MLflow): the rules that move aliases (:mod:`~components.registry.rules`), the lock
that makes each read-then-move one step (:mod:`~components.registry.lock`), a version's lineage tags
(:mod:`~components.registry.lineage`), the alias-event listener (:mod:`~components.registry.events`) and the UI
beside it (:mod:`~components.registry.ui`).  The register step itself is :mod:`components.steps.register`."""
