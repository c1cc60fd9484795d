"""The pipeline's steps (``components.steps``: plain Python functions, typed config in, files out, metrics back),
the libraries they are built from (the other packages), the shared infrastructure (``storage``, ``tracking``,
``config``) and the CLI (``cli``, ``commands``)."""
