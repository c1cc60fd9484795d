"""The pipeline's steps, one module each, in pipeline order: :mod:`~components.steps.ingest`,
:mod:`~components.steps.validate`, :mod:`~components.steps.features`, :mod:`~components.steps.pretrain`,
:mod:`~components.steps.finetune`, :mod:`~components.steps.evaluate`, :mod:`~components.steps.table` and
:mod:`~components.steps.register`.  Each is a plain function (typed config in, files out, a result back) that the
``vilbert`` commands, ``dvc.yaml`` and the Kubeflow components call; :mod:`~components.steps.common` holds what the
steps share (``StepError``, ``TrackingOptions``, the step record ``step.json``, tracked training).  The libraries
they are built from are the other packages of ``components/``."""
