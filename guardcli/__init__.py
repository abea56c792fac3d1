"""The `guard` command line: wiring over guard (core), training (offline) and serve (online).

It sits above the three packages so that `guard` itself never imports `training` or `serve`.
"""
