"""`python -m benchmarks gpu`: the GPU path measured in one bounded, offline run.

A GPU machine is lent for minutes, bare (no package registry), with only the working tree
copied in. So the whole check is one command, rehearsed on the CPU in the test suite: each
step runs in a process of its own under a time box (benchmarks.gpu.steps), the missing Python
packages travel as wheels (benchmarks.gpu.wheels), and results.json and summary.md are
rewritten after every step, so a step that hangs costs its box, never the results.

Modules, one concern each: cli (the command, the run), steps (the step table, time boxes),
child (one step's process), wheels, device (facts, GPU memory and utilisation), repository
(train and export), checks (parity, load-time reference check), compute (runtime alone),
served (the started server under load), workers (--workers on one GPU), report.
"""
