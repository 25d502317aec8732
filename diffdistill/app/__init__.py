"""The application layer: the ``diffdistill`` command line (:mod:`.cli`), ``diffdistill
sample`` (:mod:`.sample`), the demo (:mod:`.demo`) and the embedded world's build
(:mod:`.world_build`).

It sits above the library: it may import ``diffdistill.*``, ``diffdistill.trainers`` and
``diffdistill.eval``; nothing outside this package imports it (tests/test_layers.py).
"""
