"""What ``watch`` costs per training step, next to bare training and the alternatives; a
development tool, not part of the installed package (``python -m benchmarks``, or ``scripts/bench``,
which runs it in the project's .venv).

    scripts/bench --quick                         # a smoke run: under 2 minutes on 2 CPU cores
    scripts/bench                                 # the full run (roughly 20 minutes on 2 cores)
    scripts/bench --device cuda --models cnn,resnet18 --rounds 7
    scripts/bench --out /tmp/bench.md             # the plot goes beside it: /tmp/bench.png
    scripts/bench --faults                        # only the fault tables: planted faults x models x
                                                  # cadences (issue 25), then who finds which NaN/Inf

Method (this VM is noisy: only interleaved, same-process comparisons over several rounds resolve
a few per cent): each model runs in a process of its own, forked from this one once torch is
imported (and before any torch op has run). It first measures peak memory, one forked child per
variant (on CUDA: one fresh process per variant), each training only that variant for a few
steps. Then it builds every variant side by side (own model copy, optimizer and SummaryWriter),
warms each up, and runs R rounds; in each round every variant trains a chunk of K steps, in a new
random order, and the chunk's time includes ``writer.flush()`` (the writer thread's work belongs
to the variant that queued it); an untimed pause and lead-in step before each chunk let threads
the previous chunk left spinning go idle and warm this variant up again. Reported: median
per-step time over rounds, and the median over rounds of each round's ratio to (and difference
from) bare training in the same round. On CUDA it then counts each variant's host syncs per step
(``torch.cuda.set_sync_debug_mode("warn")``), off its logging cadence and on it. Last, the fault
table (in this process, on CPU): four planted faults under three NaN detectors (this project,
``detect_anomaly``, naive ``isfinite`` hooks), what each names, and at what cost per step.

The modules, by concern (each imports only those above it):
    models     the benchmark models (a registry: one line per model)
    variants   the ways of training compared (a registry: one line per variant) and the Runner
    isolation  processes of their own (forked workers, fresh interpreters), environment, threads
    timing     rounds of interleaved chunks, medians of per-round ratios; one-off, stats pass, syncs
    worker     one model's measurements, in its own process
    report     the markdown tables, the header of docs/benchmarks.md, the plot
    faults     the detectors' table (--faults): planted NaN/Inf faults under three detectors
    fault_table the fault table (--faults): 8 planted faults x 4 models x 2 cadences, healthy runs
    __main__   the options, the run, the report written

torch, introspect and the model libraries are imported inside functions: the harness decides when
(torch before it forks the workers, introspect in each worker), and ``--help`` needs neither.
"""
