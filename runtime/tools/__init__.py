"""Tools: `samf bench` (timings), `samf doctor` (whether this machine can run the service), and the synthetic
chest-CT phantoms the demo, the benchmarks and the tests run on."""
