"""`python -m benchmarks tune`: the serving settings that suit this machine, measured against
the real server and written into the model's config.pbtxt (see benchmarks.tune.cli)."""
