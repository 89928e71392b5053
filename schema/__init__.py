"""Numbered SQL migrations, applied in order by `dlqproc migrate` (see dlqproc.store)."""
