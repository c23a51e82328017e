"""The inverse-Bellman math: exact Q and M (``bellman``, ``bellman_grid``), world models from Q
(``plearn``), from experience (``experience``, ``qss``), rewards from Q (``reward``), scores
(``scoring*``), planning in a model (``planning*``) and the exact-Q study (``oracle``).

Arrays in, arrays out: nothing here imports Ray, Tune, W&B or the orchestration packages
(``qworld.sweep``, ``qworld.agents``, ``qworld.cli``); ``tests/test_layering.py`` checks it.
It may import ``qworld.metrics`` (column names), ``qworld.layout`` (file names) and
``qworld_envs``.
"""
