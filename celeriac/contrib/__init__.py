"""Optional helpers that are not part of the core: ``rdb`` (remote pdb)."""
