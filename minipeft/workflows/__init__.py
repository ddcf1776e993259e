"""Workflows: what a user runs, built on the core (``minipeft.autograd`` ... ``minipeft.memory``).

* :mod:`~minipeft.workflows.train`: the training loop (progress, evaluation, checkpoints);
* :mod:`~minipeft.workflows.evaluation`: scoring a model on a task's examples;
* :mod:`~minipeft.workflows.base`: the shipped base (pretraining, loading, its losses);
* :mod:`~minipeft.workflows.finetune`: one fine-tuning run with one method, saved;
* :mod:`~minipeft.workflows.compare`: every method on the five axes of the trade-off;
* :mod:`~minipeft.workflows.forgetting`: learning against forgetting, traced along training;
* :mod:`~minipeft.workflows.quant_eval`: what each storage format costs the base.

Each imports the core and the workflows listed above it, never the tools.
"""
