"""Thin command line; the work and its --help live in the module it imports."""

from gaisnet_flwr.experiments.fig7_frozen_vs_full import main

if __name__ == "__main__":
    raise SystemExit(main())
