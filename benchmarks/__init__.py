"""What the bench_* binaries and the demo in experiments/ run, kept out of the library (as MaxText
keeps its top-level benchmarks/): forward/train throughput (`forward`), the memory bank (`memory`),
generation (`generate`), the memory demo (`demo`), and what they share (`common`)."""
