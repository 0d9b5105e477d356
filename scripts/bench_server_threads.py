"""Thin command line; the work and its --help live in the module it imports."""

from gaisnet_flwr.experiments.bench_server_threads import main

if __name__ == "__main__":
    raise SystemExit(main())
