"""Measuring code of `ctrak bench` (issue 5): one module per measured quantity.

- `models`: the toy model and a Stable-Diffusion-shaped UNet built from config; benchmark images;
- `speed`: the naive reference path vs the default path, forward-equivalents, efficiency;
- `quality`: exact (unprojected) scores and what the projected paths retain of them;
- `scan`: a synthetic feature store, the streaming top-k query scan, copy bandwidth, Fisher merge;
- `memory`: peak RSS of featurize and of a query in fresh subprocesses, at two data sizes;
- `report`: the table, the targets, the environment.
"""
