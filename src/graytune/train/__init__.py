"""Training (DESIGN.md §2, layer 5): one loop and the parts it asks.

- ``loop``: ``fit`` — the loop alone (steps, validation and selection, checkpoints, Ctrl-C);
- ``gradients``: where a step's gradients come from (``GradientSource``: ``Backprop``, or ``zeroth.ZerothOrder``'s
  estimates from forward calls alone);
- ``state``: ``FitState`` (a run's position, checkpointed and checked on resume) and ``FitResult``;
- ``config``: ``TrainConfig`` and the limits of each field;
- ``budget``: forward calls counted per phase, and ``--max-calls``;
- ``distributed``: data-parallel arithmetic behind two names (``world_position``, ``average_gradients``);
- ``checkpoint``: the checkpoint's keys, written atomically, read back with checks;
- ``tasks``, ``completions``: what a batch, a loss and an evaluation are (retrieval, classification, sketch;
  prompt → completion for language models). A new kind of run is a new task here, not a change to the loop.

The programs that use them (argument parsing, train-and-save, compare, DDP) are ``graytune.recipes``;
the run folder's files are ``graytune.runs``. ``trainer`` keeps the names this package had before.
"""
