"""What every job runs on: atomic writes (`atomic`), output folders transferkit owns (`outputs`: the guard every
writer calls), and torchrun process groups (`distributed`).

The lowest layer: it imports nothing from transferkit but `errors` (and the version).
"""
