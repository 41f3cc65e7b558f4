"""`python -m transferkit` (what torchrun launches: `torchrun --nproc-per-node 2 -m transferkit finetune ...`)."""

from transferkit.cli import main

main()
