"""Benchmarks of `python -m launch.bench`: the speed table (`speed`, its cases in
`cases`) and peak memory against corpus size (`memory`).

Bench modules may import the core pipeline modules; the core never imports them.
"""
