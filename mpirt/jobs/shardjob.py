"""The map-over-shards job interface that the task farm runs."""

import hashlib


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

    def identity(self):
        """What makes two runs the same job (JSON-able): ``--resume`` keeps parts only of the same.

        Name every input's digest and every option that changes a shard's result. The default
        knows only the shards; override it.
        """
        return {"shard_sizes": hashlib.sha256(repr(list(self.shard_sizes)).encode()).hexdigest()}


def file_digest(path):
    """sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()
