"""Efficiency benchmark (same as ``rsvheat bench``): RS-vHeat vs the official vHeat code (``--official-source``), our
re-expression of its computation structure, Swin and ViT; fp32 and bf16 (``--precision``).

    python benchmarks/bench_efficiency.py [--models ...] [--sizes 224 512 1024 2048] [--precision fp32 bf16]
        [--official-source PATH/TO/vHeat.py] [--quick]

See ``rsvheat.apps.bench`` for what is measured and how; results go to ``benchmarks/results/efficiency.{csv,md,png}``.
"""

from rsvheat.apps.bench import main

if __name__ == "__main__":
    main()
