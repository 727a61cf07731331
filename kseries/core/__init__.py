"""The plumbing every stage shares: the one door for commands, and atomic files under locks."""
