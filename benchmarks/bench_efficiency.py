"""Efficiency benchmark (same as ``rsvheat bench``): RS-vHeat vs the official structure, Swin and ViT.

    python benchmarks/bench_efficiency.py [--models ...] [--sizes 224 512 1024 2048] [--quick]

See ``rsvheat.apps.bench`` for what is measured and how; results go to ``benchmarks/results/efficiency.{csv,md,png}``.
"""

from rsvheat.apps.bench import main

if __name__ == "__main__":
    main()
