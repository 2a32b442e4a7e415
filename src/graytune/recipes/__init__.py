"""Programs that compose the library (DESIGN.md §2, layer 6): what ``graytune train``, ``eval``, ``compare``,
``extract``/``transfer`` and the data-parallel entry point run, and what every study script calls.

- ``run``: ``RunSpec``, ``open_for`` (the backbone at a method's level with its grants), ``make_task``,
  ``run_once`` (seed → build → fit → test → a row: the one run every program calls) and ``train_model`` /
  ``train_and_save`` (``run_once`` inside a run folder);
- ``evaluate``: ``evaluate_saved`` (``graytune eval``);
- ``compare``: several methods with equal budgets (the demo's table);
- ``transmiter``: TransMiter's extract → transfer → TransMiter+ programs on real data sets;
- ``arguments``: the flags of a training run, shared by the CLI and ``ddp``;
- ``ddp``: ``torchrun -m graytune.recipes.ddp``, the data-parallel entry point;
- ``store``: one results file for the studies (atomic, locked, refuses another protocol);
- ``jobs``: fine-tuning jobs on ``graytune serve --jobs DIR`` (OpenAI's files, jobs, models and embeddings routes):
  each job runs ``train_model`` in a process of its own, through the server, as the client that created it.

The library below never imports this package.
"""
