"""The loop: ``Trainer`` (the façade), ``fit`` level by level, evaluation, what a run shares
(``session``), how the step reaches the model (``strategy``, ``router``) and how it stops."""
