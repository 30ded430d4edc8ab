"""The map-over-shards job interface that the task farm runs."""


class ShardJob:
    """Subclass and fill in; the farm calls these on whichever rank holds the shard.

    Attributes:
        shard_sizes: rows (or any cost measure) per shard; larger shards are leased first.
        spawn_argv: the command a joining rank runs (same job, absolute paths).
    """

    shard_sizes = ()
    spawn_argv = ()

    def map(self, shard):
        """Compute the result of one shard (pure: the same result whoever runs it)."""
        raise NotImplementedError

    def write_part(self, path, shard, result):
        """Write one shard's result to ``path`` (a temporary name the farm commits)."""
        raise NotImplementedError

    def reduce(self, paths):
        """Combine the committed parts (in shard order) into the job's output; return a summary dict."""
        raise NotImplementedError
