"""CLI registration for the jobs (filled in as jobs land)."""


def add_parser(sub):
    pass
