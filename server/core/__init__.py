"""One process's models: the repository, versions and their states, batching, loading, statistics.

Nothing here knows a wire protocol: the front-ends in server.api call in, and errors leave as
server.errors exceptions.
"""
