"""How a stage trains, whatever it trains: Lightning strategies (FSDP2 with sharded loading and CPU offload),
the per-rank memory estimate, optimiser helpers, FLOPs accounting and callbacks. Above the models it shards."""
