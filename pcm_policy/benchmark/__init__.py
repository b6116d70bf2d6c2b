"""`pcm bench`'s library: rows of samplers timed on the same observations and noise (`rows`, `measure`), the
closed-loop and early-stop studies (`studies`), and the report (`report`: bench.json rows, bench.md, bench.png)."""
