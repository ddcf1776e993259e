"""Tools around the core and the workflows: nothing here is needed to train a model.

* :mod:`~minipeft.tools.cli`: the ``minipeft`` command;
* :mod:`~minipeft.tools.bench`: ``minipeft bench``, one training step timed (against PyTorch);
* :mod:`~minipeft.tools.interop`: Hugging Face GPT-2 folders and peft adapters, both ways;
* :mod:`~minipeft.tools.docs`: the HTML site (guide, annotated source, lessons);
* :mod:`~minipeft.tools.lessons`: what the lesson notebooks share.
"""
