"""Benchmarks, each a module of plain functions that measure and format: `layer` (one MoE layer against the
reference loop and a dense FFN), `train` (an MoE preset's training tokens/s against its dense twin), `ep`
(expert-parallel step time and all-to-all volume). Their command lines are `dsmoe bench NAME`."""
