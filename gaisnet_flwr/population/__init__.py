"""A device population and the clusters a run forms from it (paper Sec. III-B to III-D, IV-A/B).

    devices.py    the population: devices with a position, a device profile, D2D range, data
                  and inference requests; read from a TOML/CSV file or generated from a seed
    planning.py   what a range of blocks costs a peer (FLOPs, memory, the hops it sends) and the
                  planners: compute-only or communication-aware
    edge_offload.py  the edge server as a cooperative node: a segment of a chain on the edge
                  (edge-offload='auto'), placed by the same min-max split, shared per round
    layout.py     fine-tuning chains and inference loops from the population (service/clustering),
                  each with its own links, split plan and predicted costs

It sits above costs and service (it combines both) and below config, which reads a population
once at the app boundary.
"""
