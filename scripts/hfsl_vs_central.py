"""Thin command line; the work and its --help live in the module it imports."""

from gaisnet_flwr.experiments.hfsl_vs_central import main

if __name__ == "__main__":
    raise SystemExit(main())
