"""The review loop after a send: what was sent, trailers from the replies, the next version.

`data` reads and writes its facts in configs/ (review.toml, and series.toml's version and
people), `sent` records a send and checks the next one, `harvest` collects trailers from the
replies, `version` starts the next version, `status` says where the series stands.
"""
